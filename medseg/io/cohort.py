"""A cohort on disk: find the cases of an input, write predicted labels as NIfTI, TIFF or DICOM SEG."""

from __future__ import annotations

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
    from medseg.io.dicom import DicomSeries
    from medseg.io.dicom_seg import SegmentInfo

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


def write_labels(
    labels: Volume,
    destination: Path,
    output_format: OutputFormat,
    *,
    segment: SegmentInfo | None = None,
    algorithm: str = "unet",
    series: DicomSeries | None = None,
) -> Path:
    """Write predicted labels ``(1, *spatial)`` as ``output_format``; return the file written.

    NIfTI and TIFF keep the instance labels. DICOM SEG stores segments (classes), so every
    labelled voxel joins ``segment`` (default: one ``foreground`` segment), described as made
    by the automatic ``algorithm``; it needs ``series``, the DICOM series the labels were
    predicted on, which the SEG references.

    Raises:
        DataError: DICOM SEG without a source series, or a series the SEG cannot reference.

    """
    if output_format != "dicom-seg":
        return write_image(labels, destination)
    from medseg._version import __version__
    from medseg.io.dicom_seg import SegmentInfo, write_dicom_seg

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
        segments=[segment or SegmentInfo(number=1, label="foreground")],
        algorithm=(f"medseg {algorithm}", __version__),
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
