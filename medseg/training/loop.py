"""The training loop: MONAI parts, our small loop, progress and metrics through callbacks.

Runs in one process or under ``torchrun`` (DistributedDataParallel, one process per device
or CPU share): when a process group is initialised, each rank trains on its share of every
batch, gradients are averaged, and only rank 0 validates, reports and writes checkpoints.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from medseg.collective import Collective, broadcast_flag, broadcast_value, current, mean_over_ranks
from medseg.errors import ConfigError, DataError, StageError
from medseg.inference.card import StopReason
from medseg.inference.predict import segment_instances
from medseg.metrics.evaluate import evaluate_case, summarize
from medseg.nets.unet import build_net
from medseg.threads import loader_threads
from medseg.training.augment import known_centres
from medseg.training.checkpoint import TrainState, load_checkpoint, save_checkpoint
from medseg.training.losses import LossFunction, build_loss
from medseg.training.optim import build_optimizer
from medseg.training.params import TrainParams
from medseg.training.targets import IGNORED, border_weight_map, make_target, target_classes

CaseLoader = Callable[[], tuple[np.ndarray, np.ndarray]]
"""Returns ``(image (C, *spatial) float32, instances (*spatial) int32)``; ``-1``: label unknown."""


@dataclass(frozen=True)
class TrainingCase:
    """One case: its id, channel count, spatial shape and a loader of its arrays."""

    case_id: str
    channels: int
    shape: tuple[int, ...]
    load: CaseLoader

    @classmethod
    def in_memory(cls, case_id: str, image: np.ndarray, instances: np.ndarray) -> TrainingCase:
        """A case from arrays: image ``(C, *spatial)`` float32, instances ``(*spatial)`` int32."""
        return cls(case_id, int(image.shape[0]), tuple(instances.shape), lambda: (image, instances))


@dataclass
class TrainResult:
    """Best and last weights, the per-epoch history of metrics, and optimiser steps per second.

    ``stopped_by`` says what ended the run: its last scheduled epoch, early stopping
    (``patience``) or the minutes of its budget (before the epochs a steps budget bought, the run
    is cut short; a minutes-only budget always ends this way).
    """

    state_dict: dict[str, torch.Tensor]
    last_state_dict: dict[str, torch.Tensor]
    best_epoch: int
    best_metric: float
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int = 0
    world_size: int = 1
    steps_per_s: float = 0.0
    stopped_by: StopReason = "schedule"

    @property
    def epochs_run(self) -> int:
        """Epochs completed (fewer than asked when early stopping ended the run)."""
        return int(self.history[-1]["epoch"]) if self.history else 0

    @property
    def steps_run(self) -> int:
        """Optimiser steps taken per rank (fewer than a budget's steps when its minutes cut the run)."""
        return int(sum(row["train/steps"] for row in self.history))


EpochCallback = Callable[[int, dict[str, float]], None]


class ProgressFn(Protocol):
    """``progress(description, completed, total, status)``."""

    def __call__(self, description: str, completed: float, total: float, status: str = "") -> None:
        """Report progress."""


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise StageError("train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (all devices)."""
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of every random choice in ``epoch`` (31-bit, distinct per epoch)."""
    return (seed * 1_000_003 + epoch * 7_919) % (2**31 - 1)


def _scheduler(optimizer: torch.optim.Optimizer, params: TrainParams) -> torch.optim.lr_scheduler.LRScheduler:
    if params.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=params.epochs)
    if params.schedule == "poly":
        return torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=params.epochs, power=0.9)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


def check_cases(cases: Sequence[TrainingCase], params: TrainParams, split: str) -> None:
    """Refuse cases that cannot be trained on with these params, naming the case.

    Raises:
        DataError: wrong dimensionality, or a patch larger than the image.

    """
    if len(params.patch_size) != params.spatial_dims:
        raise DataError(
            f"train.patch_size {params.patch_size} has {len(params.patch_size)} entries for "
            f"spatial_dims={params.spatial_dims}; give one size per axis or leave it to the plan"
        )
    for case in cases:
        if len(case.shape) != params.spatial_dims:
            raise DataError(
                f"{split} case {case.case_id} is {len(case.shape)}D but train.spatial_dims is "
                f"{params.spatial_dims}; set train.spatial_dims to match the data"
            )
        if split == "train" and any(p > s for p, s in zip(params.patch_size, case.shape, strict=True)):
            raise DataError(
                f"train case {case.case_id} has shape {case.shape}, smaller than train.patch_size "
                f"{params.patch_size}; lower train.patch_size to at most the image size (multiples of "
                f"{params.net.size_divisors(params.spatial_dims)} per axis)"
            )


def prepare_sample(case: TrainingCase, params: TrainParams) -> dict[str, np.ndarray]:
    """The training sample of a case: image, class target and (weighted losses) loss weights.

    A case with unknown voxels also carries the known voxels its patches may centre on
    (``augment.known_centres``).
    """
    image, instances = case.load()
    target = make_target(instances, params.target, params.border_width, params.borders)
    sample = {"image": image, "label": target, **known_centres(target)}
    if params.loss.weighted:
        known = np.maximum(instances, 0)
        sample["weight"] = border_weight_map(known, w0=params.loss.w0, sigma=params.loss.sigma)
    return sample


def sample_bytes(case: TrainingCase, params: TrainParams) -> int:
    """Memory of a prepared sample in bytes (image float32, target uint8, weights float32).

    A case with unknown voxels also holds up to 4 bytes per voxel of patch-centre indices.
    """
    voxels = math.prod(case.shape)
    return voxels * (4 * case.channels + 1 + (4 if params.loss.weighted else 0))


class _PrepareSample:
    """Callable transform: a ``TrainingCase`` → its prepared sample (the lazy, from-disk path)."""

    def __init__(self, params: TrainParams) -> None:
        self.params = params

    def __call__(self, case: TrainingCase) -> dict[str, np.ndarray]:
        return prepare_sample(case, self.params)


def validate(
    net: torch.nn.Module,
    cases: Sequence[TrainingCase],
    params: TrainParams,
    device: torch.device,
) -> dict[str, float]:
    """Foreground Dice, IoU and CTC SEG of ``net`` on whole validation images."""
    net.eval()
    results = []
    for case in cases:
        image, reference = case.load()
        instances = segment_instances(net, image, params.inference, device=device)
        unknown = reference == IGNORED
        ignore = unknown if unknown.any() else None
        results.append(evaluate_case(case.case_id, np.maximum(reference, 0), instances, ignore=ignore))
    summary = summarize(results)
    return {"val/dice": summary.dice, "val/seg": summary.seg, "val/iou": summary.iou}


@dataclass
class _Session:
    """Everything one training run holds: device, net (and its DDP wrapper), optimiser state."""

    params: TrainParams
    collective: Collective
    device: torch.device
    net: torch.nn.Module
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    loss: LossFunction
    state: TrainState
    use_amp: bool
    requested: TrainParams  # as given: what a checkpoint is written for (``params`` may hold fitted epochs)

    def save(self, checkpoint: Path) -> None:
        """Write the resumable training state to ``checkpoint``."""
        save_checkpoint(
            checkpoint,
            net=self.net,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            scaler=self.scaler,
            state=self.state,
            params=self.requested.model_dump(mode="json"),
        )


def train_segmentation(
    train_cases: Sequence[TrainingCase],
    val_cases: Sequence[TrainingCase],
    params: TrainParams,
    *,
    seed: int,
    on_epoch: EpochCallback,
    progress: ProgressFn,
    checkpoint: Path | None = None,
) -> TrainResult:
    """Train a U-Net on ``params.target`` targets, keeping the best validation weights.

    Args:
        train_cases: cases sampled into patches each epoch.
        val_cases: cases evaluated whole every ``params.val_every`` epochs (may be empty:
            then the last epoch's weights are the best).
        seed: drives weight init and, per epoch, patch sampling, augmentation and batch order.
        on_epoch: receives ``(epoch, metrics)`` with ``train/loss`` (mean over ranks),
            ``train/lr``, ``train/steps`` (optimiser steps per rank) and ``val/*`` (rank 0 only).
        progress: receives ``("train", epoch, epochs, "loss 0.123")``.
        checkpoint: file holding the training state after each epoch; when it exists the
            run continues from it and ends as an uninterrupted run would (bit-identical on CPU).

    Raises:
        StageError: the loss became NaN (the checkpoint of the last good epoch is kept).
        DataError: a case does not fit the params (dimensionality, patch size).

    """
    if not train_cases:
        raise DataError("the train split is empty; add labelled cases or lower the split fractions")
    check_cases(train_cases, params, "train")
    check_cases(val_cases, params, "val")
    samples = len(train_cases) * params.epoch_repeats
    params = fit_steps_budget(params, samples, bool(val_cases), current().world_size)
    session = _start(params, train_cases[0].channels, seed, checkpoint)
    resumed_from, rank, world = session.state.epoch, session.collective.rank, session.collective.world_size
    dataset = _dataset(train_cases, params)
    clock = _Clock(params, session.state)
    # A run that stopped early stays stopped when a checkpoint written at its stop is resumed.
    first = params.epochs + 1 if session.state.stopped_by != "schedule" else session.state.epoch + 1
    for epoch in range(first, params.epochs + 1):
        metrics = _run_epoch(session, dataset, seed, epoch)
        patience = rank == 0 and _validate_epoch(
            session.net, val_cases, session.params, session.device, epoch, metrics, session.state
        )
        timed = clock.lap(session, epoch, metrics)
        stop = patience or timed
        if rank == 0 and stop and epoch < params.epochs:
            session.state.stopped_by = "patience" if patience else "minutes"
        session.state.epoch = epoch
        session.state.history.append({"epoch": float(epoch), **metrics})
        if rank == 0:
            on_epoch(epoch, {**metrics, "train/steps_per_s": clock.rate})  # not in the reproducible history
            progress("train", epoch, session.params.epochs, f"loss {metrics['train/loss']:.4f}")
            if checkpoint is not None and (stop or _checkpoint_due(session.params, epoch)):
                session.save(checkpoint)
        if broadcast_flag(stop, world):
            break
    return _result(session, resumed_from, clock.rate)


def _result(session: _Session, resumed_from: int, steps_per_s: float) -> TrainResult:
    """The run's result from its session: best and last weights, history, what ended it."""
    state, last = session.state, _copy_state(session.net)
    best = state.best_state or last
    return TrainResult(
        best,
        last,
        state.best_epoch,
        state.best_metric,
        state.history,
        resumed_from,
        session.collective.world_size,
        steps_per_s,
        state.stopped_by,
    )


def fit_steps_budget(params: TrainParams, samples: int, validates: bool, world: int) -> TrainParams:
    """``params`` with ``epochs`` set to the whole epochs a steps budget buys (unchanged otherwise).

    ``samples`` is the number of dataset items an epoch visits (cases × ``epoch_repeats``).

    Raises:
        DataError: the budget does not reach the first validation.

    """
    if params.budget is None or params.budget.steps is None:
        return params
    per_epoch = steps_per_epoch(samples, params, world)
    epochs = max(1, round(params.budget.steps / per_epoch))
    if validates and params.budget.steps < per_epoch * min(params.val_every, epochs):
        raise DataError(
            f"train.budget.steps={params.budget.steps} ends before the first validation "
            f"({per_epoch} steps per epoch × val_every {params.val_every}); raise the budget or lower "
            "train.val_every / train.samples_per_image"
        )
    return params.model_copy(update={"epochs": epochs})


def steps_per_epoch(samples: int, params: TrainParams, world: int) -> int:
    """Optimiser steps per rank in an epoch over ``samples`` dataset items."""
    batch = params.batch_size * world
    if _drops_partial_batch(samples, params, world):
        return samples // batch
    return max(1, math.ceil(samples / batch))


def _drops_partial_batch(samples: int, params: TrainParams, world: int) -> bool:
    """Whether an epoch of ``samples`` items drops its last partial batch.

    A compiled run does (one graph shape for every step) unless the epoch holds no full batch.
    """
    return params.compile and samples >= params.batch_size * world


PACE_SECONDS = 60.0
"""Timed epochs (s) after which a minutes budget's schedule is fitted again, once.

The first fit rests on one epoch (seconds on a small plan), so a moment of load on the machine
there would cut the run; the second rests on this minute of epochs.
"""


class _Clock:
    """Wall-clock bookkeeping of a run: ``train/steps_per_s``, and a minutes budget's schedule."""

    def __init__(self, params: TrainParams, state: TrainState) -> None:
        self.started = time.monotonic()
        self.planned_epochs = params.epochs  # what a steps budget bought: no fit goes past it
        self.before = state.seconds  # training seconds of earlier sessions (a resumed run)
        self.resumed_from = state.epoch
        self.steps = 0.0
        self.rate = 0.0
        self.first_lap = 0.0  # seconds of this session's first epoch
        self.seconds = (
            0.0 if params.budget is None or params.budget.minutes is None else params.budget.minutes * 60
        )

    def lap(self, session: _Session, epoch: int, metrics: dict[str, float]) -> bool:
        """Record the epoch; with a minutes budget, fit the schedule and say when to stop.

        The schedule is fitted after epoch 1, or for a compiled run after epoch 2 on that
        epoch's time (the first holds the compile), never past the epochs a steps budget beside
        the minutes bought; it is fitted again, once, on the mean epoch of the session's first
        ``PACE_SECONDS`` of timed epochs (up or down: a slow first epoch no longer cuts the run).
        Under DDP every rank reads rank 0's clock, so all fit the same schedule.

        Raises:
            StageError: the first epoch and its validation alone took longer than the budget.

        """
        here = broadcast_value(time.monotonic() - self.started, session.collective.world_size)
        elapsed = self.before + here
        session.state.seconds = elapsed
        self.steps += metrics["train/steps"]
        self.rate = self.steps / max(here, 1e-9)
        if not self.seconds:
            return False
        if epoch == 1 and elapsed > self.seconds:
            raise StageError(
                f"train.budget.minutes={self.seconds / 60:g} is too small for one epoch and its "
                f"validation ({elapsed / 60:.1f} min here); raise the budget to at least "
                f"{2 * elapsed / 60:.0f} min or use fewer samples_per_image"
            )
        laps = epoch - self.resumed_from
        if laps == 1:
            self.first_lap = here
        # A compiled session's first epoch holds the compile: later epochs are timed without it.
        compiled = session.params.compile
        if compiled and laps == 1:  # how long an epoch takes is known after the second
            return epoch >= session.params.epochs
        timed = here - self.first_lap if compiled else here
        per_epoch = timed / (laps - 1 if compiled else laps)
        first_fit = not session.state.fitted_epochs and laps == (2 if compiled else 1)
        if first_fit or (session.state.fitted_epochs and not session.state.paced and timed >= PACE_SECONDS):
            session.state.paced = not first_fit
            fit = max(epoch, min(self.planned_epochs, epoch + int((self.seconds - elapsed) // per_epoch)))
            session.state.fitted_epochs = fit
            session.params = session.params.model_copy(update={"epochs": fit})
            _set_horizon(session.scheduler, fit)
        return epoch >= session.params.epochs or elapsed + per_epoch > self.seconds


def _set_horizon(scheduler: torch.optim.lr_scheduler.LRScheduler, epochs: int) -> None:
    """Make the learning-rate schedule end after ``epochs`` epochs."""
    if isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR):
        scheduler.T_max = epochs
    elif isinstance(scheduler, torch.optim.lr_scheduler.PolynomialLR):
        scheduler.total_iters = epochs


def _checkpoint_due(params: TrainParams, epoch: int) -> bool:
    return epoch % params.checkpoint_every == 0 or epoch == params.epochs


def build_training_net(params: TrainParams, in_channels: int) -> torch.nn.Module:
    """The untrained net of ``params``: ``(N, in_channels, *spatial)`` → one logit per target class."""
    return build_net(
        params.net,
        spatial_dims=params.spatial_dims,
        in_channels=in_channels,
        out_channels=target_classes(params.target),
    )


def _start(params: TrainParams, channels: int, seed: int, checkpoint: Path | None) -> _Session:
    """Build net, optimiser, schedule and loss on this rank's device; resume from ``checkpoint``."""
    collective = current()
    device = resolve_device(params.device)
    if device.type == "cuda" and collective.world_size > 1:
        device = torch.device("cuda", collective.rank % torch.cuda.device_count())
    use_amp = params.amp and device.type == "cuda"
    # CUDA: autotuned cuDNN kernels and AMP are fast but not bit-reproducible; CPU runs are.
    torch.backends.cudnn.benchmark = device.type == "cuda"
    torch.backends.cudnn.deterministic = False
    seed_everything(seed)
    net = build_training_net(params, channels).to(device)
    model: torch.nn.Module = net
    if collective.world_size > 1:
        if params.compile:
            raise ConfigError(
                "train.compile is not supported under torchrun; set train.compile: false for a "
                "distributed run"
            )
        model = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device] if device.type == "cuda" else None
        )
    elif params.compile:
        model = torch.compile(net)  # shares net's parameters: validation and checkpoints use net
    optimizer = build_optimizer(net.parameters(), params.optim)
    scheduler = _scheduler(optimizer, params)
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)
    state = TrainState()
    if checkpoint is not None and checkpoint.is_file():
        state = load_checkpoint(
            checkpoint,
            net=net,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            params=params.model_dump(mode="json"),
        )
    loss = build_loss(params.loss)
    fitted = params.model_copy(update={"epochs": state.fitted_epochs}) if state.fitted_epochs else params
    return _Session(
        fitted, collective, device, net, model, optimizer, scheduler, scaler, loss, state, use_amp, params
    )


def _dataset(train_cases: Sequence[TrainingCase], params: TrainParams) -> Any:
    """The epoch's samples with their augmentation: prepared in memory when they fit, else lazily."""
    from monai.data import Dataset

    from medseg.training.augment import train_transforms

    transforms = train_transforms(params)
    if sum(sample_bytes(case, params) for case in train_cases) <= params.cache_gib * 2**30:
        samples = [prepare_sample(case, params) for case in train_cases]
        return Dataset(samples * params.epoch_repeats, transforms)
    from monai.transforms import Compose

    return Dataset(
        list(train_cases) * params.epoch_repeats,
        Compose([_PrepareSample(params), *transforms.transforms]),
    )


def _run_epoch(session: _Session, dataset: Any, seed: int, epoch: int) -> dict[str, float]:
    """Train one epoch (seeded from ``seed`` and ``epoch``), step the schedule; its ``train/*`` metrics."""
    rank, world = session.collective.rank, session.collective.world_size
    seed_now = epoch_seed(seed, epoch)
    seed_everything(seed_now + rank)
    threads = torch.get_num_threads()  # loader worker processes take cores of their own
    torch.set_num_threads(loader_threads(threads, session.params.num_workers))
    try:
        losses = _train_epoch(session, _loader(dataset, session.params, seed_now, rank, world), epoch)
    finally:
        torch.set_num_threads(threads)
    session.scheduler.step()
    return {
        "train/loss": mean_over_ranks(float(np.mean(losses)) if losses else math.nan, world),
        "train/lr": session.scheduler.get_last_lr()[0],
        "train/steps": float(len(losses)),
    }


def _train_epoch(session: _Session, loader: Any, epoch: int) -> list[float]:
    """One pass over ``loader``; the loss of every optimiser step."""
    device, optimizer, scaler = session.device, session.optimizer, session.scaler
    session.model.train()
    losses = []
    for batch in loader:
        batch = {key: value.to(device) for key, value in batch.items()}
        optimizer.zero_grad(set_to_none=True)
        with _compiler_errors():
            with torch.autocast(device.type, enabled=session.use_amp):
                logits = session.model(batch["image"])
            loss = session.loss(logits, batch)
            if not torch.isfinite(loss):
                raise StageError(
                    f"training loss became {loss.item()} at epoch {epoch}; the checkpoint of epoch "
                    f"{epoch - 1} is kept. Lower train.optim.lr or check the intensity normalisation"
                )
            scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(float(loss.item()))
    return losses


@contextmanager
def _compiler_errors() -> Iterator[None]:
    """Turn a failed ``torch.compile`` of the training step (forward or backward) into a StageError."""
    try:
        yield
    except torch._dynamo.exc.BackendCompilerFailed as error:
        raise StageError(
            f"torch.compile could not build the training step ({type(error.inner_exception).__name__}); "
            "set train.compile: false, or install a C++ compiler and the Python headers"
        ) from error


def _validate_epoch(
    net: torch.nn.Module,
    val_cases: Sequence[TrainingCase],
    params: TrainParams,
    device: torch.device,
    epoch: int,
    metrics: dict[str, float],
    state: TrainState,
) -> bool:
    """Validate when due, update the best weights; return True when early stopping is due."""
    if not val_cases:  # the last epoch is the best; its weights are taken at the end
        state.best_epoch = epoch
        return False
    if epoch % params.val_every and epoch != params.epochs:
        return False
    metrics.update(validate(net, val_cases, params, device))
    score = metrics[f"val/{params.select_on}"]
    if not math.isnan(score) and score > state.best_metric:
        state.best_metric, state.best_epoch, state.best_state = score, epoch, _copy_state(net)
        state.stale = 0
        return False
    state.stale += 1
    return bool(params.patience) and state.stale >= params.patience


def _loader(dataset: Any, params: TrainParams, seed: int, rank: int, world: int) -> Any:
    """Batches of one epoch; under DDP each rank reads its share (``batch_size`` per rank).

    MONAI's ``DataLoader`` seeds the dataset's random transforms from ``generator``, so the
    augmentation of the epoch follows from ``seed`` (and differs between ranks).
    """
    from monai.data import DataLoader
    from torch.utils.data import DistributedSampler

    generator = torch.Generator().manual_seed(seed + rank)
    order = (
        {"sampler": DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)}
        if world > 1
        else {"shuffle": True}
    )
    return DataLoader(
        dataset,
        batch_size=params.batch_size,
        num_workers=params.num_workers,
        generator=generator,
        drop_last=_drops_partial_batch(len(dataset), params, world),
        **order,
    )


def _copy_state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().cpu().clone() for name, tensor in net.state_dict().items()}
