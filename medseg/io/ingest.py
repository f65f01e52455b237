"""Ingest a source folder into the canonical dataset: read, check, normalise, split."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, field_validator

from medseg.errors import DataError
from medseg.io.dataset import CaseRecord, DatasetIndex, write_index
from medseg.io.dicom import SeriesRules, read_dicom_seg
from medseg.io.fingerprint import FingerprintBuilder, write_fingerprint
from medseg.io.geometry import check_same_grid, resample_to_grid
from medseg.io.layouts import LAYOUTS, SourceCase, is_fully_annotated, unannotated_regions
from medseg.io.preprocessing import NormalizeParams, Preprocessing
from medseg.io.readers import DICOM_SEG_SUFFIXES, image_suffix, read_image, write_image
from medseg.io.volume import Volume
from medseg.params import Params


class SplitParams(Params):
    """Fractions of the trainable cases held out for validation and test (seeded)."""

    val_fraction: float = Field(0.2, ge=0, lt=1)
    test_fraction: float = Field(0.2, ge=0, lt=1)


class IngestParams(Params):
    """How to read the source folder and build the canonical dataset.

    ``train_on: fully_annotated`` keeps sparsely annotated CTC frames (some cells outlined,
    others not) out of training and validation: they would teach unannotated cells as
    background. They go to the test split, where SEG (per reference object) is valid.
    ``train_on: annotated`` trains on every annotated frame: around each ``TRA`` marker that
    no outline covers, a ball of 2.5 typical cell radii of the frame is left out of the loss
    (``io.layouts.unannotated_regions``). ``train_on: all`` trains on every frame as it is.
    ``ignore_label``: voxels of this label value are unknown (partially labelled volumes,
    sparsely annotated slices) — left out of the loss and of overlap metrics (nnU-Net v2's
    ignore label); they become background in the cached label and a per-case ignore mask.

    ``layout`` names an entry of ``io.layouts.LAYOUTS`` (``ctc``, ``paired``, ``cases``, ``msd``).
    ``layout: cases`` reads one folder per case (``case_pattern``), with ``image`` and
    ``label`` globs inside it; a DICOM image folder is read as the series ``series`` selects.
    ``layout: msd`` reads a Decathlon / nnU-Net folder; its declared labels are the allowed
    label values unless ``label_values`` says otherwise.
    3D volumes are reoriented to RAS+. The label must lie on the image's voxel grid
    (``label_grid: require``) or is resampled onto it by nearest neighbour (``resample``).
    ``labels: binary`` merges every labelled class into one foreground; ``label_values``
    declares the values a label may hold (others stop ingest). A DICOM SEG label with
    overlapping segments is refused unless ``segment_overlap: highest`` (the highest segment
    number takes each shared voxel). ``spacing`` (mm, array axis
    order) resamples 3D cases: images linearly, labels by nearest neighbour.
    """

    layout: str = "ctc"
    sequence: str = "01"
    images_dir: str = "images"
    labels_dir: str = "labels"
    case_pattern: str = "*"
    image: str = "image*"
    label: str = "label*"
    series: SeriesRules = SeriesRules()
    train_on: Literal["all", "fully_annotated", "annotated"] = "fully_annotated"
    ignore_label: int | None = Field(None, ge=1)
    labels: Literal["instances", "binary"] = "instances"
    label_values: tuple[int, ...] | None = None
    label_grid: Literal["require", "resample"] = "require"
    segment_overlap: Literal["refuse", "highest"] = "refuse"
    spacing: tuple[float, ...] | None = None
    normalize: NormalizeParams = NormalizeParams()
    split: SplitParams = SplitParams()

    @field_validator("layout")
    @classmethod
    def _registered_layout(cls, layout: str) -> str:
        LAYOUTS.lookup(layout)
        return layout


ProgressFn = Callable[[str, float, float], None]


def discover(source: Path, params: IngestParams) -> tuple[list[SourceCase], IngestParams]:
    """List the cases of ``source`` for the configured layout.

    Returns:
        The cases, and the params completed by the layout (an MSD dataset's declared labels
        become ``label_values`` unless set).

    Raises:
        DataError: the layout's folders are missing or no case is found.

    """
    cases, params = LAYOUTS.lookup(params.layout)(source, params)
    if not cases:
        raise DataError(
            f"no annotated case found in the data input (layout '{params.layout}'); "
            "check ingest.layout and that the folder holds images with labels"
        )
    return cases, params


def split_cases(
    case_ids: list[str], trainable: list[bool], params: SplitParams, seed: int
) -> dict[str, list[str]]:
    """Assign cases to train/val/test reproducibly from ``seed``.

    Only ``trainable`` cases may go to train/val; the others go to test.

    Raises:
        DataError: fewer trainable cases than the split needs.

    """
    pool = [case for case, ok in zip(case_ids, trainable, strict=True) if ok]
    order = list(np.random.default_rng(seed).permutation(len(pool)))
    shuffled = [pool[i] for i in order]
    n_test = round(params.test_fraction * len(pool))
    n_val = round(params.val_fraction * len(pool))
    if params.val_fraction > 0:
        n_val = max(n_val, 1)
    n_train = len(pool) - n_test - n_val
    if n_train < 1:
        raise DataError(
            f"only {len(pool)} trainable case(s): too few for val_fraction={params.val_fraction} "
            f"and test_fraction={params.test_fraction}; add labelled cases or lower the fractions"
        )
    held_out = [case for case, ok in zip(case_ids, trainable, strict=True) if not ok]
    return {
        "train": sorted(shuffled[:n_train]),
        "val": sorted(shuffled[n_train : n_train + n_val]),
        "test": sorted(shuffled[n_train + n_val :] + held_out),
    }


def preprocessing_of(params: IngestParams) -> Preprocessing:
    """The preprocessing ingest applies (dimensionality and channels are filled from the data)."""
    return Preprocessing(spacing=params.spacing, normalize=params.normalize, series=params.series)


def _read_case(
    case: SourceCase, params: IngestParams, preprocessing: Preprocessing, fingerprint: FingerprintBuilder
) -> tuple[Volume, Volume, Volume | None, np.ndarray]:
    """Image, label, (CTC) markers and ignore mask of one source case, checked and preprocessed.

    The image goes through ``preprocessing.orient`` and ``finish`` (= ``apply``, what
    ``Segmenter.predict`` does); the label follows it onto the same grid. The source
    intensities inside and outside the label go to ``fingerprint``.
    """
    image = preprocessing.orient(preprocessing.read(case.image))
    if image_suffix(case.label) in DICOM_SEG_SUFFIXES:
        label = read_dicom_seg(case.label, highest_wins=params.segment_overlap == "highest")
    else:
        label = read_image(case.label, kind="label", series=params.series)
    label = preprocessing.orient(label)
    if image.spatial_dims == 3:
        if params.label_grid == "resample" or label.meta.get("modality") == "SEG":  # SEG: place on the grid
            label = resample_to_grid(label, image.spatial_shape, image.affine, order=0)
        check_same_grid(image, label, name="label")
    elif image.spatial_shape != label.spatial_shape:
        raise DataError(
            f"label: mask shape {label.spatial_shape} differs from the image's "
            f"shape {image.spatial_shape}; masks must match their image"
        )
    known = label.array[0] != params.ignore_label if params.ignore_label is not None else None
    labelled = label.array[0] if known is None else np.where(known, label.array[0], 0)
    fingerprint.add_intensities(image.array, labelled, image.meta.get("modality"))
    label = preprocessing.resample(label, order=0)
    values = np.unique(label.array)
    if values[0] < 0:
        raise DataError("label: negative label values; labels must be >= 0")
    label, ignore = _ignored(label, params.ignore_label)
    if params.label_values is not None:
        unknown = sorted(set(values.tolist()) - set(params.label_values) - {0, params.ignore_label})
        if unknown:
            raise DataError(
                f"label: values {unknown[:10]} are not among the declared "
                f"ingest.label_values {list(params.label_values)}; fix the label or declare them"
            )
    if params.labels == "binary":
        label = Volume((label.array > 0).astype(np.int32), label.affine, kind="label")
    normalized = preprocessing.finish(image)
    markers = read_image(case.marker, kind="label") if case.marker is not None else None
    if markers is not None and markers.spatial_shape != label.spatial_shape:
        raise DataError(
            f"markers: shape {markers.spatial_shape} differs from the mask's shape "
            f"{label.spatial_shape}; markers and masks must describe the same frame"
        )
    if markers is not None and params.train_on == "annotated":
        ignore |= unannotated_regions(label.array[0], markers.array[0])
    return Volume(normalized.array, normalized.affine), label, markers, ignore


def _ignored(label: Volume, ignore_label: int | None) -> tuple[Volume, np.ndarray]:
    """``label`` with its ``ignore_label`` voxels made background, and those voxels ``(*spatial)`` bool.

    Raises:
        DataError: the ignore label covers the whole case (nothing to learn or score there).

    """
    if ignore_label is None:
        return label, np.zeros(label.spatial_shape, bool)
    ignore = label.array[0] == ignore_label
    if ignore.all():
        raise DataError(
            f"label: ingest.ignore_label {ignore_label} covers every voxel, so the case has nothing "
            "to learn or score; label some of it or leave the case out"
        )
    return Volume(np.where(ignore, 0, label.array), label.affine, kind="label", meta=label.meta), ignore


def decide_normalization(
    sources: list[SourceCase], params: IngestParams, preprocessing: Preprocessing, seed: int
) -> NormalizeParams:
    """The normalisation ``normalize: {method: auto}`` stands for, decided from the data.

    CT (the first image's DICOM modality) gets ``ct_zscore`` with the 0.5 / 99.5 percentiles,
    mean and standard deviation of the labelled voxels of every case (a first pass over the
    cases); MR and other 3D volumes ``zscore``; 2D images (microscopy) ``percentile``.

    Raises:
        DataError: a case cannot be read (naming it), or no case has labelled voxels (CT).

    """
    first = preprocessing.read(sources[0].image)
    if first.meta.get("modality") != "CT":
        method = "zscore" if first.meta.get("modality") == "MR" or first.spatial_dims == 3 else "percentile"
        return params.normalize.model_copy(update={"method": method})
    raw = preprocessing.model_copy(update={"normalize": NormalizeParams(method="none")})
    statistics = FingerprintBuilder(seed)
    for number, case in enumerate(sources, start=1):
        try:
            _read_case(case, params, raw, statistics)
        except DataError as exc:
            raise DataError(f"case case_{number:04d}: {exc}") from exc
    foreground = statistics.foreground_stats()
    if foreground is None:
        raise DataError("no case has labelled voxels to take CT intensity statistics from; check the labels")
    return NormalizeParams(
        method="ct_zscore",
        window=(foreground.p00_5, foreground.p99_5),
        mean=foreground.mean,
        std=max(foreground.std, 1e-6),
    )


def ingest_dataset(
    source: Path,
    params: IngestParams,
    out_dir: Path,
    *,
    seed: int,
    progress: ProgressFn,
    on_discovered: Callable[[dict[str, str]], None] | None = None,
) -> tuple[DatasetIndex, dict[str, str]]:
    """Build the canonical dataset in ``out_dir`` from the cases found in ``source``.

    ``on_discovered`` receives the private map ``case id → source name`` before any case is
    read, so that a message naming a case id can be traced back (by whoever may see it).

    Returns:
        The dataset index and the private map (never to be logged).

    Raises:
        DataError: unreadable images, shape mismatches, empty or unsplittable datasets.

    """
    sources, params = discover(source, params)
    source_map = {f"case_{number:04d}": case.source_name for number, case in enumerate(sources, start=1)}
    if on_discovered is not None:
        on_discovered(source_map)
    records: list[CaseRecord] = []
    unknown: set[str] = set()  # cases whose every voxel is ignored: nothing to train on
    spatial_dims, channels = None, 1
    preprocessing = preprocessing_of(params)
    if params.normalize.method == "auto":
        normalize = decide_normalization(sources, params, preprocessing, seed)
        params = params.model_copy(update={"normalize": normalize})
        preprocessing = preprocessing.model_copy(update={"normalize": normalize})
    fingerprint = FingerprintBuilder(seed)
    for number, case in enumerate(sources, start=1):
        case_id = f"case_{number:04d}"
        try:
            image, label, markers, ignore = _read_case(case, params, preprocessing, fingerprint)
        except DataError as exc:
            raise DataError(
                f"case {case_id}: {exc} (its source is in the workspace's private/ case map)",
                local_detail=f"{case_id} is '{case.source_name}' in the data input",
            ) from exc
        if spatial_dims is None:
            spatial_dims, channels = image.spatial_dims, image.array.shape[0]
        elif image.array.shape[0] != channels:
            raise DataError(
                f"case {case_id}: {image.array.shape[0]} image channel(s) where the first case has "
                f"{channels}; every case needs the same stacks (ingest.series)"
            )
        elif image.spatial_dims != spatial_dims:
            raise DataError(
                f"case {case_id}: {image.spatial_dims}D image in a {spatial_dims}D dataset; "
                "ingest 2D and 3D data separately"
            )
        folder = out_dir / "cases" / case_id
        folder.mkdir(parents=True)
        write_image(image, folder / "image.nii.gz")
        write_image(label, folder / "label.nii.gz")
        if markers is not None:
            write_image(markers, folder / "markers.nii.gz")
        if ignore.any():
            mask = Volume(ignore[None].astype(np.uint8), label.affine, kind="label")
            write_image(mask, folder / "ignore.nii.gz")
        if ignore.all():
            unknown.add(case_id)
        fingerprint.add_labels(label.array[0], image.spacing, instances=params.labels == "instances")
        records.append(
            CaseRecord(
                case_id=case_id,
                image=f"cases/{case_id}/image.nii.gz",
                label=f"cases/{case_id}/label.nii.gz",
                shape=image.spatial_shape,
                spacing=image.spacing,
                fully_annotated=is_fully_annotated(
                    label.array[0], markers.array[0] if markers is not None else None
                ),
                frame=case.frame,
                markers=f"cases/{case_id}/markers.nii.gz" if markers is not None else None,
                ignore=f"cases/{case_id}/ignore.nii.gz" if ignore.any() else None,
            )
        )
        progress("ingest", number, len(sources))
    trainable = [
        (rec.fully_annotated or params.train_on != "fully_annotated") and rec.case_id not in unknown
        for rec in records
    ]
    if not any(trainable):
        raise DataError(
            "no fully annotated case to train on (every frame is sparsely annotated); "
            "set ingest.train_on: all, or add fully annotated frames"
        )
    index = DatasetIndex(
        spatial_dims=int(spatial_dims or 2),
        channels=int(channels),
        labels={"0": "background", "1": "foreground"},
        instance_labels=params.labels == "instances",
        cases=tuple(records),
        splits=split_cases([r.case_id for r in records], trainable, params.split, seed),
        preprocessing=preprocessing.model_copy(
            update={
                "spatial_dims": int(spatial_dims or 2),
                "channels": int(channels),
                "orientation": "RAS" if spatial_dims == 3 else "as stored",
                "spacing": params.spacing if spatial_dims == 3 else None,
            }
        ),
    )
    write_index(out_dir, index)
    write_fingerprint(
        out_dir, fingerprint.build(spatial_dims=index.spatial_dims, trainable_cases=sum(trainable))
    )
    return index, source_map
