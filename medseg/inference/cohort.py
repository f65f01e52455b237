"""Segment a cohort with a ``Segmenter``: one case after another, failures reported per case."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from medseg.errors import DataError
from medseg.io.cohort import OUTPUT_SUFFIX, OutputFormat, label_summary

if TYPE_CHECKING:
    from medseg.inference.segmenter import Segmenter


@dataclass(frozen=True)
class CasePrediction:
    """What ``predict_cohort`` did with one case.

    Attributes:
        name: the case name (file stem or folder name).
        path: the file written, or None when the case failed.
        objects: instances found.
        voxels: labelled voxels (pixels in 2D).
        volume_ml: labelled volume in millilitres (mm³ / 1000; mm² / 1000 in 2D).
        error: why the case failed, or None.

    """

    name: str
    path: Path | None
    objects: int = 0
    voxels: int = 0
    volume_ml: float = 0.0
    error: str | None = None


def predict_cohort(
    segmenter: Segmenter,
    cases: list[tuple[str, Path]],
    output: Path,
    output_format: OutputFormat,
    *,
    flip_tta: bool = False,
    progress: Callable[[str, float, float, str], None] | None = None,
) -> list[CasePrediction]:
    """Segment each case and write its labels; a failing case is reported, not fatal.

    ``output`` is a folder (``<name><suffix>`` per case), or, for a single case, a file
    path ending in the format's suffix. Each file is written under a temporary name and
    renamed, so an interrupted run leaves no half-written mask. ``progress`` is called
    with ``("predict", done, total, case name)`` after each case.
    """
    from medseg.io.dicom import find_series, read_series

    suffix = OUTPUT_SUFFIX[output_format]
    single = len(cases) == 1 and output.name.lower().endswith(suffix)
    results = []
    for number, (name, path) in enumerate(cases, start=1):
        destination = output if single else output / f"{name}{suffix}"
        try:
            # A SEG must reference the series that was segmented: index the folder once, read that series.
            series = find_series(path) if output_format == "dicom-seg" and path.is_dir() else None
            labels = segmenter.predict(read_series(series) if series else path, flip_tta=flip_tta)
            partial = destination.with_name(f".{destination.name}.partial{suffix}")
            destination.parent.mkdir(parents=True, exist_ok=True)
            segmenter.write_labels(labels, partial, output_format, series=series)
            os.replace(partial, destination)
        except DataError as exc:
            results.append(CasePrediction(name, None, error=str(exc)))
        else:
            results.append(CasePrediction(name, destination, **label_summary(labels)))
        if progress is not None:
            progress("predict", number, len(cases), name)
    return results
