"""Plan a training run from the dataset fingerprint: the values a researcher would otherwise set.

``plan_training`` takes the fingerprint ingest wrote, the train params as the workflow gave them
and the device, and fills every *planned* value the workflow did not set (nnU-Net's idea,
sized for the machine at hand):

- ``spatial_dims``, ``target`` and ``select_on`` from the data (instance labels train the
  background/interior/border target and select on SEG; classes train foreground and Dice);
- ``patch_size``: the median image shape, shrunk (largest physical extent first) to
  ``planning.max_patch_voxels`` and to the smallest training image, in multiples of the net's
  total stride per axis;
- ``net.strides`` / ``net.channels``: halve an axis while its feature map stays at least
  ``planning.min_feature_size`` voxels and its spacing is within twice the finest one (thick
  slices are not pooled until the in-plane spacing catches up: anisotropic strides), up to
  ``planning.max_levels`` levels; widths double from ``planning.base_channels`` up to
  ``planning.max_channels``;
- ``batch_size`` × ``samples_per_image`` (patches per step): as many as a trial training
  step on the device says fit in ``planning.memory_gib`` (at least 2; at most
  ``planning.max_patches`` and 5 % of the dataset's voxels, as nnU-Net), shrinking the patch
  when not even 2 fit;
- ``border_width`` from the median object diameter; ``borders`` (which object edges are border
  in the ``boundary`` target) ``touching`` — only the bands between touching objects — when an
  all-round rim of that width would cut more than ``planning.rim_split_limit`` of the objects'
  interiors into pieces or leave them none (thin, irregular cells), else ``all``;
- the schedule: a ``budget`` of ``planning.steps`` optimiser steps unless the workflow sets
  ``epochs`` or a budget (a budget of steps and minutes is planned from its steps: the minutes
  only cap the run); unless ``epochs`` is set, ``epoch_repeats`` so an epoch has about
  ``planning.steps_per_epoch`` steps (fewer when a small steps budget would otherwise validate
  less than ``planning.validations`` times); ``val_every`` for about ``planning.validations``
  validations;
- ``compile``: on for one CPU process with a C++ compiler when the run pushes at least
  ``planning.compile_min_megavoxels`` million patch voxels through the net (steps × patches per
  step × patch voxels: decided from the plan, not from timings, so reruns plan the same).
"""

from __future__ import annotations

import math
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medseg.collective import current
from medseg.errors import ConfigError
from medseg.inference.settings import BorderKind
from medseg.io.fingerprint import RIM_WIDTHS, Fingerprint, ObjectStats
from medseg.nets.unet import axis_divisors
from medseg.params import Params
from medseg.training.params import PLANNED, PlanningParams, TrainBudget, TrainParams


@dataclass(frozen=True)
class TrialStep:
    """What one training step costs on the device, measured at a given patch size.

    Attributes:
        device: ``cpu`` or ``cuda:<n>``.
        bytes_per_patch: activation memory (bytes) that one more patch in the batch adds.
        fixed_bytes: parameters, gradients and optimiser state (bytes).
        seconds_per_patch: wall time of a training step per patch (s).

    """

    device: str
    bytes_per_patch: float
    fixed_bytes: float
    seconds_per_patch: float

    def patches_within(self, budget_bytes: float) -> int:
        """How many patches per step fit in ``budget_bytes``."""
        return int((budget_bytes - self.fixed_bytes) // max(self.bytes_per_patch, 1.0))


@dataclass(frozen=True)
class Plan:
    """The resolved train params and where each planned value came from.

    ``values`` maps each dotted key of ``PLANNED`` to its JSON value, ``origins`` to
    ``planned`` or ``set`` (by the workflow or pipeline), ``facts`` what the plan was derived
    from (fingerprint figures and the trial step).
    """

    params: TrainParams
    values: dict[str, Any]
    origins: dict[str, str]
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def planned(self) -> tuple[str, ...]:
        """The keys whose value the plan decided."""
        return tuple(key for key, origin in self.origins.items() if origin == "planned")

    @classmethod
    def from_document(cls, document: dict[str, Any]) -> Plan:
        """A plan read back from ``as_document()`` plus its ``params`` (resolved train params)."""
        return cls(
            TrainParams.model_validate(document["params"]),
            document["values"],
            document["origins"],
            document.get("facts", {}),
        )

    def as_document(self) -> dict[str, Any]:
        """The plan as JSON data (``plan.json``)."""
        return {"values": self.values, "origins": self.origins, "facts": self.facts}

    def loggable(self) -> dict[str, Any]:
        """``plan.<key>`` params for tracking: each planned value (JSON text for lists)."""
        return {f"plan.{key}": value for key, value in self.values.items()}


def _default_patch_cap(spatial_dims: int) -> int:
    return 256**2 if spatial_dims == 2 else 64**3


def plan_strides(
    patch: tuple[int, ...], spacing: tuple[float, ...], planning: PlanningParams
) -> tuple[int | tuple[int, ...], ...]:
    """Per-level strides for ``patch`` (voxels) at ``spacing`` (mm): nnU-Net's pooling rule.

    An axis is halved at a level while its feature map stays ≥ ``min_feature_size`` voxels
    and its current spacing is at most twice the finest current spacing. A level whose
    stride is 2 on every axis is written ``2``; an anisotropic level as a tuple (``(2, 2, 1)``).
    """
    sizes, current = list(patch), list(spacing)
    strides: list[int | tuple[int, ...]] = []
    while len(strides) < planning.max_levels - 1:
        finest = min(current)
        axes = [
            axis
            for axis in range(len(sizes))
            if sizes[axis] // 2 >= planning.min_feature_size and current[axis] <= 2 * finest
        ]
        if not axes:
            break
        for axis in axes:
            sizes[axis] //= 2
            current[axis] *= 2
        level = tuple(2 if axis in axes else 1 for axis in range(len(sizes)))
        strides.append(2 if set(level) == {2} else level)
    return tuple(strides)


def _shrink(patch: list[int], spacing: tuple[float, ...], divisors: tuple[int, ...]) -> bool:
    """Shrink the axis of largest physical extent by one step; False when no axis can shrink.

    A step is the axis's total stride (8 voxels before the strides are known), so the patch
    ends close under the voxel cap.
    """
    order = sorted(range(len(patch)), key=lambda axis: patch[axis] * spacing[axis], reverse=True)
    for axis in order:
        step = divisors[axis] if divisors[axis] > 1 else 8
        if patch[axis] - step >= max(step, 8):
            patch[axis] -= step
            return True
    return False


def _fit_patch(
    start: tuple[int, ...],
    limit: tuple[int, ...],
    spacing: tuple[float, ...],
    strides: tuple[int | tuple[int, ...], ...],
    cap: int,
) -> tuple[int, ...]:
    """``start`` shrunk under ``cap`` voxels and ``limit`` per axis, floored to the stride multiples."""
    divisors = axis_divisors(strides, len(start))
    patch = [min(size, bound) for size, bound in zip(start, limit, strict=True)]
    while math.prod(patch) > cap and _shrink(patch, spacing, divisors):
        pass
    return tuple(max(div, size // div * div) for size, div in zip(patch, divisors, strict=True))


def trial_step(params: TrainParams, in_channels: int, *, device: torch.device, patches: int = 2) -> TrialStep:
    """Run training steps of ``patches`` patches on ``device`` and measure what one patch costs.

    On CUDA the peak allocated memory of a 1- and a ``patches``-patch step gives the per-patch
    and fixed memory. On CPU the tensors autograd saves for the backward pass are counted
    (activation memory, the part that grows with the batch) and the fixed part is parameters ×
    4 (weights, gradients, two Adam moments).
    """
    from medseg.training.loop import build_training_net
    from medseg.training.targets import target_classes

    torch.manual_seed(0)
    net = build_training_net(params, in_channels).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    fixed = 4.0 * sum(p.numel() * p.element_size() for p in net.parameters())
    weights = {p.untyped_storage().data_ptr() for p in net.parameters()}

    def step(count: int) -> float:
        image = torch.randn(count, in_channels, *params.patch_size, device=device)
        target = torch.randint(0, target_classes(params.target), (count, *params.patch_size), device=device)
        saved: dict[int, int] = {}  # storage address → bytes: views of one storage count once

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in weights:  # parameters are in the fixed part
                saved[storage.data_ptr()] = storage.nbytes()
            return tensor

        optimizer.zero_grad(set_to_none=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = torch.nn.functional.cross_entropy(net(image), target)
        loss.backward()
        optimizer.step()
        return float(sum(saved.values()))

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peaks = []
        for count in (1, patches):
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            step(count)
            torch.cuda.synchronize(device)
            peaks.append(torch.cuda.max_memory_allocated(device) - base)
        per_patch = (peaks[1] - peaks[0]) / max(patches - 1, 1)
        fixed = max(fixed, peaks[0] - per_patch)
    else:
        per_patch = step(patches) / patches
    started = time.perf_counter()
    step(patches)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - started) / patches
    return TrialStep(str(device), per_patch, fixed, seconds)


UNTIL_BUDGET = 100_000
"""Planned ``epochs`` under a minutes budget: the run stops when the minutes are spent."""


def _json(value: Any) -> Any:
    if isinstance(value, Params):
        return value.model_dump(mode="json")
    if isinstance(value, tuple):
        return [_json(item) for item in value]
    return value


def _borders(objects: ObjectStats, width: int, planning: PlanningParams) -> BorderKind:
    """``touching`` when an all-round rim of ``width`` voxels would cut too many objects' interiors.

    ``objects.rim_split`` holds, per rim width of ``RIM_WIDTHS``, the fraction of objects whose
    inner part is not one piece; beyond ``planning.rim_split_limit`` the plan marks only the
    borders between touching objects. No rim statistics (class labels) or a width past
    ``RIM_WIDTHS``: ``all``.
    """
    if width not in RIM_WIDTHS or len(objects.rim_split) != len(RIM_WIDTHS):
        return "all"
    return "touching" if objects.rim_split[RIM_WIDTHS.index(width)] > planning.rim_split_limit else "all"


def plan_training(
    fingerprint: Fingerprint,
    params: TrainParams,
    *,
    train_cases: int,
    device: torch.device,
) -> Plan:
    """Fill the planned values ``params`` leaves unset from the fingerprint and a trial step.

    Args:
        fingerprint: the dataset's fingerprint (``io.fingerprint``).
        params: the train params as configured; values set there are kept as they are.
        train_cases: cases in the train split.
        device: where training will run (the trial step runs there).

    Raises:
        ConfigError: not even 2 patches of the smallest patch fit in ``planning.memory_gib``.

    """
    planning = params.planning
    fixed = params.explicit_planned()
    update: dict[str, Any] = {}

    def choose(key: str, value: Any) -> None:
        if key not in fixed:
            update[key] = value

    dims = params.spatial_dims if "spatial_dims" in fixed else fingerprint.spatial_dims
    choose("spatial_dims", dims)
    choose("target", "boundary" if fingerprint.instance_labels else "foreground")
    target = update.get("target", params.target)
    choose("select_on", "seg" if target == "boundary" else "dice")
    if fingerprint.objects is not None:
        choose("border_width", int(min(4, max(1, round(fingerprint.objects.diameter_median / 30)))))
        width = update.get("border_width", params.border_width)
        choose("borders", _borders(fingerprint.objects, width, planning))
    spacing = fingerprint.spacing_median if len(fingerprint.spacing_median) == dims else (1.0,) * dims
    cap = planning.max_patch_voxels or _default_patch_cap(dims)
    start = params.patch_size if "patch_size" in fixed else fingerprint.shape_median
    limit = params.patch_size if "patch_size" in fixed else fingerprint.shape_min
    base = planning.base_channels or (16 if dims == 2 else 8)
    budget_bytes = planning.memory_gib * 2**30
    while True:
        if {"net.channels", "net.strides"} & fixed:
            strides = params.net.strides
        else:
            strides = plan_strides(_fit_patch(start, limit, spacing, (), cap), spacing, planning)
        patch = (
            params.patch_size if "patch_size" in fixed else _fit_patch(start, limit, spacing, strides, cap)
        )
        net = params.net
        if not {"net.channels", "net.strides"} & fixed:
            channels = tuple(min(planning.max_channels, base * 2**level) for level in range(len(strides) + 1))
            net = params.net.model_copy(update={"channels": channels, "strides": strides})
        candidate = params.model_copy(
            update={"spatial_dims": dims, "target": target, "patch_size": tuple(patch), "net": net}
        )
        trial = trial_step(candidate, fingerprint.channels, device=device)
        fit = trial.patches_within(budget_bytes)
        if fit >= 2 or "patch_size" in fixed or math.prod(patch) <= 8**dims:
            break
        shrunk = list(patch)
        if not _shrink(shrunk, spacing, axis_divisors(strides, dims)):
            break
        start, cap = tuple(shrunk), math.prod(shrunk)
    if fit < 2:
        need = (trial.fixed_bytes + 2 * trial.bytes_per_patch) / 2**30
        raise ConfigError(
            f"train.planning.memory_gib={planning.memory_gib:g} cannot hold a training step of 2 patches "
            f"of {tuple(patch)} voxels on {trial.device} (needs {need:.2f} GiB); raise "
            "train.planning.memory_gib, or set a smaller train.patch_size / narrower train.net"
        )
    choose("patch_size", tuple(patch))
    choose("net.channels", net.channels)
    choose("net.strides", net.strides)
    dataset_voxels = fingerprint.cases * math.prod(fingerprint.shape_median)
    dataset_cap = max(2, int(0.05 * dataset_voxels / math.prod(patch)))
    patches = max(2, min(fit, planning.max_patches, dataset_cap))
    spi = params.samples_per_image if "samples_per_image" in fixed else min(4, patches)
    choose("samples_per_image", spi)
    choose("batch_size", max(1, patches // spi))
    batch = update.get("batch_size", params.batch_size)
    if "epochs" not in fixed and "budget" not in fixed:
        choose("budget", TrainBudget(steps=planning.steps))
    budget = update.get("budget", params.budget)
    epoch_steps = planning.steps_per_epoch
    if budget is not None and budget.steps is not None:  # a small budget still validates often
        epoch_steps = max(1, min(epoch_steps, budget.steps // planning.validations))
    if "epochs" not in fixed:  # epochs set by hand keep their meaning: passes over the cases
        choose("epoch_repeats", max(1, round(epoch_steps * batch / max(1, train_cases))))
    from medseg.training.loop import steps_per_epoch

    repeats = update.get("epoch_repeats", params.epoch_repeats)
    samples = max(1, train_cases) * repeats
    step_seconds = trial.seconds_per_patch * batch * spi
    if budget is not None and budget.steps is not None:  # minutes beside steps only cap the run
        steps_expected = budget.steps
    elif budget is not None and budget.minutes is not None:
        steps_expected = budget.minutes * 60 / max(step_seconds, 1e-9)
    else:
        steps_expected = params.epochs * math.ceil(samples / batch)
    megavoxels = steps_expected * batch * spi * math.prod(patch) / 1e6
    choose("compile", megavoxels >= planning.compile_min_megavoxels and can_compile(device))
    compiled = params.model_copy(
        update={"batch_size": batch, "compile": update.get("compile", params.compile)}
    )
    per_epoch = steps_per_epoch(samples, compiled, 1)
    if budget is not None and budget.steps is not None:
        epochs_expected = max(1, round(budget.steps / per_epoch))
        choose("epochs", epochs_expected)
    elif budget is not None and budget.minutes is not None:
        epochs_expected = max(1, int(budget.minutes * 60 / max(step_seconds * per_epoch, 1e-9)))
        choose("epochs", UNTIL_BUDGET)
    else:
        epochs_expected = params.epochs
    choose("val_every", max(1, epochs_expected // planning.validations))
    nested = {key: value for key, value in update.items() if not key.startswith("net.")}
    if "net.channels" in update:
        nested["net"] = net
    resolved = TrainParams.model_validate(
        {**params.model_dump(exclude_unset=True), **{k: _json(v) for k, v in nested.items()}}
    )
    values = {key: _json(_get(resolved, key)) for key in PLANNED}
    origins = {key: "set" if key in fixed else "planned" for key in PLANNED}
    facts = {
        "device": trial.device,
        "trial_mib_per_patch": round(trial.bytes_per_patch / 2**20, 2),
        "trial_fixed_mib": round(trial.fixed_bytes / 2**20, 2),
        "trial_patches_fit": fit,
        "trial_steps_per_s": round(1 / max(trial.seconds_per_patch * batch * spi, 1e-9), 3),
        "expected_epochs": epochs_expected,
        "steps_per_epoch": per_epoch,
        "spacing_median": list(fingerprint.spacing_median),
        "shape_median": list(fingerprint.shape_median),
        "object_diameter_median": fingerprint.objects.diameter_median if fingerprint.objects else None,
        "object_rim_split": list(fingerprint.objects.rim_split) if fingerprint.objects else None,
    }
    return Plan(resolved, values, origins, facts)


def can_compile(device: torch.device) -> bool:
    """Whether ``torch.compile`` is planned on ``device``.

    Yes for one CPU process with a C++ compiler and the Python headers (what inductor's CPU
    backend builds with); not on CUDA, where its gain was not measured.
    """
    if device.type != "cpu" or current().world_size > 1:
        return False
    from torch._inductor.cpp_builder import get_cpp_compiler
    from torch._inductor.exc import InvalidCxxCompiler

    try:
        get_cpp_compiler()
    except InvalidCxxCompiler:
        return False
    return Path(sysconfig.get_paths()["include"], "Python.h").is_file()


def _get(params: TrainParams, key: str) -> Any:
    value: Any = params
    for part in key.split("."):
        value = getattr(value, part)
    return value
