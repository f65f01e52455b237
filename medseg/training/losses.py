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
from typing import TYPE_CHECKING, Protocol, cast

from pydantic import ConfigDict, Field, model_validator

from medseg.errors import StageError
from medseg.params import Params, own_params
from medseg.registry import Registry, instance_of
from medseg.training.targets import IGNORE_CLASS

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
    """A registered loss: its builder, its own params model (or None), whether it needs weights.

    ``ignores``: the loss honours ``batch["valid"]`` (leaves out voxels of unknown label).
    """

    build: Callable[[LossParams], LossFunction]
    params: type[Params] | None = None
    weighted: bool = False
    ignores: bool = False


LOSSES: Registry[LossEntry] = Registry("loss", group="medseg.losses", adapt=instance_of(LossEntry))


class LossParams(Params):
    """Training loss: ``name`` (a registered loss) and its params.

    - ``dice_ce``: Dice + cross-entropy (MONAI ``DiceCELoss``); own params ``batch`` and
      ``background`` (``DiceParams``).
    - ``ce``: cross-entropy alone. Its class probabilities are calibrated: on the GOWT1 example
      its cell edges sit at probability 0.5 where Dice + cross-entropy draws cells a voxel fat
      (``bench/RESULTS.md``, post-processing).
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
        own_params("loss", self.name, LOSSES.lookup(self.name).params, self.model_extra or {})
        return self

    @property
    def weighted(self) -> bool:
        """Whether the loss needs the border weight map."""
        return LOSSES.lookup(self.name).weighted

    def options(self) -> Params:
        """The chosen loss's own params (its entry's model), from the extra keys."""
        options = own_params("loss", self.name, LOSSES.lookup(self.name).params, self.model_extra or {})
        if options is None:
            raise ValueError(f"loss '{self.name}' has no params of its own")
        return options


def build_loss(params: LossParams) -> LossFunction:
    """The loss ``params`` names, computed in float32 (float16 logits from AMP make Dice+CE NaN).

    Voxels whose target is ``IGNORE_CLASS`` (unknown label) are left out: the loss sees them
    as background in ``batch["label"]`` and gets ``batch["valid"]`` ``(N, 1, *S)`` float32
    (0 there, 1 elsewhere), which losses registered with ``ignores=True`` honour.

    Raises:
        StageError: a batch has unknown voxels and the loss cannot leave them out.

    """
    import torch

    entry = LOSSES.lookup(params.name)
    loss = entry.build(params)

    def in_float32(logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        unknown = batch["label"] == IGNORE_CLASS
        if bool(unknown.any()):
            if not entry.ignores:
                raise StageError(
                    f"loss '{params.name}' cannot leave out unknown voxels (ingest.ignore_label or "
                    "train_on: annotated); use dice_ce, ce, border_ce or dice_border_ce"
                )
            label = torch.where(unknown, torch.zeros_like(batch["label"]), batch["label"])
            batch = {**batch, "label": label, "valid": (~unknown).float()}
        return loss(logits.float(), batch)

    return in_float32


def masked_cross_entropy(
    logits: torch.Tensor, label: torch.Tensor, valid: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean (optionally weighted) cross-entropy over the valid voxels.

    Args:
        logits: ``(N, K, *S)`` float32.
        label: ``(N, 1, *S)`` integer classes.
        valid: ``(N, 1, *S)`` float32, 1 where the voxel counts.
        weight: ``(N, 1, *S)`` float32 per-voxel weights, or None.

    """
    import torch

    pixel = torch.nn.functional.cross_entropy(logits, label[:, 0].long(), reduction="none")
    if weight is not None:
        pixel = pixel * weight[:, 0]
    return (pixel * valid[:, 0]).sum() / valid.sum().clamp_min(1.0)


class DiceParams(Params):
    """``dice_ce``'s own params: over what the Dice term is taken.

    - ``batch``: one Dice per class over the whole batch (nnU-Net's 2D choice) instead of one
      per case and class; a class absent from a patch then still counts its false positives.
    - ``background``: whether the background class has a Dice term (nnU-Net leaves it out).
    """

    batch: bool = False
    background: bool = True


def masked_dice(
    logits: torch.Tensor,
    label: torch.Tensor,
    valid: torch.Tensor,
    *,
    over_batch: bool = False,
    background: bool = True,
) -> torch.Tensor:
    """Soft Dice loss over the valid voxels, as MONAI's ``DiceLoss(to_onehot_y, softmax)`` computes it.

    Per case and class (background included), 1 − (2·Σ p·t + 1e-5) / (Σ p + Σ t + 1e-5) over the
    valid voxels, averaged; with every voxel valid it equals MONAI's value. ``over_batch`` sums
    over the batch too (one term per class, MONAI's ``batch``); ``background`` false drops class 0.
    """
    import torch

    classes = logits.shape[1]
    probabilities = torch.softmax(logits, dim=1) * valid
    onehot = torch.nn.functional.one_hot(label[:, 0].long(), classes).movedim(-1, 1).float() * valid
    dims = (0, *range(2, logits.ndim)) if over_batch else tuple(range(2, logits.ndim))
    intersection = (probabilities * onehot).sum(dims)
    total = probabilities.sum(dims) + onehot.sum(dims)
    dice = 1.0 - (2.0 * intersection + 1e-5) / (total + 1e-5)
    return (dice if background else dice[..., 1:]).mean()


def _dice_ce(params: LossParams) -> LossFunction:
    from monai.losses import DiceCELoss

    options = cast(DiceParams, params.options())
    dice_ce = DiceCELoss(
        to_onehot_y=True, softmax=True, batch=options.batch, include_background=options.background
    )

    def loss(logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if "valid" not in batch:
            return dice_ce(logits, batch["label"])
        label, valid = batch["label"], batch["valid"]
        dice = masked_dice(logits, label, valid, over_batch=options.batch, background=options.background)
        return dice + masked_cross_entropy(logits, label, valid)

    return loss


def _ce(params: LossParams) -> LossFunction:
    import torch

    def ce(logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        valid = batch.get("valid", torch.ones_like(batch["label"], dtype=torch.float32))
        return masked_cross_entropy(logits, batch["label"], valid)

    return ce


def _border_ce(params: LossParams) -> LossFunction:
    import torch

    def border_ce(logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        valid = batch.get("valid", torch.ones_like(batch["weight"]))
        return masked_cross_entropy(logits, batch["label"], valid, batch["weight"])

    return border_ce


def _dice_border_ce(params: LossParams) -> LossFunction:
    from monai.losses import DiceLoss

    dice, border_ce = DiceLoss(to_onehot_y=True, softmax=True), _border_ce(params)

    def loss(logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if "valid" not in batch:
            return border_ce(logits, batch) + dice(logits, batch["label"])
        return border_ce(logits, batch) + masked_dice(logits, batch["label"], batch["valid"])

    return loss


LOSSES.register("dice_ce", LossEntry(_dice_ce, params=DiceParams, ignores=True))
LOSSES.register("ce", LossEntry(_ce, ignores=True))
LOSSES.register("border_ce", LossEntry(_border_ce, weighted=True, ignores=True))
LOSSES.register("dice_border_ce", LossEntry(_dice_border_ce, weighted=True, ignores=True))
