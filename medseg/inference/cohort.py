"""Segment a cohort with an export: in this process or on a Ray cluster, failures reported per case."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from medseg.errors import DataError
from medseg.io.cohort import OUTPUT_SUFFIX, OutputFormat, label_summary

if TYPE_CHECKING:
    from medseg.inference.executors import CaseOutcome, ExecutorParams
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
    model: Path | Segmenter,
    cases: list[tuple[str, Path]],
    output: Path,
    output_format: OutputFormat,
    *,
    device: str = "cpu",
    flip_tta: bool | None = None,
    executor: ExecutorParams | None = None,
    progress: Callable[[str, float, float, str], None] | None = None,
) -> list[CasePrediction]:
    """Segment each case with ``model`` and write its labels; a failing case is reported.

    ``model`` is an export folder, or (in this process only) a loaded ``Segmenter``.
    ``output`` is a folder (``<name><suffix>`` per case), or, for a single case, a file
    path ending in the format's suffix. Each file is written here, under a temporary name
    and renamed, so an interrupted run leaves no half-written mask. ``executor`` says where
    the cases are segmented (default: this process; on Ray the cluster sees only ``case_0001``...
    ids). ``progress`` is called with ``("predict", done, total, case name)`` after each case.
    Results come in the order of ``cases``.
    """
    from medseg.inference.card import ModelCard
    from medseg.inference.executors import CaseJob, ExecutorParams, segment_cases
    from medseg.inference.segmenter import Segmenter
    from medseg.io.dicom import find_series

    card = model.card if isinstance(model, Segmenter) else ModelCard.read(model / "model_card.json")
    suffix = OUTPUT_SUFFIX[output_format]
    single = len(cases) == 1 and output.name.lower().endswith(suffix)
    named = {f"case_{number:04d}": case for number, case in enumerate(cases, start=1)}
    results: dict[str, CasePrediction] = {}

    def write(outcome: CaseOutcome) -> None:
        name, path = named[outcome.case_id]
        destination = output if single else output / f"{name}{suffix}"
        try:
            if outcome.labels is None:
                raise DataError(outcome.error or "not segmented")
            # A SEG references the series that was segmented (headers only; the pixels were read to segment).
            series = find_series(path) if output_format == "dicom-seg" and path.is_dir() else None
            partial = destination.with_name(f".{destination.name}.partial{suffix}")
            destination.parent.mkdir(parents=True, exist_ok=True)
            card.write_labels(outcome.labels, partial, output_format, series=series)
            os.replace(partial, destination)
        except DataError as exc:
            results[outcome.case_id] = CasePrediction(name, None, error=str(exc))
        else:
            results[outcome.case_id] = CasePrediction(name, destination, **label_summary(outcome.labels))
        if progress is not None:
            progress("predict", len(results), len(cases), name)

    jobs = [
        CaseJob(case_id, path, reference_series=output_format == "dicom-seg")
        for case_id, (_, path) in named.items()
    ]
    segment_cases(model, jobs, executor or ExecutorParams(), write, device=device, flip_tta=flip_tta)
    return [results[case_id] for case_id in named]
