"""Params of the train stage."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from medseg.inference.settings import BorderKind, InferenceSettings, TargetKind
from medseg.nets.unet import NetParams
from medseg.params import Params
from medseg.training.losses import LossParams
from medseg.training.optim import OptimParams


class AugmentParams(Params):
    """Random augmentation applied to training patches only (MONAI transforms).

    ``elastic`` is the probability of a smooth elastic deformation, the U-Net paper's main
    augmentation. In 2D it is the paper's scheme: random displacements on a coarse grid of
    control points ``elastic_scale`` voxels apart, interpolated smoothly (MONAI
    ``Rand2DElasticd``); in 3D a random displacement field smoothed by a Gaussian of σ =
    ``elastic_scale`` voxels (``Rand3DElasticd``). ``elastic_magnitude`` scales the
    displacements (voxels). ``rotate`` is the largest random rotation in degrees; it is
    applied with the elastic deformation when that is on (one interpolation), else alone.
    ``rotate90`` turns patches by 90° in a plane of two equally long patch axes, and not at
    all when no two are equal (``augment.rotation_plane``). ``intensity`` is the range of a
    random intensity scale (×(1 ± intensity)) and shift (± intensity), each with probability
    0.5. ``gamma`` is the probability of nnU-Net's gamma augmentation: the patch, rescaled to
    [0, 1], raised to a power drawn from [0.7, 1.5] and brought back to its own mean and standard
    deviation (MONAI ``RandAdjustContrastd``), which brightens or dims faint structures against
    bright ones; ``blur`` is the probability of a Gaussian blur of σ in [0.5, 1] voxels per axis
    (``RandGaussianSmoothd``). Both are free of the intensity scale, so they suit every
    normalisation scheme.
    """

    flip: bool = True
    rotate90: bool = True
    rotate: float = Field(0.0, ge=0, le=180)
    intensity: float = Field(0.1, ge=0, le=1)
    gamma: float = Field(0.0, ge=0, le=1)
    blur: float = Field(0.0, ge=0, le=1)
    elastic: float = Field(0.0, ge=0, le=1)
    elastic_scale: float = Field(32.0, gt=0)
    elastic_magnitude: float = Field(6.0, ge=0)


class TrainBudget(Params):
    """How much training to buy: optimiser ``steps`` (reproducible), wall-clock ``minutes``, or both.

    The schedule (learning rate over epochs, the last validation) fits the budget instead of
    ``train.epochs``. ``steps`` becomes a whole number of epochs; ``minutes`` is measured on
    the first epoch (training and validation; a compiled run: the second, as the first holds the
    compile) and the rest is fitted to it, then fitted again, once, on the mean of the first
    minute of timed epochs (so a moment of load during one short epoch does not cut the run), so
    two runs may differ by an epoch. With both, the steps plan the run and the minutes cap it:
    where the steps fit in the minutes the run is the steps-only run, bit for bit; on a machine
    too slow for them the schedule is fitted to the minutes as above (``train/steps_run`` then
    falls short of the steps). Every run records ``train/steps_per_s``, so a steps budget can be
    set from a minutes run on the same machine.
    """

    steps: int | None = Field(None, ge=1)
    minutes: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _given(self) -> TrainBudget:
        if self.steps is None and self.minutes is None:
            raise ValueError("give steps, minutes or both")
        return self


PLANNED = (
    "spatial_dims",
    "target",
    "select_on",
    "patch_size",
    "net.channels",
    "net.strides",
    "batch_size",
    "samples_per_image",
    "border_width",
    "borders",
    "budget",
    "epochs",
    "epoch_repeats",
    "val_every",
    "compile",
)
"""The train params a plan decides when the workflow leaves them unset (dotted, as in workflows)."""


class PlanningParams(Params):
    """How ``train``'s planned values are derived (``train.planning``; see ``medseg.training.planning``).

    ``memory_gib`` bounds the memory of one training step's activations, parameters, gradients
    and optimiser state, measured by a trial step on the training device (CPU RAM or GPU
    memory). ``base_channels`` defaults to 16 (2D) or 8 (3D); ``max_patch_voxels`` to 256²
    (2D) or 64³ (3D) — sizes a 2-core CPU trains in minutes; raise both on a GPU.
    ``compile`` is planned on for a single CPU process with a C++ compiler when the run pushes
    ``compile_min_megavoxels`` million patch voxels or more through the net (steps × patches per
    step × voxels per patch). On 2 CPU cores an eager step costs about 0.86 s per million patch
    voxels and compiling saves about a third of it, so the one-off compile (about a minute) pays
    back from about 250 (the GOWT1 example and the same file on MSC: 1 573, BraTS 3D: 118).
    ``max_patches`` (8) and ``steps`` (3 000) trade patches per step for steps: on 2 CPU cores the
    GOWT1 example trained 8 patches × 2 000 steps in 0.61× the time of 16 × 1 200 and scored the
    same (test SEG 0.929 ± 0.003 against 0.927 ± 0.005 over 3 seeds), and 3 000 steps (11–13
    minutes) take it to 0.931 ± 0.002 and MSC to 0.681 ± 0.024 (``bench/RESULTS.md``, ``seeds``).
    ``rim_split_limit``: ``borders: touching`` is planned when more than this fraction of the
    objects lose their shape under an all-round border rim of the planned width (the
    fingerprint's ``objects.rim_split``: MSC's irregular cells 0.652 at 3 px, GOWT1's nuclei 0.0
    at 2 px).
    """

    memory_gib: float = Field(2.0, gt=0)
    max_patch_voxels: int | None = Field(None, ge=64)
    base_channels: int | None = Field(None, ge=1)
    max_channels: int = Field(256, ge=1)
    max_levels: int = Field(6, ge=2)
    min_feature_size: int = Field(4, ge=1)
    max_patches: int = Field(8, ge=2)
    steps: int = Field(3000, ge=1)
    rim_split_limit: float = Field(0.1, ge=0, le=1)
    steps_per_epoch: int = Field(25, ge=1)
    validations: int = Field(10, ge=1)
    compile_min_megavoxels: float = Field(250.0, gt=0)


class TrainParams(Params):
    """Train a U-Net on the train split, validating on the val split.

    ``patch_size`` is in voxels (array axis order) and must be a multiple of the net's
    total stride. ``target`` is what the net learns: ``foreground`` (instances are connected
    components) or ``boundary`` (background / interior / border of ``border_width`` voxels;
    instances grow from interior seeds, which separates touching objects). ``select_on``
    picks the validation metric that chooses the best weights; validation runs every
    ``val_every`` epochs and training stops early after ``patience`` validations without
    improvement (0 = never). ``schedule`` sets the learning-rate schedule over ``epochs``.
    An epoch visits every training case ``epoch_repeats`` times (``samples_per_image``
    patches each visit), so a small dataset gets enough steps between validations.
    ``min_object_size`` (voxels) and ``fill_holes`` set the post-processing; they travel
    with the model in its card. ``amp`` (mixed precision) and cuDNN autotuning apply on CUDA
    only; CPU runs are bit-reproducible for a seed (for a given ``num_workers``, the number
    of data-loading processes that prepare patches beside the training loop). Cases are held
    in memory when they fit in ``cache_gib``, else read from disk for every patch. The
    resumable checkpoint is written every ``checkpoint_every`` epochs (and at the end).
    ``compile`` runs the training step through ``torch.compile`` (inductor; on a CPU it needs a
    C++ compiler and the Python headers): after a one-off compile in the first epoch (about a
    minute on 2 cores) each step is faster (1.48× for the GOWT1 example's net on 2 CPU cores),
    the numbers differ from eager ones in the low bits, and runs stay reproducible for a seed. Each
    epoch then drops its last partial batch, so that one compiled graph serves every step;
    validation and inference run uncompiled. Not under ``torchrun``.
    ``budget`` replaces ``epochs`` by a number of optimiser steps, minutes or both (``TrainBudget``).
    ``folds`` > 1 trains a k-fold cross-validation over the pooled train and val cases (each
    fold validates on its own cases; the budget is per fold) and keeps all fold models as one
    ensemble that averages their probabilities.

    The values named in ``PLANNED`` are planned from the dataset when the workflow (or its
    pipeline) leaves them unset (``medseg.training.planning``, tuned by ``planning``); the
    defaults below apply where a ``TrainParams`` is used without a plan.
    """

    spatial_dims: Literal[2, 3] = 2
    net: NetParams = Field(default_factory=NetParams)
    optim: OptimParams = Field(default_factory=OptimParams)
    augment: AugmentParams = AugmentParams()
    loss: LossParams = Field(default_factory=LossParams)
    target: TargetKind = "foreground"
    border_width: int = Field(2, ge=1)
    borders: BorderKind = "all"
    epochs: int = Field(20, ge=1)
    budget: TrainBudget | None = None
    batch_size: int = Field(4, ge=1)
    patch_size: tuple[int, ...] = (128, 128)
    samples_per_image: int = Field(4, ge=1)
    schedule: Literal["cosine", "poly", "constant"] = "cosine"
    val_every: int = Field(1, ge=1)
    epoch_repeats: int = Field(1, ge=1)
    patience: int = Field(0, ge=0)
    select_on: Literal["dice", "seg"] = "dice"
    overlap: float = Field(0.25, ge=0, lt=1)
    min_object_size: int = Field(10, ge=0)
    fill_holes: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True
    cache_gib: float = Field(4.0, ge=0)
    num_workers: int = Field(0, ge=0)
    checkpoint_every: int = Field(1, ge=1)
    compile: bool = False
    planning: PlanningParams = Field(default_factory=PlanningParams)
    folds: int = Field(1, ge=1)

    @property
    def inference(self) -> InferenceSettings:
        """Inference and post-processing settings that travel with the trained model."""
        return InferenceSettings(
            roi_size=self.patch_size,
            overlap=self.overlap,
            min_object_size=self.min_object_size,
            fill_holes=self.fill_holes,
            target=self.target,
        )

    def loggable(self) -> dict[str, Any]:
        """The params for tracking, without planned values left unset (the plan logs those as ``plan.*``)."""
        return self._without_unset_planned(super().loggable())

    def keyed(self) -> dict[str, Any]:
        """The params for the cache key, without planned values left unset.

        A planned value left to the plan and the same key set to its default are two runs
        (the plan may choose another value: ``target`` unset is planned ``boundary`` for
        instance labels, ``target: foreground`` is the default), so they must not share a key.
        """
        return self._without_unset_planned(super().keyed())

    def explicit_planned(self) -> set[str]:
        """The dotted keys of ``PLANNED`` that the workflow or pipeline set; the plan decides the rest."""
        explicit: set[str] = set()
        for key in PLANNED:
            section, _, name = key.partition(".")
            if section not in self.model_fields_set:
                continue
            if not name or name in getattr(self, section).model_fields_set:
                explicit.add(key)
        return explicit

    def _without_unset_planned(self, data: dict[str, Any]) -> dict[str, Any]:
        """``data`` (these params as JSON data) without the ``PLANNED`` keys this model leaves unset."""
        explicit = self.explicit_planned()
        for key in PLANNED:
            section, _, name = key.partition(".")
            if key in explicit:
                continue
            if name:
                data[section].pop(name, None)
            else:
                data.pop(section, None)
        return data

    @model_validator(mode="after")
    def _patch(self) -> TrainParams:
        if "patch_size" not in self.model_fields_set:  # planned, or the default of a plan-less use
            return self
        if "spatial_dims" in self.model_fields_set and len(self.patch_size) != self.spatial_dims:
            raise ValueError(
                f"patch_size has {len(self.patch_size)} entries for spatial_dims={self.spatial_dims}"
            )
        divisors = self.net.size_divisors(len(self.patch_size))
        if any(size % divisor for size, divisor in zip(self.patch_size, divisors, strict=True)):
            shown = divisors[0] if len(set(divisors)) == 1 else f"{divisors} per axis"
            raise ValueError(f"patch_size {self.patch_size} must be multiples of {shown} (net strides)")
        return self
