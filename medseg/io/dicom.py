"""DICOM series: header-only indexing, selection by rules, and careful volume building.

Indexing reads headers only (no pixel data), groups instances by SeriesInstanceUID and counts
what it skips (empty files, non-DICOM files, unreadable files) instead of failing. Volumes are
built the way the standard defines the geometry: slices sorted by their position projected on
the slice normal (not by InstanceNumber or file name), spacing from the positions, modality
rescale applied, enhanced multi-frame objects read from their functional groups, and the
result reoriented to RAS+ with its affine kept.

Privacy: a series is named by ``key``, a hash of its UID, in every listing and message; UIDs,
file paths, names and dates never leave this module except through ``DicomSeries.files``
and ``uid``, which callers keep in the workspace's private area.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from medseg.errors import DataError
from medseg.io.geometry import LPS_TO_RAS, to_ras
from medseg.io.volume import Volume
from medseg.params import Params

Orientation = Literal["axial", "coronal", "sagittal", "oblique"]
LABEL_MODALITIES = frozenset({"SEG", "RTSTRUCT"})

# Geometry tolerances: positions and spacing in mm, directions as cosines.
_POSITION_TOLERANCE = 1e-3
_SPACING_TOLERANCE = 0.01  # fraction of the median slice spacing
_DIRECTION_TOLERANCE = 1e-4
_TILT_TOLERANCE_DEGREES = 0.05


def series_key(uid: str) -> str:
    """Pseudonymous 12-hex-digit name of a series (sha256 of its UID)."""
    return hashlib.sha256(uid.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class DicomSeries:
    """One series found by ``index_dicom`` (headers only).

    ``uid`` and ``files`` identify the source and must stay private; everything else is
    safe to show (no names, IDs or dates). Anonymised files without a SeriesInstanceUID are
    grouped by folder, SeriesNumber and Modality, and ``uid`` is made from those.
    """

    uid: str
    key: str
    modality: str
    description: str
    orientation: Orientation
    rows: int
    columns: int
    frames: int
    multiframe: bool
    files: tuple[Path, ...]

    def listing(self) -> dict[str, object]:
        """A PHI-free row describing the series."""
        return {
            "series": self.key,
            "modality": self.modality,
            "description": self.description,
            "slices": self.frames,
            "size": f"{self.columns}x{self.rows}",
            "orientation": self.orientation,
            "multiframe": self.multiframe,
        }


@dataclass
class DicomIndex:
    """Series found under a folder and the files skipped, counted by reason."""

    series: list[DicomSeries] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)


class SeriesRules(Params):
    """Which series to take from a DICOM folder (all rules must hold).

    ``modality`` lists the wanted Modality values; empty means every image modality (label
    objects — SEG, RTSTRUCT — are only taken when named). ``description`` is a regular
    expression searched in SeriesDescription (case-insensitive).
    """

    modality: tuple[str, ...] = ()
    description: str | None = None
    min_slices: int = 1
    orientation: Literal["any", "axial", "coronal", "sagittal", "oblique"] = "any"


def _walk(root: Path) -> list[Path]:
    """Every file under ``root``, following links but visiting each real folder once."""
    seen: set[str] = set()
    files: list[Path] = []
    for folder, subfolders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a link loop or a second link to the same folder
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders.sort()
        files += [Path(folder) / name for name in sorted(names)]
    return files


def orientation_of(cosines: np.ndarray) -> Orientation:
    """Name the plane of ``ImageOrientationPatient`` (6 cosines) by its normal's main axis."""
    normal = np.cross(cosines[:3], cosines[3:])
    axis = int(np.argmax(np.abs(normal)))
    if abs(normal[axis]) < math.cos(math.radians(10)):
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def _header_geometry(header: Any) -> tuple[np.ndarray | None, int]:
    """Orientation cosines (or None) and frame count of a header."""
    frames = int(header.get("NumberOfFrames", 1) or 1)
    cosines = header.get("ImageOrientationPatient")
    if cosines is None and "SharedFunctionalGroupsSequence" in header:
        shared = header.SharedFunctionalGroupsSequence[0]
        if "PlaneOrientationSequence" in shared:
            cosines = shared.PlaneOrientationSequence[0].ImageOrientationPatient
    return (np.asarray(cosines, dtype=float) if cosines is not None else None), frames


def index_dicom(root: Path) -> DicomIndex:
    """Index a folder tree of DICOM files by reading headers only.

    Empty files, files that are not DICOM, files that cannot be read, and DICOM objects
    without image geometry (reports, RT structures) are skipped and counted by reason.

    Raises:
        DataError: ``root`` is not a folder.

    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    if not root.is_dir():
        raise DataError(
            f"DICOM input '{root.name}' is not a folder; point the input at a folder of DICOM files"
        )
    index = DicomIndex()
    groups: dict[str, list[tuple[Path, Any]]] = defaultdict(list)
    for path in _walk(root):
        try:
            if path.stat().st_size == 0:
                index.skipped["empty file"] += 1
                continue
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except InvalidDicomError:
            index.skipped["not DICOM"] += 1
            continue
        except PermissionError:
            index.skipped["no read permission"] += 1
            continue
        except (OSError, ValueError, EOFError, AttributeError, KeyError, TypeError):
            index.skipped["damaged header"] += 1
            continue
        cosines, _ = _header_geometry(header)
        if cosines is None or "Rows" not in header:
            index.skipped["not an image with geometry"] += 1
            continue
        groups[_series_uid(path, header)].append((path, header))
    for uid, members in sorted(groups.items(), key=lambda item: series_key(item[0])):
        first = members[0][1]
        cosines, _ = _header_geometry(first)
        frames = sum(_header_geometry(header)[1] for _, header in members)
        index.series.append(
            DicomSeries(
                uid=uid,
                key=series_key(uid),
                modality=str(first.get("Modality", "")),
                description=str(first.get("SeriesDescription", "")),
                orientation=orientation_of(cosines) if cosines is not None else "oblique",
                rows=int(first.Rows),
                columns=int(first.Columns),
                frames=frames,
                multiframe=any(_header_geometry(header)[1] > 1 for _, header in members),
                files=tuple(path for path, _ in members),
            )
        )
    return index


def _series_uid(path: Path, header: Any) -> str:
    """SeriesInstanceUID; for anonymised files without one, the folder, series number and modality."""
    uid = str(header.get("SeriesInstanceUID", "") or "")
    if uid:
        return uid
    return f"{path.parent.resolve()}|{header.get('SeriesNumber', '')}|{header.get('Modality', '')}"


def select_series(index: DicomIndex, rules: SeriesRules) -> list[DicomSeries]:
    """The series of ``index`` that satisfy every rule, in key order."""
    pattern = re.compile(rules.description, re.IGNORECASE) if rules.description else None
    wanted = {modality.upper() for modality in rules.modality}
    return [
        series
        for series in index.series
        if (series.modality.upper() in wanted if wanted else series.modality.upper() not in LABEL_MODALITIES)
        and (pattern is None or pattern.search(series.description))
        and series.frames >= rules.min_slices
        and (rules.orientation == "any" or series.orientation == rules.orientation)
    ]


@dataclass(frozen=True)
class _Slice:
    """One 2D frame: pixels ``(rows, columns)`` float32 after rescale, and its geometry."""

    pixels: np.ndarray
    position: np.ndarray
    cosines: np.ndarray
    spacing: tuple[float, float]
    label: str  # "instance 12" or "instance 1, frame 3", for messages


def find_series(folder: Path, rules: SeriesRules | None = None) -> DicomSeries:
    """The one image series under ``folder`` that ``rules`` select (default: any image series).

    Raises:
        DataError: none or several series match (their keys are named).

    """
    found = select_series(index_dicom(folder), rules or SeriesRules())
    if len(found) != 1:
        keys = ", ".join(series.key for series in found) or "none"
        raise DataError(
            f"the DICOM folder holds {len(found)} image series matching the rules ({keys}); point at a "
            "folder with exactly one series, or select one (ingest.series)"
        )
    return found[0]


def read_series(series: DicomSeries, *, max_gib: float = 8.0) -> Volume:
    """Build the series' volume: ``(1, x, y, z)`` float32 in RAS+ order with its affine (mm).

    Raises:
        DataError: the series would need more than ``max_gib`` GiB, an instance lacks pixel
            data or is truncated, sizes differ within the series, or the geometry is not a
            regular grid (non-parallel slices, duplicate positions, missing slices,
            non-uniform spacing, gantry tilt); the message names the series key and slice.

    """
    needed = series.rows * series.columns * series.frames * 4 / 2**30
    if needed > max_gib:
        raise DataError(
            f"series {series.key}: {series.frames} slices of {series.columns}x{series.rows} need "
            f"{needed:.1f} GiB, over the {max_gib:g} GiB limit; check the headers or raise the limit"
        )
    slices = [
        frame
        for number, path in enumerate(series.files, start=1)
        for frame in _read_frames(series, number, path)
    ]
    return _assemble(series, slices)


def _read_frames(series: DicomSeries, number: int, path: Path) -> list[_Slice]:
    import pydicom

    name = f"series {series.key}, file {number}"
    try:
        dataset = pydicom.dcmread(path)
    except Exception as exc:  # pydicom raises many types for damaged files
        raise DataError(f"{name}: cannot be read ({type(exc).__name__}); the file is damaged") from exc
    if not any(tag in dataset for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise DataError(f"{name}: has no pixel data; remove it from the series folder")
    if (int(dataset.Rows), int(dataset.Columns)) != (series.rows, series.columns):
        raise DataError(
            f"{name}: {dataset.Columns}x{dataset.Rows} pixels where the series has "
            f"{series.columns}x{series.rows}; the series mixes images of different sizes"
        )
    try:
        pixels = np.asarray(dataset.pixel_array, dtype=np.float32)
    except Exception as exc:  # truncated pixel data, missing codec, bad encapsulation
        raise DataError(
            f"{name}: pixel data cannot be decoded ({type(exc).__name__}: {str(exc)[:120]}); "
            "the file is truncated or uses an unsupported compression"
        ) from exc
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if frames == 1:
        pixels = pixels.reshape(1, series.rows, series.columns)
    slice_name = (
        f"instance {dataset.InstanceNumber}"
        if dataset.get("InstanceNumber") is not None
        else f"file {number}"
    )
    if "PerFrameFunctionalGroupsSequence" in dataset:
        return [
            _enhanced_frame(dataset, index, pixels[index], f"{slice_name}, frame {index + 1}", series.key)
            for index in range(frames)
        ]
    slope, intercept = (
        float(dataset.get("RescaleSlope", 1) or 1),
        float(dataset.get("RescaleIntercept", 0) or 0),
    )
    spacing = dataset.get("PixelSpacing", [1.0, 1.0])
    return [
        _Slice(
            pixels=pixels[0] * slope + intercept,
            position=np.asarray(dataset.ImagePositionPatient, dtype=float),
            cosines=np.asarray(dataset.ImageOrientationPatient, dtype=float),
            spacing=(float(spacing[0]), float(spacing[1])),
            label=slice_name,
        )
    ]


def _functional(dataset: Any, index: int, sequence: str) -> Any:
    """An item of functional-group ``sequence`` for frame ``index`` (per-frame, else shared)."""
    frame = dataset.PerFrameFunctionalGroupsSequence[index]
    if sequence in frame:
        return frame[sequence].value[0]
    shared = dataset.get("SharedFunctionalGroupsSequence")
    if shared and sequence in shared[0]:
        return shared[0][sequence].value[0]
    return None


def _enhanced_frame(dataset: Any, index: int, pixels: np.ndarray, label: str, key: str) -> _Slice:
    position = _functional(dataset, index, "PlanePositionSequence")
    orientation = _functional(dataset, index, "PlaneOrientationSequence")
    measures = _functional(dataset, index, "PixelMeasuresSequence")
    if position is None or orientation is None or measures is None:
        raise DataError(
            f"{label}: lacks plane position, orientation or pixel spacing; cannot place it in space"
        )
    transform = _functional(dataset, index, "PixelValueTransformationSequence")
    slope = float(transform.get("RescaleSlope", 1)) if transform is not None else 1.0
    intercept = float(transform.get("RescaleIntercept", 0)) if transform is not None else 0.0
    return _Slice(
        pixels=pixels * slope + intercept,
        position=np.asarray(position.ImagePositionPatient, dtype=float),
        cosines=np.asarray(orientation.ImageOrientationPatient, dtype=float),
        spacing=(float(measures.PixelSpacing[0]), float(measures.PixelSpacing[1])),
        label=label,
    )


def stored_grid_affine(
    cosines: np.ndarray, pixel_spacing: tuple[float, float], first_position: np.ndarray, slice_step: float
) -> np.ndarray:
    """RAS affine ``(4, 4)`` of a series' voxel grid as stored: ``(columns, rows, slices)``.

    x runs along a row (column index), y down the columns (row index), z along the normal.

    Args:
        cosines: ImageOrientationPatient (row direction, then column direction; LPS).
        pixel_spacing: PixelSpacing (between rows, between columns), mm.
        first_position: ImagePositionPatient of the first slice along the normal (LPS, mm).
        slice_step: distance between slices along the normal, mm.

    """
    row_direction, column_direction = cosines[:3], cosines[3:]
    row_spacing, column_spacing = pixel_spacing
    lps = np.eye(4)
    lps[:3, 0] = row_direction * column_spacing
    lps[:3, 1] = column_direction * row_spacing
    lps[:3, 2] = np.cross(row_direction, column_direction) * slice_step
    lps[:3, 3] = first_position
    return LPS_TO_RAS @ lps


def _assemble(series: DicomSeries, slices: list[_Slice]) -> Volume:
    """Sort, check and stack slices into a RAS+ volume."""
    first = slices[0]
    for item in slices[1:]:
        if np.abs(item.cosines - first.cosines).max() > _DIRECTION_TOLERANCE:
            raise DataError(
                f"{item.label}: orientation differs from the rest of the series; slices are not parallel"
            )
        if np.abs(np.subtract(item.spacing, first.spacing)).max() > _POSITION_TOLERANCE:
            raise DataError(
                f"{item.label}: pixel spacing {item.spacing} differs from {first.spacing} in the series"
            )
    normal = np.cross(first.cosines[:3], first.cosines[3:])
    slices = sorted(slices, key=lambda item: float(normal @ item.position))
    distances = np.array([float(normal @ item.position) for item in slices])
    steps = np.diff(distances)
    if len(slices) > 1:
        duplicate = int(np.argmin(steps))
        if steps[duplicate] < _POSITION_TOLERANCE:
            raise DataError(
                f"series {series.key}: {slices[duplicate].label} and {slices[duplicate + 1].label} lie "
                "at the same position; remove the duplicate slice"
            )
        median = float(np.median(steps))
        worst = int(np.argmax(np.abs(steps - median)))
        if abs(steps[worst] - median) > _SPACING_TOLERANCE * median:
            gap = steps[worst] / median
            cause = f"about {round(gap) - 1} missing slice(s)" if gap > 1.5 else "non-uniform spacing"
            raise DataError(
                f"series {series.key}: slices are {median:.3f} mm apart but {steps[worst]:.3f} mm between "
                f"{slices[worst].label} and {slices[worst + 1].label} ({cause}); supply the complete series "
                "or resample it to uniform spacing first"
            )
        offset = slices[-1].position - slices[0].position
        tilt = math.degrees(math.acos(min(1.0, abs(float(normal @ offset)) / float(np.linalg.norm(offset)))))
        if tilt > _TILT_TOLERANCE_DEGREES:
            raise DataError(
                f"series {series.key}: slices from {slices[0].label} to {slices[-1].label} are stacked "
                f"{tilt:.2f}° off their normal (gantry tilt); resample the series to an orthogonal grid first"
            )
        slice_step = median
    else:
        slice_step = 1.0
    stack = np.empty((series.columns, series.rows, len(slices)), np.float32)  # (x, y, z)
    for index, item in enumerate(slices):
        stack[:, :, index] = item.pixels.T
    if not np.isfinite(stack).all():
        raise DataError(f"series {series.key}: pixel values include NaN or infinity; the data is corrupt")
    ras = stored_grid_affine(first.cosines, first.spacing, slices[0].position, slice_step)
    array, affine = to_ras(stack, ras)
    meta = {"modality": series.modality, "series": series.key}
    return Volume(array[None], affine, kind="image", meta=meta)


def read_dicom_seg(path: Path, *, highest_wins: bool = False) -> Volume:
    """A DICOM SEG object as one label map: ``(1, x, y, z)`` int32 in RAS+, segment numbers as values.

    Overlapping segments are refused, or with ``highest_wins`` the highest segment number
    takes each shared voxel.

    Read with highdicom. The volume covers the frames the SEG holds (sparse objects may
    cover only part of the source series); place it on the source image's grid with
    ``medseg.io.geometry.resample_to_grid`` (nearest neighbour, exact when the grids agree).

    Raises:
        DataError: the file is not a DICOM SEG, its frames do not form a regular volume, or
            segments overlap and ``highest_wins`` is off.

    """
    import highdicom as hd

    try:
        segmentation = hd.seg.segread(path)
    except Exception as exc:  # highdicom/pydicom raise many types for foreign or damaged files
        raise DataError(
            f"{path.name}: not a readable DICOM SEG ({type(exc).__name__}); check the label file"
        ) from exc
    try:
        volume = segmentation.get_volume(
            combine_segments=True, relabel=False, dtype=np.int32, skip_overlap_checks=highest_wins
        )
    except (ValueError, RuntimeError) as exc:
        text = str(exc)
        cause = (
            "segments overlap, so they cannot share one label map"
            if "overlap" in text.lower()
            else text[:160]
        )
        raise DataError(
            f"{path.name}: {cause}; set ingest.segment_overlap: highest, or export non-overlapping segments"
        ) from exc
    ras = LPS_TO_RAS @ np.asarray(volume.affine, dtype=np.float64)
    array, affine = to_ras(np.asarray(volume.array, dtype=np.int32), ras)
    return Volume(array[None], affine, kind="label", meta={"modality": "SEG"})
