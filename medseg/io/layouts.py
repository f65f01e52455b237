"""Dataset layouts on disk: discover (image, label) pairs in a source folder.

Each layout is one entry of ``LAYOUTS`` (name → ``discover(root, params)``); a new layout
is a function here and one ``LAYOUTS.register`` line, or a function an installed package declares
under the entry-point group ``medseg.layouts``. medseg's own layouts:

- ``ctc``: the Cell Tracking Challenge layout — frames ``<seq>/t<T>.tif``, instance masks
  ``<seq>_GT/SEG/man_seg<T>.tif`` and tracking markers ``<seq>_GT/TRA/man_track<T>.tif``.
  Only frames with a SEG mask are cases.
- ``paired``: ``images/<name>.<ext>`` with ``labels/<name>.<ext>`` of the same stem.
- ``msd``: the Medical Segmentation Decathlon / nnU-Net layout — ``dataset.json`` with
  ``imagesTr/`` and ``labelsTr/`` (MSD's ``training`` list, or nnU-Net v2's
  ``<case>_0000<file_ending>`` images with ``<case><file_ending>`` labels); single channel.
- ``cases``: one folder per case (chosen by a glob), each holding an image — a file
  (NIfTI, NRRD, TIFF, PNG) or a folder of DICOM files — and a label file, both found by
  globs inside the case folder (``image*`` / ``label*`` by default).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medseg.errors import DataError
from medseg.io.readers import IMAGE_SUFFIXES, image_stem, image_suffix
from medseg.registry import Registry, callable_entry

if TYPE_CHECKING:
    from medseg.io.ingest import IngestParams

_CTC_FRAME = re.compile(r"^t(\d+)\.tiff?$", re.IGNORECASE)
_CTC_SEG = re.compile(r"^man_seg(\d+)\.tiff?$", re.IGNORECASE)
_CTC_TRA = re.compile(r"^man_track(\d+)\.tiff?$", re.IGNORECASE)


@dataclass(frozen=True)
class SourceCase:
    """One case found in a source folder.

    ``source_name`` is the case's name relative to the source root; it may identify a
    patient, so it stays in the workspace's private map and is never logged. ``frame`` is
    the time-point number of a CTC frame (not identifying), kept to write CTC results.
    """

    source_name: str
    image: Path
    label: Path
    marker: Path | None = None
    frame: int | None = None


def discover_ctc(root: Path, sequence: str) -> list[SourceCase]:
    """Return the annotated frames of CTC sequence ``sequence`` under ``root``, by frame number.

    Raises:
        DataError: the sequence folder or its ``_GT/SEG`` folder is missing.

    """
    frames_dir = root / sequence
    seg_dir = root / f"{sequence}_GT" / "SEG"
    tra_dir = root / f"{sequence}_GT" / "TRA"
    for folder in (frames_dir, seg_dir):
        if not folder.is_dir():
            raise DataError(
                f"CTC layout: folder '{folder.relative_to(root)}' not found in the data input; "
                f"expected '{sequence}/t*.tif' and '{sequence}_GT/SEG/man_seg*.tif' "
                "(set ingest.sequence or ingest.layout)"
            )
    frames = _index_by_number(frames_dir, _CTC_FRAME)
    markers = _index_by_number(tra_dir, _CTC_TRA) if tra_dir.is_dir() else {}
    cases = []
    for number, seg_path in sorted(_index_by_number(seg_dir, _CTC_SEG).items()):
        if number not in frames:
            raise DataError(
                f"CTC layout: {seg_path.name} has no frame t{number:03d}.tif in '{sequence}/'; "
                "add the frame or remove the mask"
            )
        cases.append(
            SourceCase(
                source_name=f"{sequence}/t{number:03d}",
                image=frames[number],
                label=seg_path,
                marker=markers.get(number),
                frame=number,
            )
        )
    return cases


def _index_by_number(folder: Path, pattern: re.Pattern[str]) -> dict[int, Path]:
    found: dict[int, Path] = {}
    for path in folder.iterdir():
        match = pattern.match(path.name)
        if match and path.is_file():
            found[int(match.group(1))] = path
    return found


def discover_paired(root: Path, images_dir: str, labels_dir: str) -> list[SourceCase]:
    """Return ``images_dir/<stem>`` files paired with ``labels_dir/<stem>`` label files.

    Raises:
        DataError: a folder is missing or an image has no label of the same stem.

    """
    image_root, label_root = root / images_dir, root / labels_dir
    for folder in (image_root, label_root):
        if not folder.is_dir():
            raise DataError(
                f"paired layout: folder '{folder.name}' not found in the data input; "
                f"expected '{images_dir}/' and '{labels_dir}/' (set ingest.images_dir/labels_dir)"
            )
    labels = {image_stem(p): p for p in label_root.iterdir() if image_suffix(p) in IMAGE_SUFFIXES}
    images = [path for path in sorted(image_root.iterdir()) if image_suffix(path) in IMAGE_SUFFIXES]
    cases = []
    for number, image in enumerate(images, start=1):
        stem = image_stem(image)
        if stem not in labels:
            raise DataError(
                f"paired layout: the image of case_{number:04d} (the {number}. image in name order) "
                f"has no label of the same name in '{labels_dir}/'; add the label or remove the image",
                local_detail=f"case_{number:04d} is '{image.name}' in '{images_dir}/'",
            )
        cases.append(SourceCase(source_name=stem, image=image, label=labels[stem]))
    return cases


def is_fully_annotated(label: np.ndarray, markers: np.ndarray | None) -> bool:
    """Whether every tracking marker lies on an annotated object.

    CTC SEG masks are often sparse: only some cells are outlined while the TRA markers mark
    every cell. A frame is fully annotated when each marker touches a SEG object. Without
    markers the frame is taken as fully annotated.

    Args:
        label: instance label image, any shape.
        markers: TRA marker image of the same shape, or ``None``.

    """
    if markers is None:
        return True
    present = np.unique(markers[markers > 0])
    covered = np.unique(markers[(markers > 0) & (label > 0)])
    return bool(np.array_equal(present, covered))


def unannotated_regions(label: np.ndarray, markers: np.ndarray, *, scale: float = 2.5) -> np.ndarray:
    """Where a sparsely annotated frame's unannotated objects lie: a mask to leave out of the loss.

    Every marker that touches no annotated object marks an object nobody outlined. Its region
    is the marker itself and a ball around the marker's centre of ``scale`` × the typical
    object radius of the frame (the median equivalent radius of its annotated objects:
    √(area/π) in 2D, ∛(3·volume/4π) in 3D), minus the annotated objects themselves.

    Args:
        label: instance labels ``(*spatial)`` (0 background).
        markers: CTC ``TRA`` markers of the same shape (one label per object).
        scale: how far past the typical radius the region reaches. On GOWT1 01 (6 minutes of
            planned training, 8 held-out frames) 1.5 cut large and elongated nuclei into pieces
            (outer parts taught as background: SEG 0.363, DET 0.862, 35 objects per frame for 24
            cells); 2.5 gave SEG 0.467, DET 0.967, 23 objects; 4.0 swallowed neighbours (DET 0.778).

    Returns:
        bool ``(*spatial)``; all False when every marker lies on an annotated object.

    """
    from scipy import ndimage

    uncovered = np.setdiff1d(np.unique(markers[markers > 0]), np.unique(markers[(markers > 0) & (label > 0)]))
    if uncovered.size == 0:
        return np.zeros(label.shape, bool)
    sizes = np.bincount(label.ravel().astype(np.int64, copy=False))[1:]
    sizes = sizes[sizes > 0]
    if sizes.size == 0:
        return np.ones(label.shape, bool)  # nothing outlined: the whole frame is unknown
    typical = float(np.median(sizes))
    radius = np.sqrt(typical / np.pi) if label.ndim == 2 else np.cbrt(3 * typical / (4 * np.pi))
    blobs = np.isin(markers, uncovered)
    centres = np.zeros(label.shape, bool)
    for centre in ndimage.center_of_mass(blobs, markers, uncovered):
        centres[tuple(round(value) for value in centre)] = True
    near = ndimage.distance_transform_edt(~centres) <= scale * radius
    return (near | blobs) & (label == 0)


_CTC_RESULT = re.compile(r"^mask(\d+)\.tiff?$", re.IGNORECASE)


def ctc_mask_name(frame: int) -> str:
    """File name of a CTC result mask: ``mask021.tif`` (4 digits past frame 999)."""
    return f"mask{frame:03d}.tif" if frame < 1000 else f"mask{frame:04d}.tif"


@dataclass(frozen=True)
class MaskPair:
    """A predicted label file and what it is scored against.

    ``reference`` is None for a CTC frame that has ``TRA`` markers but no ``SEG`` mask (it
    counts for DET only); ``markers`` is None without a ``TRA`` folder.
    """

    name: str
    prediction: Path
    reference: Path | None
    markers: Path | None = None


def pair_masks(predictions: Path, references: Path) -> list[MaskPair]:
    """Pair predicted and reference label files of two folders, by case name.

    CTC layout: ``references`` is a ``*_GT`` folder (or its ``SEG`` folder) with
    ``man_seg<T>.tif`` and, beside it, ``TRA/man_track<T>.tif`` markers; ``predictions``
    holds ``mask<T>.tif`` (the RES layout). Every SEG frame needs a result; every result
    frame needs its marker frame when ``TRA`` exists (DET is taken over the result frames
    that have markers, as the challenge takes it over the whole sequence). Otherwise: files
    of the same name stem in both folders (NIfTI, TIFF, PNG).

    Returns:
        One pair per case, sorted by case name (CTC: by frame).

    Raises:
        DataError: a folder is missing or empty, or a case lacks its counterpart.

    """
    for folder, role in ((predictions, "predictions"), (references, "references")):
        if not folder.is_dir():
            raise DataError(f"{role} folder '{folder.name}' not found; pass a folder of label images")
    seg_dir = references / "SEG" if (references / "SEG").is_dir() else references
    reference_frames = _index_by_number(seg_dir, _CTC_SEG)
    if reference_frames:
        results = _index_by_number(predictions, _CTC_RESULT)
        missing = [ctc_mask_name(t) for t in sorted(reference_frames) if t not in results]
        if missing:
            raise DataError(
                f"CTC results: {len(missing)} reference frame(s) have no result mask, e.g. "
                f"{', '.join(missing[:3])} missing in '{predictions.name}'; write one mask per frame"
            )
        tra_dir = seg_dir.parent / "TRA"
        markers = _index_by_number(tra_dir, _CTC_TRA) if tra_dir.is_dir() else {}
        unmarked = [ctc_mask_name(t) for t in sorted(results) if markers and t not in markers]
        if unmarked:
            raise DataError(
                f"CTC results: {len(unmarked)} result mask(s) have no TRA marker frame, e.g. "
                f"{', '.join(unmarked[:3])} (markers cover frames {_frame_range(markers)}); "
                "results and markers must describe the same frames"
            )
        frames = sorted(set(reference_frames) | (set(results) & set(markers)))
        return [MaskPair(f"t{t:03d}", results[t], reference_frames.get(t), markers.get(t)) for t in frames]
    predicted = {image_stem(p): p for p in predictions.iterdir() if image_suffix(p) in IMAGE_SUFFIXES}
    expected = {image_stem(p): p for p in references.iterdir() if image_suffix(p) in IMAGE_SUFFIXES}
    if not expected:
        raise DataError(f"no label images in references folder '{references.name}'")
    for names, where in (
        (expected.keys() - predicted.keys(), predictions),
        (predicted.keys() - expected.keys(), references),
    ):
        if names:
            raise DataError(
                f"{len(names)} case(s) missing in '{where.name}', e.g. {', '.join(sorted(names)[:3])}; "
                "both folders need the same file names"
            )
    return [MaskPair(name, predicted[name], expected[name]) for name in sorted(expected)]


def _frame_range(frames: dict[int, Path]) -> str:
    return f"t{min(frames):03d}–t{max(frames):03d} ({len(frames)} frames)"


def discover_cases(root: Path, case_pattern: str, image_pattern: str, label_pattern: str) -> list[SourceCase]:
    """Return one case per folder matching ``case_pattern`` under ``root`` (sorted).

    Inside each case folder ``image_pattern`` must match exactly one file or folder (a DICOM
    series) and ``label_pattern`` exactly one file. Messages name the case by its number in
    the sorted list, never by its folder (which may identify a patient).

    Raises:
        DataError: a pattern matches nothing or more than one entry in a case folder.

    """
    folders = sorted(path for path in root.glob(case_pattern) if path.is_dir())
    cases = []
    for number, folder in enumerate(folders, start=1):
        found = {}
        for role, pattern in (("image", image_pattern), ("label", label_pattern)):
            matches = sorted(folder.glob(pattern))
            if len(matches) != 1:
                raise DataError(
                    f"cases layout: case {number} of {len(folders)} has {len(matches)} entries matching "
                    f"ingest.{role} '{pattern}' (need exactly 1); fix the folder or the pattern"
                )
            found[role] = matches[0]
        cases.append(
            SourceCase(source_name=str(folder.relative_to(root)), image=found["image"], label=found["label"])
        )
    return cases


def discover_msd(root: Path) -> tuple[list[SourceCase], dict[int, str]]:
    """Cases and declared labels (value → name) of an MSD or nnU-Net v2 dataset folder.

    Raises:
        DataError: ``dataset.json`` is missing or malformed, a listed file is missing, or
            the dataset has more than one input channel.

    """
    import json

    path = root / "dataset.json"
    if not path.is_file():
        raise DataError(
            "msd layout: dataset.json not found in the data input; point it at the dataset folder"
        )
    try:
        document = json.loads(path.read_text())
        channels = document.get("channel_names") or document.get("modality") or {"0": "image"}
        raw_labels = document["labels"]
    except (ValueError, KeyError, AttributeError) as exc:
        raise DataError(
            f"msd layout: dataset.json is malformed ({type(exc).__name__}: {exc}); fix it"
        ) from exc
    if len(channels) != 1:
        raise DataError(f"msd layout: {len(channels)} input channels; medseg ingests single-channel datasets")
    # MSD: {"0": "background"}; nnU-Net v2: {"background": 0}.
    labels = {
        int(value): str(name)
        for key, item in raw_labels.items()
        for value, name in ([(key, item)] if str(key).isdigit() else [(item, key)])
    }
    if "training" in document:
        pairs = [(root / entry["image"], root / entry["label"]) for entry in document["training"]]
    else:
        ending = document.get("file_ending", ".nii.gz")
        pairs = [
            (image, root / "labelsTr" / (image.name[: -len(f"_0000{ending}")] + ending))
            for image in sorted((root / "imagesTr").glob(f"*_0000{ending}"))
        ]
    cases = []
    for number, (image, label) in enumerate(pairs, start=1):
        for role, file in (("image", image), ("label", label)):
            if not file.is_file():
                raise DataError(
                    f"msd layout: the {role} of training case {number} listed in dataset.json is missing; "
                    "fix dataset.json or add the file"
                )
        cases.append(SourceCase(source_name=image_stem(label), image=image, label=label))
    return cases, labels


Discover = Callable[[Path, "IngestParams"], "tuple[list[SourceCase], IngestParams]"]
"""``discover(root, params) -> (cases, params)``: the cases of a source folder, and the ingest
params completed by what the layout declares (e.g. an MSD dataset's label values)."""

LAYOUTS: Registry[Discover] = Registry("layout", group="medseg.layouts", adapt=callable_entry)


def _msd(root: Path, params: IngestParams) -> tuple[list[SourceCase], IngestParams]:
    cases, declared = discover_msd(root)
    if params.label_values is None:
        params = params.model_copy(update={"label_values": tuple(sorted(declared))})
    return cases, params


LAYOUTS.register("ctc", lambda root, params: (discover_ctc(root, params.sequence), params))
LAYOUTS.register(
    "paired", lambda root, params: (discover_paired(root, params.images_dir, params.labels_dir), params)
)
LAYOUTS.register(
    "cases",
    lambda root, params: (discover_cases(root, params.case_pattern, params.image, params.label), params),
)
LAYOUTS.register("msd", _msd)
