"""Params of the train stage."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from medseg.inference.settings import InferenceSettings
from medseg.nets.unet import NetParams
from medseg.params import Params


class OptimParams(Params):
    """Optimiser settings."""

    name: Literal["adam", "adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    momentum: float = Field(0.99, ge=0, lt=1)


class AugmentParams(Params):
    """Random augmentation applied to training patches only."""

    flip: bool = True
    rotate90: bool = True
    intensity: float = Field(0.1, ge=0, le=1)


class TrainParams(Params):
    """Train a U-Net on the train split, validating on the val split.

    ``patch_size`` is in voxels (array axis order) and must be a multiple of the net's
    total stride. ``select_on`` picks the validation metric that chooses the best weights.
    ``min_object_size`` (voxels) and ``fill_holes`` set the post-processing that turns the
    foreground into instances; they travel with the model in its card.
    """

    spatial_dims: Literal[2, 3] = 2
    net: NetParams = NetParams()
    optim: OptimParams = OptimParams()
    augment: AugmentParams = AugmentParams()
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(4, ge=1)
    patch_size: tuple[int, ...] = (128, 128)
    samples_per_image: int = Field(4, ge=1)
    val_every: int = Field(1, ge=1)
    select_on: Literal["dice", "seg"] = "dice"
    overlap: float = Field(0.25, ge=0, lt=1)
    min_object_size: int = Field(10, ge=0)
    fill_holes: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @property
    def inference(self) -> InferenceSettings:
        """Inference and post-processing settings that travel with the trained model."""
        return InferenceSettings(
            roi_size=self.patch_size,
            overlap=self.overlap,
            min_object_size=self.min_object_size,
            fill_holes=self.fill_holes,
        )

    @model_validator(mode="after")
    def _patch(self) -> TrainParams:
        if len(self.patch_size) != self.spatial_dims:
            raise ValueError(
                f"patch_size has {len(self.patch_size)} entries for spatial_dims={self.spatial_dims}"
            )
        divisor = self.net.size_divisor
        if any(size % divisor for size in self.patch_size):
            raise ValueError(f"patch_size {self.patch_size} must be multiples of {divisor} (net strides)")
        return self
