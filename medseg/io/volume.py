"""The ``Volume``: a channel-first array with its geometry and pseudonymous metadata."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

VolumeKind = Literal["image", "label"]


@dataclass(frozen=True)
class Volume:
    """An image or label map with geometry.

    Attributes:
        array: channel-first array, shape ``(C, *spatial)`` with 2 or 3 spatial axes.
            Labels are integer typed with ``C == 1``.
        affine: ``(4, 4)`` float64 matrix mapping voxel indices (array axis order) to RAS
            world coordinates in mm. For 2D data the third axis is a unit-spacing dummy.
        kind: ``"image"`` or ``"label"``.
        meta: pseudonymous metadata only (case id, modality...); never patient identifiers
            or source paths.

    """

    array: np.ndarray
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    kind: VolumeKind = "image"
    meta: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Check the array rank and the affine shape."""
        if self.array.ndim not in (3, 4):
            raise ValueError(
                f"Volume array must be channel-first with 2 or 3 spatial axes, got shape {self.array.shape}"
            )
        if np.shape(self.affine) != (4, 4):
            raise ValueError(f"Volume affine must be 4x4, got shape {np.shape(self.affine)}")

    @property
    def spatial_dims(self) -> int:
        """Number of spatial axes (2 or 3)."""
        return self.array.ndim - 1

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """Spatial shape in array axis order."""
        return tuple(int(s) for s in self.array.shape[1:])

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel spacing in mm along each spatial array axis."""
        norms = np.linalg.norm(np.asarray(self.affine)[:3, :3], axis=0)
        return tuple(float(s) for s in norms[: self.spatial_dims])


def affine_from_spacing(spacing: tuple[float, ...]) -> np.ndarray:
    """Return a ``(4, 4)`` diagonal affine for axis-aligned voxels of ``spacing`` mm."""
    affine = np.eye(4)
    for axis, step in enumerate(spacing):
        affine[axis, axis] = float(step)
    return affine
