"""Train stage: canonical dataset → trained model (``model`` output)."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from medseg.io.dataset import CaseRecord, DatasetIndex, load_case, load_ignore, read_index
from medseg.runner.contract import Kind, Stage, StageContext, ports
from medseg.training.params import TrainParams
from medseg.training.targets import IGNORED

if TYPE_CHECKING:
    from medseg.inference.card import ModelCard, StopReason
    from medseg.training.planning import Plan

PLAN_FILE = "plan.json"
FOLD_RESULT_FILE = "fold_result.pt"


def _training_case(folder: Path, record: CaseRecord, channels: int) -> Any:
    """A ``TrainingCase`` that reads the record's files when it is loaded (ignored voxels: -1)."""
    from medseg.training.loop import TrainingCase

    def load() -> tuple[Any, Any]:
        image, label = load_case(folder, record)
        ignore = load_ignore(folder, record)
        if ignore is None:
            return image.array, label.array[0]
        return image.array, np.where(ignore, IGNORED, label.array[0]).astype(np.int32)

    return TrainingCase(record.case_id, channels, tuple(record.shape), load)


def _cached_case(case: Any) -> Any:
    """The same case with its arrays read once and kept in memory."""
    from medseg.training.loop import TrainingCase

    image, instances = case.load()
    return TrainingCase.in_memory(case.case_id, image, instances)


def check_dataset(index: DatasetIndex, params: TrainParams) -> None:
    """Refuse a dataset that does not fit the train params, before any work.

    Raises:
        DataError: dimensionality or class count differ, or the train split is empty.

    """
    from medseg.errors import DataError
    from medseg.training.targets import target_classes

    if index.spatial_dims != params.spatial_dims:
        raise DataError(
            f"dataset is {index.spatial_dims}D but train.spatial_dims is {params.spatial_dims}; "
            "set train.spatial_dims (and patch_size) to match"
        )
    classes = target_classes(params.target)
    if not index.instance_labels and len(index.labels) != 2:
        raise DataError(
            f"dataset declares {len(index.labels)} classes ({', '.join(index.labels.values())}) but "
            f"train.target '{params.target}' trains {classes} outputs from object masks; "
            "ingest instance or binary labels, or merge the classes at ingest"
        )
    if not index.split("train"):
        raise DataError(
            f"the train split is empty ({len(index.cases)} labelled cases, splits "
            f"{ {name: len(ids) for name, ids in index.splits.items()} }); add labelled cases or lower "
            "ingest.split.val_fraction / test_fraction"
        )


def plan_for(folder: Path, index: DatasetIndex, params: TrainParams, seed: int) -> Plan:
    """Plan training on the dataset in ``folder`` (its fingerprint) on the training device.

    ``seed`` is the train stage's seed: it deals the folds, so the plan sees the training
    cases of a fold. ``medseg plan`` and the train stage both plan through here.
    """
    from medseg.io.fingerprint import read_fingerprint
    from medseg.training.loop import resolve_device
    from medseg.training.planning import plan_training

    return plan_training(
        read_fingerprint(folder),
        params,
        train_cases=len(fold_runs(index, params.folds, seed)[0][1]),
        device=resolve_device(params.device),
    )


def resolve_plan(context: StageContext, params: TrainParams, folder: Path, index: DatasetIndex) -> Plan:
    """The plan of this training run: made once by rank 0 and kept in the scratch folder.

    A resumed run reuses the kept plan (a minutes budget's schedule depends on a measured
    speed, which must not change under a resumed run); every rank gets rank 0's plan.
    """
    from medseg.collective import broadcast_object, current
    from medseg.training.planning import Plan

    kept = context.scratch_dir / PLAN_FILE
    collective = current()
    document: dict[str, Any] | None = None
    if collective.rank == 0:
        if kept.is_file():
            document = json.loads(kept.read_text())
        else:
            plan = plan_for(folder, index, params, context.seed)
            document = {**plan.as_document(), "params": plan.params.model_dump(mode="json")}
            context.scratch_dir.mkdir(parents=True, exist_ok=True)
            kept.write_text(json.dumps(document, indent=2))
    return Plan.from_document(cast(dict[str, Any], broadcast_object(document, collective.world_size)))


def model_card(
    context: StageContext,
    params: TrainParams,
    index: DatasetIndex,
    result: Any,
    counts: dict[str, int],
    planned: tuple[str, ...] = (),
) -> ModelCard:
    """The card that travels with the weights: what the net predicts and how to use it."""
    from medseg.inference.card import ModelCard, TrainingRecord
    from medseg.training.targets import target_classes

    labels = (
        {"0": "background", "1": "foreground"}
        if params.target == "foreground"
        else {"0": "background", "1": "interior", "2": "border"}
    )
    task = (
        "instance segmentation: foreground U-Net + connected components"
        if params.target == "foreground"
        else "instance segmentation: background/interior/border U-Net + seeded growing"
    )
    return ModelCard(
        task=task,
        spatial_dims=params.spatial_dims,
        in_channels=index.channels,
        out_channels=target_classes(params.target),
        labels=labels,
        net=params.net,
        inference=params.inference,
        preprocessing=index.preprocessing,
        spacing=index.cases[0].spacing,
        training=TrainingRecord(
            dataset_digest=context.input_digests["dataset"],
            train_cases=counts["train"],
            val_cases=counts["val"],
            epochs=params.epochs,
            epochs_run=result.epochs_run,
            best_epoch=result.best_epoch,
            select_on=params.select_on,
            best_val=result.best_metric,
            loss=params.loss.name,
            seed=context.seed,
            steps_per_s=round(result.steps_per_s, 3),
            stopped_by=result.stopped_by,
            planned=planned,
        ),
    )


class Train(Stage[TrainParams]):
    """The ``train`` stage (see ``execute``)."""

    name = "train"
    version = 10
    params = TrainParams
    inputs = ports(dataset=Kind.DATASET)
    outputs = ports(model=Kind.MODEL)
    distributed = True
    description = "train a MONAI U-Net (foreground or boundary-aware), keeping the best validation weights"

    def execute(
        self,
        context: StageContext,
        params: TrainParams,
        inputs: Mapping[str, Path],
        outputs: Mapping[str, Path],
    ) -> dict[str, float]:
        """Plan, train on the train split, select on the val split, write weights, card, plan and history.

        The values the workflow leaves unset are planned from the dataset's fingerprint
        (``training.planning``) and logged as ``plan.*``. Checkpoints go to the stage's scratch
        folder after every epoch; a rerun after a crash or kill continues from the last one.
        """
        from medseg.inference.model import FOLDS_FILE, LAST_WEIGHTS_FILE, save_model
        from medseg.nets.ensemble import ensemble_state

        folder = inputs["dataset"]
        index = read_index(folder)
        plan = resolve_plan(context, params, folder, index)
        params = plan.params
        context.log_params({**plan.loggable(), "plan.planned": ",".join(plan.planned) or "none"})
        check_dataset(index, params)
        runs = fold_runs(index, params.folds, context.seed)
        cases = _load_cases(folder, index, params)
        results = [
            _train_fold(context, params, fold, [cases[c] for c in train], [cases[c] for c in val])
            for fold, train, val in runs
        ]
        counts = {"train": len(runs[0][1]), "val": len(runs[0][2])}
        model = outputs["model"]
        card = model_card(context, params, index, results[0], counts, plan.planned)
        best, last = results[0].state_dict, results[0].last_state_dict
        if params.folds > 1:
            training = card.training.model_copy(
                update={
                    "best_val": float(np.mean([r.best_metric for r in results])),
                    "stopped_by": _stopped_by(results),
                }
            )
            card = card.model_copy(update={"folds": params.folds, "training": training})
            best = ensemble_state([r.state_dict for r in results])
            last = ensemble_state([r.last_state_dict for r in results])
            folds_history = {f"fold_{fold}": r.history for (fold, _, _), r in zip(runs, results, strict=True)}
            (model / "history_folds.json").write_text(json.dumps(folds_history, indent=2))
            assignment = {case: fold for fold, _, val in runs for case in val}
            (model / FOLDS_FILE).write_text(
                json.dumps({"folds": params.folds, "cases": assignment}, indent=2)
            )
        save_model(model, best, card)
        save_model(model, last, card, weights_file=LAST_WEIGHTS_FILE)
        (model / "history.json").write_text(json.dumps(_mean_history(results), indent=2))
        (model / PLAN_FILE).write_text(json.dumps(plan.as_document(), indent=2))
        return _summary(params, [fold for fold, _, _ in runs], results)

    def warnings(self, metrics: Mapping[str, float]) -> list[str]:
        """A run that a budget's minutes cut before the steps it planned (``train/cut_by_minutes``)."""
        if not metrics.get("train/cut_by_minutes"):
            return []
        return [
            f"the minutes of train.budget ended training after {metrics['train/steps_run']:.0f} of "
            f"{metrics['train/steps_planned']:.0f} planned optimiser steps "
            f"({metrics['train/steps_per_s']:.2f} steps/s on this machine): the model is trained less "
            "than planned and its figures are not the plan's; raise train.budget.minutes, lower "
            "train.budget.steps or train on a faster device"
        ]


def _stopped_by(results: list[Any]) -> StopReason:
    """What ended a fold ensemble's training: ``minutes``, ``patience`` if either ended any fold."""
    reasons = {result.stopped_by for result in results}
    return "minutes" if "minutes" in reasons else "patience" if "patience" in reasons else "schedule"


def fold_runs(index: DatasetIndex, folds: int, seed: int) -> list[tuple[int | None, list[str], list[str]]]:
    """The training runs of a model: ``(fold, train case ids, validation case ids)`` each.

    One fold (``None``): the train split trains, the val split validates. ``folds`` > 1: the
    train and val splits pooled, dealt into folds by a seeded permutation; fold ``i``
    validates on its cases and trains on the others (the test split is never touched).

    Raises:
        DataError: more folds than pooled cases.

    """
    from medseg.errors import DataError

    train, val = ([record.case_id for record in index.split(split)] for split in ("train", "val"))
    if folds == 1:
        return [(None, train, val)]
    pool = sorted(train + val)
    if folds > len(pool):
        raise DataError(
            f"train.folds={folds} but the train and val splits hold {len(pool)} case(s); every fold "
            f"needs a case to validate on: set train.folds to at most {len(pool)}"
        )
    order = np.random.default_rng(seed).permutation(len(pool))
    fold_of = {pool[index]: position % folds for position, index in enumerate(order)}
    return [
        (fold, [c for c in pool if fold_of[c] != fold], [c for c in pool if fold_of[c] == fold])
        for fold in range(folds)
    ]


def _load_cases(folder: Path, index: DatasetIndex, params: TrainParams) -> dict[str, Any]:
    """Every train/val case as a ``TrainingCase``: held in memory when they fit ``cache_gib``."""
    from medseg.training.loop import sample_bytes

    records = index.split("train") + index.split("val")
    cases = {record.case_id: _training_case(folder, record, index.channels) for record in records}
    if sum(sample_bytes(case, params) for case in cases.values()) <= params.cache_gib * 2**30:
        cases = {case_id: _cached_case(case) for case_id, case in cases.items()}
    return cases


def _train_fold(
    context: StageContext, params: TrainParams, fold: int | None, train: list[Any], val: list[Any]
) -> Any:
    """Train one model (one fold); a fold finished by an earlier, interrupted run is reused.

    Each fold keeps its checkpoint and, once done, its result in ``scratch/fold_<i>/``, so a
    crash in fold 3 retrains fold 3 only. Fold metrics are logged as ``fold_<i>/train/loss`` ...
    """
    import torch

    from medseg.collective import broadcast_flag, current
    from medseg.training.checkpoint import CHECKPOINT_FILE
    from medseg.training.loop import TrainResult, train_segmentation

    scratch = context.scratch_dir if fold is None else context.scratch_dir / f"fold_{fold}"
    done = scratch / FOLD_RESULT_FILE
    collective = current()
    if fold is not None and broadcast_flag(done.is_file(), collective.world_size):
        kept = torch.load(done, map_location="cpu", weights_only=True)
        context.progress(f"train fold {fold}", 1, 1, "reused from the interrupted run")
        return TrainResult(**kept)
    prefix = "" if fold is None else f"fold_{fold}/"
    scratch.mkdir(parents=True, exist_ok=True)
    result = train_segmentation(
        train,
        val,
        params,
        seed=context.seed if fold is None else context.seed + 1000 * (fold + 1),
        on_epoch=lambda epoch, metrics: context.log_metrics(
            {prefix + key: value for key, value in metrics.items()}, step=epoch
        ),
        progress=context.progress,
        checkpoint=scratch / CHECKPOINT_FILE,
    )
    if fold is not None and collective.rank == 0:
        kept = {field.name: getattr(result, field.name) for field in dataclasses.fields(result)}
        torch.save(kept, scratch / (FOLD_RESULT_FILE + ".tmp"))
        os.replace(scratch / (FOLD_RESULT_FILE + ".tmp"), done)
    return result


def _mean_history(results: list[Any]) -> list[dict[str, float]]:
    """Per epoch, the mean over folds of each metric the folds logged (the cross-validation curve).

    One result: its own history.
    """
    if len(results) == 1:
        return results[0].history
    rows: dict[float, dict[str, list[float]]] = {}
    for result in results:
        for row in result.history:
            merged = rows.setdefault(row["epoch"], {})
            for key, value in row.items():
                merged.setdefault(key, []).append(value)
    return [
        {key: float(np.nanmean(values)) for key, values in row.items()} for _, row in sorted(rows.items())
    ]


def _summary(params: TrainParams, folds: list[int | None], results: list[Any]) -> dict[str, float]:
    """The train stage's summary metrics (per fold and their mean when there are folds)."""
    best = f"best_val_{params.select_on}"
    first = results[0]
    summary = {
        "train/final_loss": float(np.mean([r.history[-1]["train/loss"] for r in results])),
        "train/best_epoch": float(first.best_epoch),
        "train/epochs_run": float(max(r.epochs_run for r in results)),
        "train/steps_run": float(max(r.steps_run for r in results)),
        "train/world_size": float(first.world_size),
        "train/resumed_from_epoch": float(first.resumed_from),
        "train/steps_per_s": float(np.mean([r.steps_per_s for r in results])),
        f"train/{best}": float(np.mean([r.best_metric for r in results])),
    }
    if params.budget is not None and params.budget.steps is not None:  # minutes beside steps cap them
        summary["train/steps_planned"] = float(params.budget.steps)
        summary["train/cut_by_minutes"] = float(_stopped_by(results) == "minutes")
    if len(results) > 1:
        summary["train/folds"] = float(len(results))
        summary.update(
            {f"train/fold_{fold}_{best}": r.best_metric for fold, r in zip(folds, results, strict=True)}
        )
        summary[f"train/cv_{best}_sd"] = float(np.std([r.best_metric for r in results], ddof=1))
    return summary


STAGE = Train()
