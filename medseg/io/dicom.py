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

import contextlib
import functools
import hashlib
import math
import mmap
import multiprocessing
import os
import re
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from medseg.errors import DataError
from medseg.io.geometry import LPS_TO_RAS, to_ras
from medseg.io.volume import Volume
from medseg.params import Params
from medseg.threads import compute_threads

Orientation = Literal["axial", "coronal", "sagittal", "oblique"]
ImageKind = Literal["magnitude", "phase", "real", "imaginary", "derived"]
Scaling = Literal["display", "precise"]
_STACK_WORDS = {
    "image_type": str,
    "echo": lambda value: f"echo {value}",
    "temporal_index": lambda value: f"time point {value}",
    "b_value": lambda value: f"b={value:g}",
    "acquisition": lambda value: f"acquisition {value}",
}
"""How each stack field reads in a listing; also the order in which fields split a series."""
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
    stack: tuple[tuple[str, object], ...] = ()
    fields: tuple[tuple[str, object], ...] = ()
    transfer_syntax: str = ""
    philips: bool = False  # Philips private scaling present: display or precise values

    @property
    def stack_label(self) -> str:
        """``magnitude, echo 2`` — what sets this stack apart within its series (``""`` if alone)."""
        return ", ".join(_STACK_WORDS[name](value) for name, value in self.stack)

    @property
    def selector(self) -> dict[str, object]:
        """The ``ingest.series`` rules that select this stack among its series' stacks."""
        return dict(self.stack)

    def listing(self) -> dict[str, object]:
        """A PHI-free row describing the series."""
        return {
            "series": self.key,
            "modality": self.modality,
            "description": self.description,
            "stack": self.stack_label or "-",
            "slices": self.frames,
            "size": f"{self.columns}x{self.rows}",
            "orientation": self.orientation,
            "multiframe": self.multiframe,
            "syntax": self.transfer_syntax,
            "scaling": "philips display/precise" if self.philips else "rescale",
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

    A series that holds several stacks at the same positions (magnitude and phase, echoes,
    DCE time points, diffusion b-values, repeated acquisitions) is split into stacks;
    ``image_type``, ``echo`` (EchoNumbers), ``temporal_index`` (0-based, in order of
    TemporalPositionIdentifier or TriggerTime), ``b_value`` (s/mm²) and ``acquisition``
    (AcquisitionNumber) select one, or ``channels`` stacks the stacks that differ in that
    field as image channels (multi-echo, DCE), in increasing order of its value.
    ``philips_scaling``: Philips MR stores display values (RescaleSlope/Intercept, the default
    here and in viewers) and, with its private scale slope, precise (quantitative) values
    ``(stored · RS + RI) / (RS · SS)`` — ``precise`` takes those (dcm2niix's default).
    """

    modality: tuple[str, ...] = ()
    description: str | None = None
    min_slices: int = 1
    orientation: Literal["any", "axial", "coronal", "sagittal", "oblique"] = "any"
    image_type: ImageKind | None = None
    echo: int | None = None
    temporal_index: int | None = None
    b_value: float | None = None
    acquisition: int | None = None
    channels: Literal["none", "image_type", "echo", "temporal_index", "b_value", "acquisition"] = "none"
    philips_scaling: Scaling = "display"


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
        stacks = split_stacks(members)
        for number, (stack, fields, stack_members) in enumerate(stacks, start=1):
            first = stack_members[0][1]
            cosines, _ = _header_geometry(first)
            syntax = getattr(getattr(first, "file_meta", None), "TransferSyntaxUID", None)
            index.series.append(
                DicomSeries(
                    uid=uid,
                    key=series_key(uid) if len(stacks) == 1 else f"{series_key(uid)}.{number}",
                    modality=str(first.get("Modality", "")),
                    description=str(first.get("SeriesDescription", "")),
                    orientation=orientation_of(cosines) if cosines is not None else "oblique",
                    rows=int(first.Rows),
                    columns=int(first.Columns),
                    frames=sum(_header_geometry(header)[1] for _, header in stack_members),
                    multiframe=any(_header_geometry(header)[1] > 1 for _, header in stack_members),
                    files=tuple(path for path, _ in stack_members),
                    stack=stack,
                    fields=fields,
                    transfer_syntax=syntax.name if syntax is not None else "",
                    philips=philips_scale_slope(first) is not None,
                )
            )
    return index


_PART_TOKEN = re.compile(r"(?:^|_)(M|P|R|I)(?:_|$)")
_PART_WORDS = {"M": "magnitude", "P": "phase", "R": "real", "I": "imaginary"}
_GE_PART = {0: "magnitude", 1: "phase", 2: "real", 3: "imaginary"}


def _image_kind(header: Any) -> str | None:
    """The image kind: magnitude, phase, real or imaginary, derived, or None.

    Read from ImageType (Siemens ``M``/``P``, Philips ``M_FFE``/``P_FFE``) or GE's private
    (0043,102F); ``derived`` for other derived images.
    """
    tokens = [str(token).upper() for token in header.get("ImageType", [])]
    for token in tokens[2:]:
        for word in ("MAGNITUDE", "PHASE", "REAL", "IMAGINARY"):
            if token == word:
                return word.lower()
        match = _PART_TOKEN.search(token)
        if match:
            return _PART_WORDS[match.group(1)]
    ge = header.get((0x0043, 0x102F))
    if ge is not None:
        with contextlib.suppress(TypeError, ValueError):
            return _GE_PART.get(int(ge.value))
    return "derived" if tokens[:1] == ["DERIVED"] else None


def _b_value(header: Any) -> float | None:
    """Diffusion b-value (s/mm²): DiffusionBValue, Siemens (0019,100C), GE (0043,1039) mod 1e9."""
    for tag in ((0x0018, 0x9087), (0x0019, 0x100C), (0x0043, 0x1039)):
        element = header.get(tag)
        value = _first_number(element.value) if element is not None else None
        if value is not None:
            return value % 1e9 if tag == (0x0043, 0x1039) else value
    return None


def _first_number(value: Any) -> float | None:
    """The first number of a DICOM value: a number, a multi-value, or private text bytes."""
    if isinstance(value, bytes):
        value = value.decode(errors="ignore").strip("\x00 ").split("\\")[0]
    if not isinstance(value, str) and hasattr(value, "__len__"):
        value = value[0] if len(value) else None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _integer(header: Any, keyword: str) -> int | None:
    value = header.get(keyword)
    return int(value) if value not in (None, "") else None


def _raw_fields(header: Any) -> dict[str, object]:
    temporal = header.get("TemporalPositionIdentifier")
    if temporal is None:
        temporal = header.get("TriggerTime")
    return {
        "image_type": _image_kind(header),
        "echo": _integer(header, "EchoNumbers"),
        "temporal_index": float(temporal) if temporal not in (None, "") else None,
        "b_value": _b_value(header),
        "acquisition": _integer(header, "AcquisitionNumber"),
    }


def split_stacks(
    members: list[tuple[Path, Any]],
) -> list[tuple[tuple[tuple[str, object], ...], tuple[tuple[str, object], ...], list[tuple[Path, Any]]]]:
    """Split one series' instances into stacks that each place one slice per position.

    Only a series whose single-frame instances repeat positions is split, by the fields that
    tell its stacks apart (image type, echo, time point, b-value, acquisition — in that order,
    as few as it takes). ``temporal_index`` values become 0-based ranks.

    Returns:
        ``(stack, fields, members)`` per stack, sorted by stack values: ``stack`` the fields
        that set it apart, ``fields`` every field constant within it (for selection rules).

    """
    raw = [_raw_fields(header) for _, header in members]
    times = sorted({fields["temporal_index"] for fields in raw if fields["temporal_index"] is not None})
    for fields in raw:
        if fields["temporal_index"] is not None:
            fields["temporal_index"] = times.index(fields["temporal_index"])
    positions = [_position_key(header) for _, header in members]
    chosen: list[str] = []
    if None not in positions and len(set(positions)) < len(positions):
        for name in _STACK_WORDS:
            if len({fields[name] for fields in raw}) < 2:
                continue
            chosen.append(name)
            groups = _group(raw, positions, chosen)
            if all(len(set(group_positions)) == len(group_positions) for group_positions in groups.values()):
                break
    grouped: dict[tuple[object, ...], list[int]] = defaultdict(list)
    for index, fields in enumerate(raw):
        grouped[tuple(fields[name] for name in chosen)].append(index)
    result = []
    for values, indices in sorted(grouped.items(), key=lambda item: tuple(str(v) for v in item[0])):
        constant = tuple(
            (name, raw[indices[0]][name])
            for name in _STACK_WORDS
            if raw[indices[0]][name] is not None and len({raw[i][name] for i in indices}) == 1
        )
        result.append((tuple(zip(chosen, values, strict=True)), constant, [members[i] for i in indices]))
    return result


def _position_key(header: Any) -> tuple[float, ...] | None:
    if int(header.get("NumberOfFrames", 1) or 1) > 1 or header.get("ImagePositionPatient") is None:
        return None
    return tuple(round(float(value), 2) for value in header.ImagePositionPatient)


def _group(
    raw: list[dict[str, object]], positions: list[Any], names: list[str]
) -> dict[tuple[object, ...], list[Any]]:
    groups: dict[tuple[object, ...], list[Any]] = defaultdict(list)
    for fields, position in zip(raw, positions, strict=True):
        groups[tuple(fields[name] for name in names)].append(position)
    return groups


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
    stack_rules = {name: getattr(rules, name) for name in _STACK_WORDS if getattr(rules, name) is not None}
    return [
        series
        for series in index.series
        if (series.modality.upper() in wanted if wanted else series.modality.upper() not in LABEL_MODALITIES)
        and (pattern is None or pattern.search(series.description))
        and series.frames >= rules.min_slices
        and (rules.orientation == "any" or series.orientation == rules.orientation)
        and all(dict(series.fields).get(name) == value for name, value in stack_rules.items())
    ]


@dataclass(frozen=True)
class _Slice:
    """One 2D frame: pixels ``(rows, columns)`` float32 after rescale, and its geometry."""

    pixels: np.ndarray
    position: np.ndarray
    cosines: np.ndarray
    spacing: tuple[float, float]
    label: str  # "instance 12" or "instance 1, frame 3", for messages
    thickness: float = 0.0  # SliceThickness (mm): the spacing of a lone slice


def find_series(folder: Path, rules: SeriesRules | None = None) -> DicomSeries:
    """The one image series (or stack) under ``folder`` that ``rules`` select (default: any).

    Raises:
        DataError: none or several series match (their keys are named); several stacks of one
            series match (each stack is listed with the rule that selects it).

    """
    found = select_series(index_dicom(folder), rules or SeriesRules())
    if len(found) != 1:
        raise _ambiguous(found)
    return found[0]


def find_stacks(folder: Path, rules: SeriesRules) -> list[DicomSeries]:
    """The stacks of one series under ``folder`` to read as channels (``rules.channels``), in order.

    Raises:
        DataError: the matching stacks are not of one series, differ in more than the channel
            field, or fewer than two match.

    """
    found = select_series(index_dicom(folder), rules)
    field_name = rules.channels
    if len({series.uid for series in found}) != 1 or len(found) < 2:
        raise DataError(
            f"ingest.series.channels: {field_name} needs two or more stacks of one series; "
            f"{len(found)} stack(s) of {len({series.uid for series in found})} series match the rules"
        )
    values = [dict(series.fields).get(field_name) for series in found]
    others = {tuple(item for item in series.stack if item[0] != field_name) for series in found}
    if None in values or len(set(values)) != len(values) or len(others) > 1:
        raise _ambiguous(found, f" (channels by {field_name} need stacks that differ in {field_name} only)")
    return [series for _, series in sorted(zip(values, found, strict=True), key=lambda item: item[0])]


def _ambiguous(found: list[DicomSeries], note: str = "") -> DataError:
    """The error for a selection that is not one series: what matched, and how to pick."""
    if len({series.uid for series in found}) == 1 and len(found) > 1:
        base = found[0].key.rsplit(".", 1)[0]
        stacks = "; ".join(
            f"{series.stack_label} ({series.frames} slices): "
            + ", ".join(f"ingest.series.{name}: {value}" for name, value in series.selector.items())
            for series in found
        )
        fields = sorted({name for series in found for name in series.selector})
        return DataError(
            f"series {base} holds {len(found)} stacks at the same positions{note} — {stacks}; "
            f"select one, or read them as channels (ingest.series.channels: {fields[0]})"
        )
    keys = ", ".join(series.key for series in found) or "none"
    return DataError(
        f"the DICOM folder holds {len(found)} image series matching the rules ({keys}); point at a "
        "folder with exactly one series, or select one (ingest.series)"
    )


def read_stacks(stacks: list[DicomSeries], *, max_gib: float = 8.0, scaling: Scaling = "display") -> Volume:
    """Read stacks of one series on one grid as channels: ``(len(stacks), x, y, z)`` float32, RAS+.

    Raises:
        DataError: a stack does not share the first stack's grid (shape and affine).

    """
    volumes = [read_series(stack, max_gib=max_gib / len(stacks), scaling=scaling) for stack in stacks]
    first = volumes[0]
    for stack, volume in zip(stacks[1:], volumes[1:], strict=True):
        if volume.spatial_shape != first.spatial_shape or not np.allclose(
            volume.affine, first.affine, atol=_POSITION_TOLERANCE
        ):
            raise DataError(
                f"series {stack.key} ({stack.stack_label}): its grid {volume.spatial_shape} differs from "
                f"{stacks[0].key}'s {first.spatial_shape}; stacks read as channels must share one grid"
            )
    array = np.concatenate([volume.array for volume in volumes])
    return Volume(
        array, first.affine, kind="image", meta={**first.meta, "channels": [s.stack_label for s in stacks]}
    )


def read_series(
    series: DicomSeries, *, max_gib: float = 8.0, scaling: Scaling = "display", workers: int | None = None
) -> Volume:
    """Build the series' volume: ``(1, x, y, z)`` float32 in RAS+ order with its affine (mm).

    The files of a large single-frame series are decoded by ``workers`` forked processes
    (default: the allowed CPUs, or ``OMP_NUM_THREADS``); the decoders (OpenJPEG, libjpeg, RLE)
    hold the GIL, so threads would not help. The volume is the same voxel for voxel.

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
    workers = _decode_workers(series, compute_threads(None, os.environ) if workers is None else workers)
    if workers > 1:
        slices, pixels = _read_frames_parallel(series, scaling, workers)
        volume = _assemble(series, slices, pixels)
    else:
        slices = [
            frame
            for number, path in enumerate(series.files, start=1)
            for frame in _read_frames(series, number, path, scaling)
        ]
        volume = _assemble(series, slices)
    vendor = "philips " if series.philips else ""
    volume.meta["scaling"] = f"{vendor}{scaling if series.philips else 'display'}"
    return volume


_PARALLEL_MIN_FILES = 32
"""Smaller series are decoded in-process: starting workers would cost more than it saves."""
_FILES_PER_TASK = 16


def _decode_workers(series: DicomSeries, allowed: int) -> int:
    """Processes to decode ``series`` with: 1 unless it is large, single-frame and fork exists."""
    if (
        series.multiframe
        or len(series.files) < _PARALLEL_MIN_FILES
        or "fork" not in multiprocessing.get_all_start_methods()
        or not sys.platform.startswith("linux")  # fork is unsafe beside macOS system frameworks
        or multiprocessing.current_process().daemon  # a daemonic process may not have children
    ):
        return 1
    return max(1, min(allowed, len(series.files) // _FILES_PER_TASK))


_shared: tuple[DicomSeries, Scaling, np.ndarray] | None = None
"""In a decode worker: the series, the scaling and the shared ``(files, rows, columns)`` pixels."""


def _share(series: DicomSeries, scaling: Scaling, pixels: np.ndarray) -> None:
    global _shared  # one per forked worker process, set once at its start
    _shared = (series, scaling, pixels)


def _decode_task(numbers: list[int]) -> list[_Slice]:
    """Decode files ``numbers`` (1-based) into the shared pixels; return their slices without pixels."""
    if _shared is None:
        raise RuntimeError("decode task outside a decode worker")
    series, scaling, pixels = _shared
    slices = []
    for number in numbers:
        (frame,) = _read_frames(series, number, series.files[number - 1], scaling)
        pixels[number - 1] = frame.pixels
        slices.append(replace(frame, pixels=np.empty(0, np.float32)))
    return slices


def _read_frames_parallel(
    series: DicomSeries, scaling: Scaling, workers: int
) -> tuple[list[_Slice], np.ndarray]:
    """``_read_frames`` of every (single-frame) file by ``workers`` forked processes, in file order.

    The workers write pixels into anonymous shared memory made before they fork and send back
    only the geometry; a worker's ``DataError`` is raised here. Returns the slices (pixels as
    views) and the shared pixels ``(files, rows, columns)`` float32.
    """
    count = len(series.files)
    buffer = mmap.mmap(-1, count * series.rows * series.columns * 4)
    pixels = np.frombuffer(buffer, np.float32).reshape(count, series.rows, series.columns)
    numbers = list(range(1, count + 1))
    tasks = [numbers[start : start + _FILES_PER_TASK] for start in range(0, count, _FILES_PER_TASK)]
    context = multiprocessing.get_context("fork")
    with context.Pool(workers, initializer=_share, initargs=(series, scaling, pixels)) as pool:
        decoded = [frame for task in pool.imap(_decode_task, tasks) for frame in task]
    return [replace(frame, pixels=pixels[index]) for index, frame in enumerate(decoded)], pixels


def _read_frames(series: DicomSeries, number: int, path: Path, scaling: Scaling) -> list[_Slice]:
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
    syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is not None and syntax.is_compressed and not _can_decode(syntax):
        raise DataError(
            f"{name}: transfer syntax {syntax.name} ({syntax}) has no decoder installed; convert the "
            "series to an uncompressed or common compressed syntax (e.g. with dcmdjpeg or gdcmconv)"
        )
    if syntax is not None and syntax.is_compressed:
        dataset.pixel_array_options(decoding_plugin=_decoding_plugin(str(syntax)))
    try:
        pixels = np.asarray(dataset.pixel_array, dtype=np.float32)
    except Exception as exc:  # truncated pixel data, bad encapsulation
        where = f" ({syntax.name})" if syntax is not None else ""
        raise DataError(
            f"{name}: pixel data cannot be decoded{where} ({type(exc).__name__}: {str(exc)[:120]}); "
            "the file is truncated or damaged"
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
        slices = [
            _enhanced_frame(dataset, index, pixels[index], f"{slice_name}, frame {index + 1}", series.key)
            for index in range(frames)
        ]
    else:
        spacing = dataset.get("PixelSpacing", [1.0, 1.0])
        slices = [
            _Slice(
                pixels=_scaled(dataset, pixels[0], scaling),
                position=np.asarray(dataset.ImagePositionPatient, dtype=float),
                cosines=np.asarray(dataset.ImageOrientationPatient, dtype=float),
                spacing=(float(spacing[0]), float(spacing[1])),
                label=slice_name,
                thickness=float(dataset.get("SliceThickness") or 0.0),
            )
        ]
    for item in slices:
        if not np.isfinite(item.pixels).all():
            raise DataError(f"{name} ({item.label}): pixel values include NaN or infinity; file corrupt")
    return slices


PHILIPS_SCALE_SLOPE = (0x2005, 0x100E)
"""Philips' private Scale Slope (SS): precise value = (stored · RS + RI) / (RS · SS)."""


def philips_scale_slope(dataset: Any) -> float | None:
    """Philips' private scale slope of an instance, or None (another vendor, or absent)."""
    if "PHILIPS" not in str(dataset.get("Manufacturer", "")).upper():
        return None
    element = dataset.get(PHILIPS_SCALE_SLOPE)
    value = _first_number(element.value) if element is not None else None
    return value if value else None


def _scaled(dataset: Any, pixels: np.ndarray, scaling: Scaling) -> np.ndarray:
    """Stored values → real values: the modality rescale (display values), or Philips' precise values."""
    slope = float(dataset.get("RescaleSlope", 1) or 1)
    intercept = float(dataset.get("RescaleIntercept", 0) or 0)
    display = pixels * slope + intercept
    scale_slope = philips_scale_slope(dataset) if scaling == "precise" else None
    return display / (slope * scale_slope) if scale_slope else display


_JPEG_2000 = ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91")
_JPEG_LS = ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81")
_JPEG = tuple(f"1.2.840.10008.1.2.4.{number}" for number in (50, 51, 57, 70))
_FASTEST_DECODERS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(_JPEG_2000, ("pylibjpeg", "gdcm", "pillow")),
    **dict.fromkeys(_JPEG_LS, ("pyjpegls", "gdcm", "pylibjpeg")),
    **dict.fromkeys(_JPEG, ("gdcm", "pylibjpeg", "pillow")),
}
"""pydicom decoding plugins per transfer syntax UID, fastest first; all voxel-identical on lossless data.

Measured per 512² 16-bit CT slice on 2 CPU cores: JPEG 2000 GDCM 16 ms, OpenJPEG (pylibjpeg)
25 ms, Pillow 27 ms; JPEG-LS CharLS (pyjpegls) 4.9 ms, GDCM 6.7 ms, libjpeg (pylibjpeg) 18.8 ms;
JPEG lossless GDCM 6.3 ms, libjpeg 9.8 ms. GDCM also decodes lossy JPEG as SimpleITK does.
Other syntaxes (RLE, HTJ2K) keep pydicom's choice.
"""


@functools.cache
def _decoding_plugin(syntax: str) -> str:
    """The fastest installed pydicom plugin for transfer syntax UID ``syntax`` (``""``: pydicom's choice)."""
    from pydicom.pixels import get_decoder

    available = get_decoder(syntax).available_plugins
    return next((plugin for plugin in _FASTEST_DECODERS.get(syntax, ()) if plugin in available), "")


def _can_decode(syntax: Any) -> bool:
    """Whether an installed plugin decodes pixel data of transfer syntax ``syntax``."""
    from pydicom.pixels import get_decoder

    try:
        return bool(get_decoder(syntax).is_available)
    except NotImplementedError:  # a syntax pydicom knows no decoder for at all
        return False


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


def _assemble(series: DicomSeries, slices: list[_Slice], pixels: np.ndarray | None = None) -> Volume:
    """Sort, check and stack slices into a RAS+ volume.

    ``pixels`` ``(len(slices), rows, columns)``, when given, holds the slices' pixels in the
    order of ``slices`` (the parallel decoders' shared buffer); it is used without a copy when
    the files are already in position order (or its reverse).
    """
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
    order = np.argsort([float(normal @ item.position) for item in slices], kind="stable")
    slices = [slices[index] for index in order]
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
        slice_step = first.thickness or 1.0  # a lone slice: its thickness, as dcm2niix and ITK take it
    stack = _stacked(pixels, order) if pixels is not None else np.stack([item.pixels for item in slices])
    ras = stored_grid_affine(first.cosines, first.spacing, slices[0].position, slice_step)
    array, affine = to_ras(stack.transpose(2, 1, 0), ras)  # one (threaded) copy into RAS+ order
    meta = {"modality": series.modality, "series": series.key}
    return Volume(array[None], affine, kind="image", meta=meta)


def _stacked(pixels: np.ndarray, order: np.ndarray) -> np.ndarray:
    """``pixels[order]`` ``(slices, rows, columns)``, a view when ``order`` runs forwards or backwards."""
    steps = np.diff(order)
    if (steps == 1).all():
        return pixels[order[0] : order[-1] + 1]
    if (steps == -1).all():
        return pixels[order[0] :: -1][: len(order)]
    return pixels[order]


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
