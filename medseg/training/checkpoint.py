"""Training checkpoints: everything needed to continue a run exactly, loaded weights-only.

A checkpoint is written at the end of every epoch, atomically (temp file, then rename), so a
run killed at any moment finds the last complete epoch. It holds tensors, numbers, strings
and lists/dicts of them only, and is read with ``torch.load(weights_only=True)``: nothing
in it is unpickled as Python code.

Random state: every epoch reseeds all generators (torch, numpy, Python, the augmentation
transforms and the batch order) from ``(seed, epoch)``, so the RNG state at an epoch boundary
is a function of the seed and the epoch number stored here; resuming needs no generator
snapshot and gives bit-identical results on CPU.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast, get_args

import torch

from medseg.errors import StageError
from medseg.inference.card import StopReason

CHECKPOINT_FILE = "last_epoch.pt"


@dataclass
class TrainState:
    """Progress of a run besides the network and optimiser.

    Attributes:
        epoch: last completed epoch (0 before the first).
        best_metric: best validation score so far (``-inf`` before any validation).
        best_epoch: epoch of the best score.
        best_state: weights of the best epoch (CPU tensors; empty while the best is the
            current weights, as in a run without validation cases).
        history: per-epoch metrics ``{"epoch": e, "train/loss": ..., "val/...": ...}``.
        stale: validations since the best one (for early stopping).
        fitted_epochs: the epochs a minutes budget fitted after its first timed epoch, or
            after its first ``loop.PACE_SECONDS`` of them once ``paced`` (0: none fitted).
        paced: whether the fit was made again on that longer stretch of timed epochs.
        seconds: wall seconds of training so far, over every session of the run.
        stopped_by: ``patience`` or ``minutes`` once either ended the run before its last
            epoch (a resumed run then trains no further); ``schedule`` until then.

    """

    epoch: int = 0
    best_metric: float = float("-inf")
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    stale: int = 0
    fitted_epochs: int = 0
    paced: bool = False
    seconds: float = 0.0
    stopped_by: StopReason = "schedule"


def save_checkpoint(
    path: Path,
    *,
    net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    state: TrainState,
    params: dict[str, Any],
) -> None:
    """Write the full training state to ``path`` atomically."""
    payload = {
        "format": "medseg-checkpoint/1",
        "net": {name: tensor.detach().cpu() for name, tensor in net.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": state.epoch,
        "best_metric": state.best_metric,
        "best_epoch": state.best_epoch,
        "best_state": state.best_state,
        "history": state.history,
        "stale": state.stale,
        "fitted_epochs": state.fitted_epochs,
        "paced": state.paced,
        "seconds": state.seconds,
        "stopped_by": state.stopped_by,
        "params": json.dumps(params, sort_keys=True),
    }
    temporary = path.with_suffix(".tmp")
    torch.save(payload, temporary)
    os.replace(temporary, path)


def load_checkpoint(
    path: Path,
    *,
    net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    params: dict[str, Any],
) -> TrainState:
    """Restore net, optimiser, scheduler and scaler from ``path``; return the run's progress.

    Raises:
        StageError: the file is unreadable or was written for other params.

    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a damaged or foreign file
        raise StageError(
            f"checkpoint {path.name} in the workspace cannot be read ({type(exc).__name__}); "
            "delete it to train from the start"
        ) from exc
    if payload.get("params") != json.dumps(params, sort_keys=True):
        raise StageError(
            f"checkpoint {path.name} was written for other train params; delete it to train from the start"
        )
    net.load_state_dict(payload["net"])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    scaler.load_state_dict(payload["scaler"])
    return TrainState(
        epoch=int(payload["epoch"]),
        best_metric=float(payload["best_metric"]),
        best_epoch=int(payload["best_epoch"]),
        best_state=dict(payload["best_state"]),
        history=list(payload["history"]),
        stale=int(payload["stale"]),
        fitted_epochs=int(payload.get("fitted_epochs", 0)),
        paced=bool(payload.get("paced", False)),
        seconds=float(payload.get("seconds", 0.0)),
        stopped_by=_stop_reason(payload.get("stopped_by", "schedule")),
    )


def _stop_reason(value: object) -> StopReason:
    """A checkpoint's ``stopped_by`` (``schedule`` in one written before it was kept)."""
    return cast(StopReason, value) if value in get_args(StopReason) else "schedule"
