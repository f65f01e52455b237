"""MONAI dictionary ``Compose`` presets for training patches.

Samples are dicts with ``image`` ``(C, *spatial)`` float32 and ``label`` ``(1, *spatial)``
integer class targets. Deterministic preprocessing happened at ingest; only random
augmentation lives here.
"""

from __future__ import annotations

from typing import Any

from medseg.training.params import TrainParams


def train_transforms(params: TrainParams) -> Any:
    """Patch sampling balanced between foreground and background, flips, rotations, intensity."""
    from monai import transforms as mt

    keys = ["image", "label"]
    spatial_axes = tuple(range(params.spatial_dims))
    steps: list[Any] = [
        mt.SpatialPadd(keys, spatial_size=params.patch_size),
        mt.RandCropByPosNegLabeld(
            keys,
            label_key="label",
            spatial_size=params.patch_size,
            pos=1,
            neg=1,
            num_samples=params.samples_per_image,
        ),
    ]
    if params.augment.flip:
        steps += [mt.RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in spatial_axes]
    if params.augment.rotate90:
        steps.append(mt.RandRotate90d(keys, prob=0.5, spatial_axes=(0, 1)))
    if params.augment.intensity > 0:
        steps += [
            mt.RandScaleIntensityd("image", factors=params.augment.intensity, prob=0.5),
            mt.RandShiftIntensityd("image", offsets=params.augment.intensity, prob=0.5),
        ]
    steps.append(mt.EnsureTyped(keys, track_meta=False))
    return mt.Compose(steps)
