"""MONAI U-Net builder from a params model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from medseg.params import Params

if TYPE_CHECKING:
    import torch


RONNEBERGER_CHANNELS = (64, 128, 256, 512, 1024)


class NetParams(Params):
    """U-Net architecture, width and depth.

    ``architecture``:
      - ``unet``: MONAI ``UNet`` — ``channels`` per level, ``strides`` between levels (one
        fewer), ``num_res_units`` residual units per block (0 = plain convolutions).
      - ``ronneberger``: the original U-Net layout (Ronneberger et al. 2015) from MONAI
        blocks (``BasicUNet``): two 3×3 convolutions + ReLU per level, 2×2 max-pooling down,
        2×2 up-convolution, skip concatenation, five levels; ``channels`` defaults to the
        paper's 64→1024 and may be narrowed (five entries). Convolutions are padded, so the
        output has the input's size (the paper's unpadded variant needs overlap-tile input).
    """

    architecture: Literal["unet", "ronneberger"] = "unet"
    channels: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[int, ...] = (2, 2, 2)
    num_res_units: int = Field(2, ge=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    norm: Literal["instance", "batch"] = "instance"

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("architecture") == "ronneberger":
            data = {"channels": RONNEBERGER_CHANNELS, "strides": (2, 2, 2, 2), "num_res_units": 0, **data}
        return data

    @model_validator(mode="after")
    def _levels(self) -> NetParams:
        if len(self.strides) != len(self.channels) - 1:
            raise ValueError(
                f"strides needs {len(self.channels) - 1} entries for {len(self.channels)} channels"
            )
        if self.architecture == "ronneberger":
            if len(self.channels) != len(RONNEBERGER_CHANNELS) or set(self.strides) != {2}:
                raise ValueError("the ronneberger architecture has 5 levels (channels: 5 entries, strides 2)")
            if self.num_res_units:
                raise ValueError("the ronneberger architecture has no residual units; set num_res_units: 0")
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
    """Build the network: ``(N, in_channels, *spatial)`` → logits ``(N, out_channels, *spatial)``."""
    from monai.networks.nets import BasicUNet, UNet

    if params.architecture == "ronneberger":
        return BasicUNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            features=(*params.channels, params.channels[0]),
            act="relu",
            norm=params.norm,
            dropout=params.dropout,
            upsample="deconv",
        )
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
