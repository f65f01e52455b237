"""MONAI dictionary ``Compose`` presets for training patches.

Samples are dicts with ``image`` ``(C, *spatial)`` float32, ``label`` ``(1, *spatial)``
integer class targets and, for weighted losses, ``weight`` ``(1, *spatial)`` float32 loss
weights. Deterministic preprocessing happened at ingest; only patch sampling and random
augmentation live here.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from medseg.training.params import TrainParams
from medseg.training.targets import IGNORE_CLASS

FOREGROUND_CENTRES, BACKGROUND_CENTRES = "foreground_centres", "background_centres"
"""Sample keys of the flat voxel indices patch centres are drawn from (only when some are unknown)."""


def sample_keys(params: TrainParams) -> list[str]:
    """Keys of a training sample: ``image``, ``label`` and ``weight`` for weighted losses."""
    return ["image", "label", "weight"] if params.loss.weighted else ["image", "label"]


def known_centres(target: np.ndarray) -> dict[str, np.ndarray]:
    """Where a target with unknown voxels may centre its patches: known objects, known background.

    MONAI's positive/negative crop counts every label above 0 as an object, ``IGNORE_CLASS``
    included; on a sparsely annotated CTC frame most such voxels are the left-out regions
    around unannotated cells (2 cells outlined of ~23), so half the patches were centred where
    the loss learns nothing. nnU-Net v2 likewise samples foreground from annotated classes only.

    Args:
        target: class target ``(1, *spatial)`` uint8 (``IGNORE_CLASS`` where unknown).

    Returns:
        ``{FOREGROUND_CENTRES, BACKGROUND_CENTRES}`` flat indices into ``spatial`` (int32 below
        2³¹ voxels, else int64), or ``{}`` when every voxel is known (MONAI then finds them
        itself). Without any known object the background indices serve for both.

    """
    classes = target[0]
    unknown = classes == IGNORE_CLASS
    if not unknown.any():
        return {}
    dtype = np.int32 if classes.size < 2**31 else np.int64
    background = np.flatnonzero(classes == 0).astype(dtype)
    objects = np.flatnonzero((classes > 0) & ~unknown).astype(dtype)
    return {FOREGROUND_CENTRES: objects if objects.size else background, BACKGROUND_CENTRES: background}


def rotation_plane(patch_size: tuple[int, ...]) -> tuple[int, int] | None:
    """The plane (two spatial axes) where a 90° rotation keeps the patch's shape, or None.

    A rotation swaps the plane's two axes, so they must be equally long: a planned 224 × 256
    patch (frames of 416 × 496) rotated would not stack with unrotated ones in a batch. The
    first such plane in axis order (``(0, 1)`` for a square or ``48 × 48 × 64`` patch).
    """
    for first in range(len(patch_size)):
        for second in range(first + 1, len(patch_size)):
            if patch_size[first] == patch_size[second]:
                return first, second
    return None


def train_transforms(params: TrainParams) -> Any:
    """Foreground/background-balanced patches, flips, rotations, elastic deformation, intensity, gamma, blur.

    Patch centres are half on objects, half on background; a sample carrying ``known_centres``
    draws them from known voxels only. Images and weights are interpolated bilinearly, labels by
    nearest neighbour.
    """
    from monai import transforms as mt

    keys = sample_keys(params)
    modes = ["bilinear", "nearest", "bilinear"][: len(keys)]
    augment = params.augment
    spatial_axes = tuple(range(params.spatial_dims))
    steps: list[Any] = [
        mt.RandCropByPosNegLabeld(
            keys,
            label_key="label",
            spatial_size=params.patch_size,
            pos=1,
            neg=1,
            num_samples=params.samples_per_image,
            fg_indices_key=FOREGROUND_CENTRES,
            bg_indices_key=BACKGROUND_CENTRES,
        ),
    ]
    if augment.flip:
        steps += [mt.RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in spatial_axes]
    plane = rotation_plane(params.patch_size) if augment.rotate90 else None
    if plane is not None:
        steps.append(mt.RandRotate90d(keys, prob=0.5, spatial_axes=plane))
    angle = math.radians(augment.rotate)
    if augment.elastic > 0:
        elastic = mt.Rand2DElasticd if params.spatial_dims == 2 else mt.Rand3DElasticd
        scale = (
            {"spacing": (augment.elastic_scale,) * 2}
            if params.spatial_dims == 2
            else {"sigma_range": (augment.elastic_scale, augment.elastic_scale)}
        )
        steps.append(
            elastic(
                keys,
                **scale,
                magnitude_range=(0.0, augment.elastic_magnitude),
                prob=augment.elastic,
                rotate_range=angle or None,
                mode=modes,
                padding_mode="reflection",
            )
        )
    elif angle:
        steps.append(mt.RandRotated(keys, range_x=angle, prob=0.5, mode=modes, padding_mode="reflection"))
    if augment.intensity > 0:
        steps += [
            mt.RandScaleIntensityd("image", factors=augment.intensity, prob=0.5),
            mt.RandShiftIntensityd("image", offsets=augment.intensity, prob=0.5),
        ]
    if augment.gamma > 0:
        steps.append(mt.RandAdjustContrastd("image", prob=augment.gamma, gamma=(0.7, 1.5), retain_stats=True))
    if augment.blur > 0:
        sigma = {f"sigma_{axis}": (0.5, 1.0) for axis in "xyz"[: params.spatial_dims]}
        steps.append(mt.RandGaussianSmoothd("image", prob=augment.blur, **sigma))
    steps.append(mt.EnsureTyped(keys, track_meta=False))
    return mt.Compose(steps)
