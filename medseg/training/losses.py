"""Training losses by name (``train.loss.name``): one registry entry per loss.

A loss is built from ``LossParams``; keys of ``train.loss`` beyond the shared ones are the
loss's own params, validated by the params model its entry declares. To add a loss: write
its builder here and register it::

    LOSSES.register("focal", LossEntry(build_focal, params=FocalParams))

or, from an installed package, declare the ``LossEntry`` under the entry-point group
``medseg.losses`` (``focal = "my_package.losses:FOCAL"``).

torch and MONAI are imported by the builders only, so validating a workflow stays light.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from pydantic import ConfigDict, Field, model_validator

from medseg.params import Params
from medseg.registry import Registry, instance_of

if TYPE_CHECKING:
    import torch


class LossFunction(Protocol):
    """``loss(logits (N, K, *S) float32, batch) -> scalar``; ``batch["label"]`` is ``(N, 1, *S)``.

    Weighted losses also read ``batch["weight"]`` ``(N, 1, *S)`` float32 (border weights).
    """

    def __call__(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The loss of one batch."""


@dataclass(frozen=True)
class LossEntry:
    """A registered loss: its builder, its own params model (or None) and whether it needs weights."""

    build: Callable[[LossParams], LossFunction]
    params: type[Params] | None = None
    weighted: bool = False


LOSSES: Registry[LossEntry] = Registry("loss", group="medseg.losses", adapt=instance_of(LossEntry))


class LossParams(Params):
    """Training loss: ``name`` (a registered loss) and its params.

    - ``dice_ce``: Dice + cross-entropy (MONAI ``DiceCELoss``).
    - ``border_ce``: the U-Net paper's weighted cross-entropy, weights
      w(x) = w_c(x) + w0·exp(-(d1+d2)²/(2σ²)) (class balance plus a ridge between objects).
    - ``dice_border_ce``: Dice + ``border_ce``.

    Further keys are the chosen loss's own params (its entry's params model checks them).
    """

    model_config = ConfigDict(frozen=True, extra="allow")

    name: str = "dice_ce"
    w0: float = Field(10.0, ge=0)
    sigma: float = Field(5.0, gt=0)

    @model_validator(mode="after")
    def _registered(self) -> LossParams:
        entry = LOSSES.lookup(self.name)
        extra = self.model_extra or {}
        if extra and entry.params is None:
            raise ValueError(f"loss '{self.name}' takes no parameter {', '.join(sorted(extra))}")
        if entry.params is not None:
            entry.params.model_validate(extra)
        return self

    @property
    def weighted(self) -> bool:
        """Whether the loss needs the border weight map."""
        return LOSSES.lookup(self.name).weighted

    def options(self) -> Params:
        """The chosen loss's own params (its entry's model), from the extra keys."""
        entry = LOSSES.lookup(self.name)
        if entry.params is None:
            raise ValueError(f"loss '{self.name}' has no params of its own")
        return entry.params.model_validate(self.model_extra or {})


def build_loss(params: LossParams) -> LossFunction:
    """The loss ``params`` names, computed in float32 (float16 logits from AMP make Dice+CE NaN)."""
    loss = LOSSES.lookup(params.name).build(params)

    def in_float32(logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return loss(logits.float(), batch)

    return in_float32


def _dice_ce(params: LossParams) -> LossFunction:
    from monai.losses import DiceCELoss

    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)
    return lambda logits, batch: dice_ce(logits, batch["label"])


def _border_ce(params: LossParams) -> LossFunction:
    import torch

    def border_ce(logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        pixel_ce = torch.nn.functional.cross_entropy(logits, batch["label"][:, 0].long(), reduction="none")
        return (pixel_ce * batch["weight"][:, 0]).mean()

    return border_ce


def _dice_border_ce(params: LossParams) -> LossFunction:
    from monai.losses import DiceLoss

    dice, border_ce = DiceLoss(to_onehot_y=True, softmax=True), _border_ce(params)
    return lambda logits, batch: border_ce(logits, batch) + dice(logits, batch["label"])


LOSSES.register("dice_ce", LossEntry(_dice_ce))
LOSSES.register("border_ce", LossEntry(_border_ce, weighted=True))
LOSSES.register("dice_border_ce", LossEntry(_dice_border_ce, weighted=True))
