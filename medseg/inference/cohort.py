"""Segment a cohort: find the cases of an input, and write label volumes as NIfTI, TIFF or DICOM SEG."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from medseg.errors import DataError
from medseg.io.readers import (
    NIFTI_SUFFIXES,
    NRRD_SUFFIXES,
    PNG_SUFFIXES,
    TIFF_SUFFIXES,
    image_stem,
    image_suffix,
    write_image,
)
from medseg.io.volume import Volume

if TYPE_CHECKING:
    from medseg.inference.segmenter import Segmenter
    from medseg.io.dicom import DicomSeries

OutputFormat = Literal["nifti", "dicom-seg", "tiff"]
"""How predicted labels are written."""

OUTPUT_SUFFIX: dict[str, str] = {"nifti": ".nii.gz", "dicom-seg": ".dcm", "tiff": ".tif"}
INPUT_SUFFIXES = TIFF_SUFFIXES + PNG_SUFFIXES + NIFTI_SUFFIXES + NRRD_SUFFIXES


def discover_images(source: Path) -> list[tuple[str, Path]]:
    """The cases of ``source`` as ``(name, path)``, sorted by name.

    ``source`` is one image file (TIFF, PNG, NIfTI, NRRD), one DICOM series folder (a
    folder without image files or subfolders), or a folder of cases: image files and/or
    subfolders that each hold one DICOM series.

    Raises:
        DataError: ``source`` does not exist or holds no case.

    """
    if source.is_file():
        if image_suffix(source) not in INPUT_SUFFIXES:
            raise DataError(
                f"'{source.name}' is not an image medseg reads (TIFF, PNG, NIfTI, NRRD); "
                "for DICOM pass the series folder"
            )
        return [(image_stem(source), source)]
    if not source.is_dir():
        raise DataError(f"input '{source.name}' does not exist; pass an image file or a folder")
    entries = sorted(path for path in source.iterdir() if not path.name.startswith("."))
    files = [path for path in entries if path.is_file() and image_suffix(path) in INPUT_SUFFIXES]
    folders = [path for path in entries if path.is_dir()]
    if not files and not folders:
        return [(source.name, source)]  # a folder of DICOM files: one series
    cases = [(image_stem(path), path) for path in files + folders]
    names = [name for name, _ in cases]
    if len(set(names)) != len(names):
        raise DataError(f"input '{source.name}' holds two cases with the same name; rename one")
    return sorted(cases)


def segments_of(card: Mapping[str, Any]) -> list[Any]:
    """The DICOM SEG segment descriptions a model card declares (default: one foreground segment)."""
    from medseg.io.dicom_seg import SegmentInfo

    declared = card.get("segments") or [{"number": 1, "label": "foreground"}]
    return [
        SegmentInfo(
            number=int(item["number"]),
            label=str(item["label"]),
            category=tuple(item.get("category", SegmentInfo.category)),
            property_type=tuple(item.get("property_type", SegmentInfo.property_type)),
        )
        for item in declared
    ]


def write_labels(
    labels: Volume,
    destination: Path,
    output_format: OutputFormat,
    *,
    card: Mapping[str, Any],
    series: DicomSeries | None = None,
) -> Path:
    """Write predicted labels ``(1, *spatial)`` as ``output_format``; return the file written.

    NIfTI and TIFF keep the instance labels. DICOM SEG stores segments (classes), so every
    labelled voxel joins the card's first segment; it needs ``series``, the DICOM series
    the labels were predicted on, which the SEG references.

    Raises:
        DataError: DICOM SEG without a source series, or a series the SEG cannot reference.

    """
    if output_format != "dicom-seg":
        return write_image(labels, destination)
    from medseg._version import __version__
    from medseg.io.dicom_seg import write_dicom_seg

    if series is None:
        raise DataError(
            f"{destination.name}: DICOM SEG output needs a DICOM series as input; "
            "use --format nifti for image files"
        )
    foreground = Volume((labels.array > 0).astype(np.int32), labels.affine, kind="label")
    return write_dicom_seg(
        foreground,
        series,
        destination,
        segments=segments_of(card)[:1],
        algorithm=(f"medseg {card.get('name', 'unet')}", __version__),
    )


def label_summary(labels: Volume) -> dict[str, Any]:
    """``objects`` (instances), ``voxels`` (labelled) and ``volume_ml`` (mm³ / 1000) of a label Volume."""
    data = labels.array[0]
    voxels = int(np.count_nonzero(data))
    return {
        "objects": len(np.unique(data[data > 0])),
        "voxels": voxels,
        "volume_ml": round(voxels * float(np.prod(labels.spacing)) / 1000.0, 4),
    }


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
            write_labels(labels, partial, output_format, card=segmenter.card, series=series)
            os.replace(partial, destination)
        except DataError as exc:
            results.append(CasePrediction(name, None, error=str(exc)))
        else:
            results.append(CasePrediction(name, destination, **label_summary(labels)))
        if progress is not None:
            progress("predict", number, len(cases), name)
    return results
