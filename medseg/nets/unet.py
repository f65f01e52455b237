"""MONAI U-Net builder from a params model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from medseg.params import Params

if TYPE_CHECKING:
    import torch


class NetParams(Params):
    """U-Net width/depth: ``channels`` per level, ``strides`` between levels (one fewer)."""

    channels: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[int, ...] = (2, 2, 2)
    num_res_units: int = Field(2, ge=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    norm: Literal["instance", "batch"] = "instance"

    @model_validator(mode="after")
    def _levels(self) -> NetParams:
        if len(self.strides) != len(self.channels) - 1:
            raise ValueError(
                f"strides needs {len(self.channels) - 1} entries for {len(self.channels)} channels"
            )
        return self

    @property
    def size_divisor(self) -> int:
        """Spatial sizes fed to the net must be multiples of this."""
        divisor = 1
        for stride in self.strides:
            divisor *= stride
        return divisor


def build_unet(
    params: NetParams, *, spatial_dims: int, in_channels: int, out_channels: int
) -> torch.nn.Module:
    """Build a MONAI ``UNet``: ``(N, in_channels, *spatial)`` → logits ``(N, out_channels, *spatial)``."""
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=params.channels,
        strides=params.strides,
        num_res_units=params.num_res_units,
        dropout=params.dropout,
        norm=params.norm,
    )
