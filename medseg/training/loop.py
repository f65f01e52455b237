"""The training loop: MONAI parts, our small loop, progress and metrics through callbacks."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from medseg.errors import StageError
from medseg.inference.predict import segment_instances
from medseg.metrics.evaluate import evaluate_case, summarize
from medseg.nets.unet import build_unet
from medseg.training.params import TrainParams


@dataclass(frozen=True)
class TrainingCase:
    """One case in memory: image ``(C, *spatial)`` float32, instances ``(*spatial)`` int32."""

    case_id: str
    image: np.ndarray
    instances: np.ndarray


@dataclass
class TrainResult:
    """Best weights and the per-epoch history of metrics."""

    state_dict: dict[str, torch.Tensor]
    best_epoch: int
    best_metric: float
    history: list[dict[str, float]] = field(default_factory=list)


EpochCallback = Callable[[int, dict[str, float]], None]
ProgressFn = Callable[[str, float, float], None]


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise StageError("train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(name)


def foreground_target(instances: np.ndarray) -> np.ndarray:
    """Class target ``(1, *spatial)`` uint8: 1 inside any object, 0 elsewhere."""
    return (instances > 0).astype(np.uint8)[None]


def _optimizer(net: torch.nn.Module, params: TrainParams) -> torch.optim.Optimizer:
    optim = params.optim
    if optim.name == "sgd":
        return torch.optim.SGD(
            net.parameters(),
            lr=optim.lr,
            momentum=optim.momentum,
            weight_decay=optim.weight_decay,
            nesterov=True,
        )
    factory = torch.optim.AdamW if optim.name == "adamw" else torch.optim.Adam
    return factory(net.parameters(), lr=optim.lr, weight_decay=optim.weight_decay)


def validate(
    net: torch.nn.Module,
    cases: Sequence[TrainingCase],
    params: TrainParams,
    device: torch.device,
) -> dict[str, float]:
    """Foreground Dice and CTC SEG of ``net`` on whole validation images."""
    net.eval()
    results = []
    for case in cases:
        instances = segment_instances(net, case.image, params.inference, device=device)
        results.append(evaluate_case(case.case_id, case.instances, instances))
    summary = summarize(results)
    return {"val/dice": summary.dice, "val/seg": summary.seg, "val/iou": summary.iou}


def train_segmentation(
    train_cases: Sequence[TrainingCase],
    val_cases: Sequence[TrainingCase],
    params: TrainParams,
    *,
    seed: int,
    on_epoch: EpochCallback,
    progress: ProgressFn,
) -> TrainResult:
    """Train a U-Net with Dice+CE on foreground targets, keeping the best validation weights.

    Args:
        train_cases: cases sampled into patches each epoch.
        val_cases: cases evaluated whole every ``params.val_every`` epochs (may be empty:
            then the last epoch's weights are kept).
        seed: drives weight init, patch sampling, augmentation and batch order.
        on_epoch: receives ``(epoch, metrics)`` with ``train/loss`` and ``val/*``.
        progress: receives ``("train", epoch, epochs)``.

    Raises:
        StageError: the loss became NaN.

    """
    from monai.data import DataLoader, Dataset
    from monai.losses import DiceCELoss
    from monai.utils import set_determinism

    if not train_cases:
        raise StageError("the train split is empty; add labelled cases or lower the split fractions")
    set_determinism(seed=seed)
    device = resolve_device(params.device)
    in_channels = int(train_cases[0].image.shape[0])
    net = build_unet(params.net, spatial_dims=params.spatial_dims, in_channels=in_channels, out_channels=2)
    net.to(device)
    transforms = _train_transforms(params, seed)
    samples = [{"image": c.image, "label": foreground_target(c.instances)} for c in train_cases]
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        Dataset(samples, transforms),
        batch_size=params.batch_size,
        shuffle=True,
        num_workers=0,
        generator=generator,
    )
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = _optimizer(net, params)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=params.epochs)

    best_metric, best_epoch, best_state = -math.inf, 0, _copy_state(net)
    history: list[dict[str, float]] = []
    for epoch in range(1, params.epochs + 1):
        net.train()
        losses = []
        for batch in loader:
            images, targets = batch["image"].to(device), batch["label"].to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(net(images), targets)
            if not torch.isfinite(loss):
                raise StageError(
                    f"training loss became {loss.item()} at epoch {epoch}; lower train.optim.lr "
                    "or check the intensity normalisation"
                )
            loss.backward()
            optimizer.step()
            losses.append(float(loss.item()))
        scheduler.step()
        metrics = {"train/loss": float(np.mean(losses)), "train/lr": scheduler.get_last_lr()[0]}
        if val_cases and (epoch % params.val_every == 0 or epoch == params.epochs):
            metrics.update(validate(net, val_cases, params, device))
            score = metrics[f"val/{params.select_on}"]
            if not math.isnan(score) and score > best_metric:
                best_metric, best_epoch, best_state = score, epoch, _copy_state(net)
        elif not val_cases:
            best_epoch, best_state = epoch, _copy_state(net)
        history.append({"epoch": float(epoch), **metrics})
        on_epoch(epoch, metrics)
        progress("train", epoch, params.epochs)
    return TrainResult(best_state, best_epoch, best_metric, history)


def _train_transforms(params: TrainParams, seed: int) -> object:
    from medseg.transforms.presets import train_transforms

    compose = train_transforms(params)
    compose.set_random_state(seed=seed)
    return compose


def _copy_state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().cpu().clone() for name, tensor in net.state_dict().items()}
