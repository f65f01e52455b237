"""Training targets and loss weights made from instance labels, once per case, before sampling.

All functions take instance labels ``(*spatial)`` (0 = background, 1..N objects, 2D or 3D;
``IGNORED`` (-1) where the label is unknown) and return channel-first arrays ``(1, *spatial)``
that are cropped and augmented together with the image. Unknown voxels get the class
``IGNORE_CLASS`` in a target, which the losses leave out.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from medseg.inference.settings import BorderKind, TargetKind
from medseg.io.fingerprint import inner_voxels

BACKGROUND, INTERIOR, BORDER = 0, 1, 2
IGNORED = -1
"""Instance value of a voxel whose label is unknown (``ingest.ignore_label``, unannotated cells)."""
IGNORE_CLASS = 255
"""Class target value of such a voxel: the losses and metrics leave it out."""


def target_classes(kind: TargetKind) -> int:
    """Number of output channels the net predicts for a target kind (background included)."""
    return 2 if kind == "foreground" else 3


def foreground_target(instances: np.ndarray) -> np.ndarray:
    """Class target ``(1, *spatial)`` uint8: 1 inside any object, 0 elsewhere."""
    return (instances > 0).astype(np.uint8)[None]


def boundary_target(instances: np.ndarray, border_width: int = 2, borders: BorderKind = "all") -> np.ndarray:
    """Three-class target ``(1, *spatial)`` uint8: background 0, interior 1, border 2.

    ``borders: all``: a pixel of an object is *border* when another label (background or a
    neighbouring object) lies within ``border_width`` pixels (a cube/square window), so
    touching objects are separated by a band of border pixels that the post-processing splits
    along, and every object has a rim. ``borders: touching``: only another *object* within
    ``border_width`` pixels makes a border pixel — the bands between touching (or nearly
    touching) objects; an object's edge against background stays interior, so a thin part of
    an object (narrower than 2 · ``border_width`` + 1) stays interior instead of cutting the
    object's interior into pieces that post-processing would grow into separate objects.
    """
    inside = instances > 0
    if borders == "all":
        other = ~inner_voxels(instances, border_width)
    else:
        size = 2 * border_width + 1
        objects_only = np.where(inside, instances, np.iinfo(instances.dtype).max)
        lowest = ndimage.minimum_filter(objects_only, size=size, mode="nearest")
        highest = ndimage.maximum_filter(instances, size=size, mode="nearest")
        other = (highest > instances) | (lowest < instances)
    target = np.zeros(instances.shape, np.uint8)
    target[inside] = INTERIOR
    target[inside & other] = BORDER
    return target[None]


def make_target(
    instances: np.ndarray, kind: TargetKind, border_width: int = 2, borders: BorderKind = "all"
) -> np.ndarray:
    """The class target ``(1, *spatial)`` uint8 of ``kind``; ``IGNORED`` voxels get ``IGNORE_CLASS``.

    Unknown voxels count as background while the classes are made (an object beside them gets
    its border), then are marked.
    """
    unknown = instances == IGNORED
    known = np.where(unknown, 0, instances) if unknown.any() else instances
    target = (
        foreground_target(known) if kind == "foreground" else boundary_target(known, border_width, borders)
    )
    if unknown.any():
        target[0][unknown] = IGNORE_CLASS
    return target


def class_balance_weights(instances: np.ndarray) -> np.ndarray:
    """The U-Net paper's w_c ``(1, *spatial)`` float32: object vs background balance, mean 1.

    Object and background pixels each get weight ∝ 1 / their count, so both contribute the
    same total weight; an image with only one of them gets weight 1 everywhere.
    """
    foreground = instances > 0
    count = int(foreground.sum())
    if count in (0, foreground.size):
        return np.ones((1, *instances.shape), np.float32)
    weights = np.where(
        foreground, foreground.size / (2 * count), foreground.size / (2 * (foreground.size - count))
    )
    return weights.astype(np.float32)[None]


def border_weight_map(instances: np.ndarray, *, w0: float = 10.0, sigma: float = 5.0) -> np.ndarray:
    """The U-Net paper's loss weights ``(1, *spatial)`` float32.

    w(x) = w_c(x) + w0·exp(-(d1(x) + d2(x))² / (2σ²)), where d1 and d2 are the distances (in
    pixels) to the nearest and second-nearest object and w_c balances object and background
    pixels. Each object's distance map is computed only in a window of 4σ around it (beyond
    it the exponential is below 1e-3 of w0), so the cost grows with the objects, not their
    count times the image size.

    Args:
        instances: instance labels ``(*spatial)``.
        w0, sigma: the paper's constants (10 and about 5 px).

    """
    weights = class_balance_weights(instances)[0].astype(np.float64)
    labels = instances.astype(np.int64, copy=False)
    objects = ndimage.find_objects(labels)
    if sum(box is not None for box in objects) < 2:
        return weights.astype(np.float32)[None]
    margin = int(np.ceil(4 * sigma))
    nearest = np.full(labels.shape, np.inf)
    second = np.full(labels.shape, np.inf)
    for index, box in enumerate(objects, start=1):
        if box is None:
            continue
        window = tuple(
            slice(max(0, part.start - margin), min(size, part.stop + margin))
            for part, size in zip(box, labels.shape, strict=True)
        )
        distance = ndimage.distance_transform_edt(labels[window] != index)
        near, sec = nearest[window], second[window]
        second[window] = np.where(distance < near, near, np.minimum(sec, distance))
        nearest[window] = np.minimum(near, distance)
    total = nearest + second
    finite = np.isfinite(total)
    weights[finite] += w0 * np.exp(-(total[finite] ** 2) / (2 * sigma**2))
    return weights.astype(np.float32)[None]
