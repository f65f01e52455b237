"""Networks by name (``train.net.architecture``): MONAI's U-Net, the original U-Net layout, plugins.

A network is one ``NETS`` entry: a builder ``build(params, spatial_dims=, in_channels=,
out_channels=)`` returning a ``torch.nn.Module`` that maps ``(N, in_channels, *spatial)`` to
logits ``(N, out_channels, *spatial)``, and optionally its own params model (further keys of
``train.net``). An installed package adds one by declaring a ``NetEntry`` under the entry-point
group ``medseg.nets``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pydantic import ConfigDict, Field, model_validator

from medseg.params import Params, own_params
from medseg.registry import Registry, instance_of

if TYPE_CHECKING:
    import torch


class NetBuilder(Protocol):
    """``build(params, *, spatial_dims, in_channels, out_channels) -> torch.nn.Module``."""

    def __call__(
        self, params: NetParams, *, spatial_dims: int, in_channels: int, out_channels: int
    ) -> torch.nn.Module:
        """The network, untrained."""


@dataclass(frozen=True)
class NetEntry:
    """A registered network: its builder, its own params model (or None) and its size divisor.

    ``size_divisor(params)``: spatial sizes fed to the net must be multiples of it on every
    axis (default: the product of ``params.strides`` per axis, ``NetParams.size_divisors``).
    """

    build: NetBuilder
    params: type[Params] | None = None
    size_divisor: Callable[[NetParams], int] | None = None


NETS: Registry[NetEntry] = Registry("net", group="medseg.nets", adapt=instance_of(NetEntry))

RONNEBERGER_CHANNELS = (64, 128, 256, 512, 1024)


class NetParams(Params):
    """Network architecture (a registered net), width and depth.

    ``architecture`` (medseg's own; plugins add more, their own params as further keys):
      - ``unet``: MONAI ``UNet`` — ``channels`` per level, ``strides`` between levels (one
        fewer; a level's stride is an int for every axis or a tuple per axis, ``[2, 2, 1]``
        for thick slices), ``num_res_units`` residual units per block (0 = plain convolutions).
      - ``ronneberger``: the original U-Net layout (Ronneberger et al. 2015) from MONAI
        blocks (``BasicUNet``): two 3×3 convolutions + ReLU per level, 2×2 max-pooling down,
        2×2 up-convolution, skip concatenation, five levels; ``channels`` defaults to the
        paper's 64→1024 and may be narrowed (five entries). Convolutions are padded, so the
        output has the input's size (the paper's unpadded variant needs overlap-tile input).
    """

    model_config = ConfigDict(frozen=True, extra="allow")

    architecture: str = "unet"
    channels: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[int | tuple[int, ...], ...] = (2, 2, 2)
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
        own_params("net", self.architecture, NETS.lookup(self.architecture).params, self.model_extra or {})
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

    def options(self) -> Params:
        """The chosen net's own params (its entry's model), from the extra keys."""
        options = own_params(
            "net", self.architecture, NETS.lookup(self.architecture).params, self.model_extra or {}
        )
        if options is None:
            raise ValueError(f"net '{self.architecture}' has no params of its own")
        return options

    def size_divisors(self, spatial_dims: int) -> tuple[int, ...]:
        """Per axis, the number that spatial sizes fed to the net must be multiples of."""
        custom = NETS.lookup(self.architecture).size_divisor
        if custom is not None:
            return (custom(self),) * spatial_dims
        return axis_divisors(self.strides, spatial_dims)


def axis_divisors(strides: tuple[int | tuple[int, ...], ...], spatial_dims: int) -> tuple[int, ...]:
    """The total stride per axis of per-level ``strides`` (an int: every axis; a tuple: per axis)."""
    divisors = [1] * spatial_dims
    for level in strides:
        for axis in range(spatial_dims):
            divisors[axis] *= level if isinstance(level, int) else level[axis]
    return tuple(divisors)


def build_net(
    params: NetParams, *, spatial_dims: int, in_channels: int, out_channels: int
) -> torch.nn.Module:
    """Build the network: ``(N, in_channels, *spatial)`` → logits ``(N, out_channels, *spatial)``."""
    return NETS.lookup(params.architecture).build(
        params, spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels
    )


def _ronneberger(
    params: NetParams, *, spatial_dims: int, in_channels: int, out_channels: int
) -> torch.nn.Module:
    from monai.networks.nets import BasicUNet

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


def _unet(params: NetParams, *, spatial_dims: int, in_channels: int, out_channels: int) -> torch.nn.Module:
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


NETS.register("unet", NetEntry(_unet))
NETS.register("ronneberger", NetEntry(_ronneberger))
