"""Write label volumes as DICOM SEG objects (highdicom) that reference their source series."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import DataError
from medseg.io.dicom import DicomSeries, stored_grid_affine
from medseg.io.geometry import canonical, check_same_grid, resample_to_grid
from medseg.io.volume import Volume


@dataclass(frozen=True)
class SegmentInfo:
    """One segment of a DICOM SEG: a label value and what it shows.

    Attributes:
        number: the label value in the label volume (1, 2, ...), kept as segment number.
        label: short name shown by viewers (``liver``, ``cell``).
        category: SNOMED CT (code value, meaning) of the property category.
        property_type: SNOMED CT (code value, meaning) of the property type.

    """

    number: int
    label: str
    category: tuple[str, str] = ("85756007", "Tissue")
    property_type: tuple[str, str] = ("85756007", "Tissue")


def write_dicom_seg(
    labels: Volume,
    series: DicomSeries,
    path: Path,
    *,
    segments: Sequence[SegmentInfo],
    algorithm: tuple[str, str],
    series_description: str = "medseg segmentation",
) -> Path:
    """Write ``labels`` as a binary DICOM SEG referencing the source ``series``.

    The SEG copies the patient and study of the source (it belongs with it in the PACS),
    has one frame per source slice that holds any segment, and names medseg as the
    automatic algorithm.

    Args:
        labels: label ``Volume`` ``(1, x, y, z)`` on the source series' voxel grid (as
            ``Segmenter.predict`` returns it for that series), any axis order; values are
            segment numbers, 0 background. Values not in ``segments`` are refused.
        series: the source series (single-frame images), from ``find_series`` or ``index_dicom``.
        path: the ``.dcm`` file to write.
        segments: one entry per label value.
        algorithm: (name, version) of the algorithm, e.g. ``("medseg unet2d", "0.3.0")``.
        series_description: SeriesDescription of the SEG.

    Returns:
        ``path``.

    Raises:
        DataError: the source is not a single-frame series with study and series UIDs, the
            labels are not on its grid, or they hold values without a segment description.

    """
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    from medseg._version import __version__

    if series.multiframe:
        raise DataError(f"series {series.key}: DICOM SEG output supports single-frame source series only")
    datasets = [_referenceable(pydicom.dcmread(file), series.key) for file in series.files]
    datasets, shape, affine = _source_grid(datasets)
    grid = Volume(np.zeros((1, *shape), np.uint8), affine, kind="label")
    check_same_grid(canonical(grid), canonical(labels), name=f"labels for series {series.key}")
    stack = resample_to_grid(labels, shape, affine, order=0).array[0]  # (columns, rows, slices)
    values = {int(value) for value in np.unique(stack)} - {0}
    described = {segment.number for segment in segments}
    if not values <= described:
        raise DataError(
            f"label values {sorted(values - described)} have no segment description; "
            "describe every label value (export.segment) or relabel"
        )
    frames = np.ascontiguousarray(stack.transpose(2, 1, 0)).astype(np.uint8)  # (slices, rows, columns)
    name, version = algorithm
    identification = hd.AlgorithmIdentificationSequence(
        name=name, family=codes.DCM.ArtificialIntelligence, version=version
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=segment.number,
            segment_label=segment.label,
            segmented_property_category=hd.sr.CodedConcept(segment.category[0], "SCT", segment.category[1]),
            segmented_property_type=hd.sr.CodedConcept(
                segment.property_type[0], "SCT", segment.property_type[1]
            ),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=identification,
        )
        for segment in sorted(segments, key=lambda item: item.number)
    ]
    try:
        with warnings.catch_warnings():  # highdicom warns quoting header values (patient names)
            warnings.simplefilter("ignore")
            seg = hd.seg.Segmentation(
                source_images=datasets,
                pixel_array=frames,
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                segment_descriptions=descriptions,
                series_instance_uid=hd.UID(),
                series_number=int(getattr(datasets[0], "SeriesNumber", 0) or 0) + 1000,
                sop_instance_uid=hd.UID(),
                instance_number=1,
                manufacturer="medseg",
                manufacturer_model_name=name[:64],
                software_versions=f"medseg {__version__}",
                device_serial_number="0",
                series_description=series_description[:64],
                omit_empty_frames=False,
            )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise DataError(
            f"series {series.key}: highdicom cannot build a SEG from this series ({type(exc).__name__}); "
            "its headers break the standard (rerun with --debug for the detail, which may quote them)"
        ) from exc
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)
    return path


def _referenceable(dataset: Any, key: str) -> Any:
    """``dataset`` with its SOP Class/Instance UIDs, taken from the file meta where blanked.

    Raises:
        DataError: the study or series UID is missing, so no object can reference the image.

    """
    where = f"series {key}, instance {dataset.get('InstanceNumber', '?')}"
    meta = getattr(dataset, "file_meta", None)
    for keyword in ("SOPClassUID", "SOPInstanceUID"):
        if not dataset.get(keyword):
            stored = getattr(meta, f"MediaStorage{keyword}", None)
            if not stored:
                raise DataError(f"{where}: no {keyword}; the source images cannot be referenced by a SEG")
            setattr(dataset, keyword, stored)
    if "SpecificCharacterSet" in dataset and not dataset.SpecificCharacterSet:
        del dataset.SpecificCharacterSet  # empty means the default repertoire
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
        if not dataset.get(keyword):
            raise DataError(
                f"{where}: {keyword} is empty (anonymised without new UIDs), so a DICOM SEG cannot "
                "reference it; re-identify the series with fresh UIDs (e.g. via the PACS) or write NIfTI"
            )
    return dataset


def _source_grid(datasets: list[Any]) -> tuple[list[Any], tuple[int, int, int], np.ndarray]:
    """Slices sorted along their normal, the grid shape ``(columns, rows, slices)`` and its RAS affine.

    The grid is the series as stored (x along a row, y down the columns, z along the
    normal), the same one ``medseg.io.dicom`` builds before reorienting to RAS+.
    """
    first = datasets[0]
    cosines = np.asarray(first.ImageOrientationPatient, dtype=float)
    normal = np.cross(cosines[:3], cosines[3:])
    ordered = sorted(datasets, key=lambda item: float(normal @ np.asarray(item.ImagePositionPatient, float)))
    positions = np.array([np.asarray(item.ImagePositionPatient, float) for item in ordered])
    step = float(np.median(np.diff(positions @ normal))) if len(ordered) > 1 else 1.0
    spacing = (float(first.PixelSpacing[0]), float(first.PixelSpacing[1]))
    affine = stored_grid_affine(cosines, spacing, positions[0], step)
    return ordered, (int(first.Columns), int(first.Rows), len(ordered)), affine
