"""Ingest a source folder into the canonical dataset: read, check, normalise, split."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from medseg.errors import DataError
from medseg.io.dataset import CaseRecord, DatasetIndex, write_index
from medseg.io.layouts import SourceCase, discover_ctc, discover_paired, is_fully_annotated
from medseg.io.readers import read_image, write_image
from medseg.io.volume import Volume
from medseg.params import Params


class NormalizeParams(Params):
    """Deterministic intensity normalisation applied once at ingest.

    ``percentile`` maps the ``lower``/``upper`` percentiles of each image to 0/1 (microscopy).
    """

    method: Literal["percentile", "none"] = "percentile"
    lower: float = Field(1.0, ge=0, lt=100)
    upper: float = Field(99.8, gt=0, le=100)


class SplitParams(Params):
    """Fractions of the trainable cases held out for validation and test (seeded)."""

    val_fraction: float = Field(0.2, ge=0, lt=1)
    test_fraction: float = Field(0.2, ge=0, lt=1)


class IngestParams(Params):
    """How to read the source folder and build the canonical dataset.

    ``train_on: fully_annotated`` keeps sparsely annotated CTC frames (some cells outlined,
    others not) out of training and validation: they would teach unannotated cells as
    background. They go to the test split, where SEG (per reference object) is valid.
    """

    layout: Literal["ctc", "paired"] = "ctc"
    sequence: str = "01"
    images_dir: str = "images"
    labels_dir: str = "labels"
    train_on: Literal["all", "fully_annotated"] = "fully_annotated"
    normalize: NormalizeParams = NormalizeParams()
    split: SplitParams = SplitParams()


ProgressFn = Callable[[str, float, float], None]


def discover(source: Path, params: IngestParams) -> list[SourceCase]:
    """List the cases of ``source`` for the configured layout.

    Raises:
        DataError: the layout's folders are missing or no case is found.

    """
    if params.layout == "ctc":
        cases = discover_ctc(source, params.sequence)
    else:
        cases = discover_paired(source, params.images_dir, params.labels_dir)
    if not cases:
        raise DataError(
            f"no annotated case found in the data input (layout '{params.layout}'); "
            "check ingest.layout and that the folder holds images with labels"
        )
    return cases


def normalize_intensity(image: np.ndarray, params: NormalizeParams) -> np.ndarray:
    """Normalise an image array to float32 (any shape) as ``params`` says."""
    data = image.astype(np.float32)
    if not np.all(np.isfinite(data)):
        raise ValueError("image has NaN or infinite values")
    if params.method == "none":
        return data
    low, high = (float(v) for v in np.percentile(data, [params.lower, params.upper]))
    return ((data - low) / max(high - low, 1e-6)).astype(np.float32)


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


def _read_case(case: SourceCase, params: IngestParams) -> tuple[Volume, Volume, bool]:
    image = read_image(case.image)
    label = read_image(case.label, kind="label")
    if image.spatial_shape != label.spatial_shape:
        raise DataError(
            f"{case.label.name}: mask shape {label.spatial_shape} differs from image "
            f"{case.image.name} shape {image.spatial_shape}; masks must match their image"
        )
    if label.array.min() < 0:
        raise DataError(f"{case.label.name}: negative label values; labels must be >= 0")
    try:
        normalized = normalize_intensity(image.array[0], params.normalize)
    except ValueError as exc:
        raise DataError(f"{case.image.name}: {exc}; fix or remove the image") from exc
    markers = read_image(case.marker, kind="label").array[0] if case.marker is not None else None
    if markers is not None and markers.shape != label.spatial_shape:
        markers = None
    full = is_fully_annotated(label.array[0], markers)
    return Volume(normalized[None], image.affine), label, full


def ingest_dataset(
    source: Path, params: IngestParams, out_dir: Path, *, seed: int, progress: ProgressFn
) -> tuple[DatasetIndex, dict[str, str]]:
    """Build the canonical dataset in ``out_dir`` from the cases found in ``source``.

    Returns:
        The dataset index and the private map ``case id → source name`` (never to be logged).

    Raises:
        DataError: unreadable images, shape mismatches, empty or unsplittable datasets.

    """
    sources = discover(source, params)
    records: list[CaseRecord] = []
    source_map: dict[str, str] = {}
    spatial_dims = None
    for number, case in enumerate(sources, start=1):
        case_id = f"case_{number:04d}"
        image, label, full = _read_case(case, params)
        if spatial_dims is None:
            spatial_dims = image.spatial_dims
        elif image.spatial_dims != spatial_dims:
            raise DataError(
                f"{case.image.name}: {image.spatial_dims}D image in a {spatial_dims}D dataset; "
                "ingest 2D and 3D data separately"
            )
        folder = out_dir / "cases" / case_id
        folder.mkdir(parents=True)
        write_image(image, folder / "image.nii.gz")
        write_image(label, folder / "label.nii.gz")
        records.append(
            CaseRecord(
                case_id=case_id,
                image=f"cases/{case_id}/image.nii.gz",
                label=f"cases/{case_id}/label.nii.gz",
                shape=image.spatial_shape,
                spacing=image.spacing,
                fully_annotated=full,
                frame=case.frame,
            )
        )
        source_map[case_id] = case.source_name
        progress("ingest", number, len(sources))
    trainable = [rec.fully_annotated or params.train_on == "all" for rec in records]
    if not any(trainable):
        raise DataError(
            "no fully annotated case to train on (every frame is sparsely annotated); "
            "set ingest.train_on: all, or add fully annotated frames"
        )
    index = DatasetIndex(
        spatial_dims=int(spatial_dims or 2),
        channels=1,
        labels={"0": "background", "1": "foreground"},
        instance_labels=True,
        intensity=params.normalize.model_dump(),
        cases=tuple(records),
        splits=split_cases([r.case_id for r in records], trainable, params.split, seed),
    )
    write_index(out_dir, index)
    return index, source_map
