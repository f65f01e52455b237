"""Train stage: canonical dataset → trained model (``model`` output)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from medseg.io.dataset import CaseRecord, DatasetIndex, load_case, load_ignore, read_index
from medseg.runner.contract import Kind, Stage, StageContext, ports
from medseg.training.params import TrainParams
from medseg.training.targets import IGNORED

if TYPE_CHECKING:
    from medseg.inference.card import ModelCard
    from medseg.training.planning import Plan

PLAN_FILE = "plan.json"


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


def resolve_plan(context: StageContext, params: TrainParams, folder: Path, index: DatasetIndex) -> Plan:
    """The plan of this training run: made once by rank 0 and kept in the scratch folder.

    A resumed run reuses the kept plan (a minutes budget's schedule depends on a measured
    speed, which must not change under a resumed run); every rank gets rank 0's plan.
    """
    from medseg.collective import broadcast_object, current
    from medseg.io.fingerprint import read_fingerprint
    from medseg.training.loop import resolve_device
    from medseg.training.planning import Plan, plan_training

    kept = context.scratch_dir / PLAN_FILE
    collective = current()
    document: dict[str, Any] | None = None
    if collective.rank == 0:
        if kept.is_file():
            document = json.loads(kept.read_text())
        else:
            plan = plan_training(
                read_fingerprint(folder),
                params,
                train_cases=len(index.split("train")),
                device=resolve_device(params.device),
            )
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
            planned=planned,
        ),
    )


class Train(Stage[TrainParams]):
    """The ``train`` stage (see ``execute``)."""

    name = "train"
    version = 6
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
        from medseg.inference.model import save_model
        from medseg.training.checkpoint import CHECKPOINT_FILE
        from medseg.training.loop import sample_bytes, train_segmentation

        folder = inputs["dataset"]
        index = read_index(folder)
        plan = resolve_plan(context, params, folder, index)
        params = plan.params
        context.log_params({**plan.loggable(), "plan.planned": ",".join(plan.planned) or "none"})
        check_dataset(index, params)
        splits = {
            split: [_training_case(folder, record, index.channels) for record in index.split(split)]
            for split in ("train", "val")
        }
        total = sum(sample_bytes(case, params) for cases in splits.values() for case in cases)
        if total <= params.cache_gib * 2**30:
            splits = {split: [_cached_case(case) for case in cases] for split, cases in splits.items()}
        result = train_segmentation(
            splits["train"],
            splits["val"],
            params,
            seed=context.seed,
            on_epoch=lambda epoch, metrics: context.log_metrics(metrics, step=epoch),
            progress=context.progress,
            checkpoint=context.scratch_dir / CHECKPOINT_FILE,
        )
        counts = {k: len(v) for k, v in splits.items()}
        card = model_card(context, params, index, result, counts, plan.planned)
        save_model(outputs["model"], result.state_dict, card)
        (outputs["model"] / PLAN_FILE).write_text(json.dumps(plan.as_document(), indent=2))
        save_model(outputs["model"], result.last_state_dict, card, weights_file="last_weights.pt")
        (outputs["model"] / "history.json").write_text(json.dumps(result.history, indent=2))
        final = result.history[-1]
        return {
            "train/final_loss": final["train/loss"],
            "train/best_epoch": float(result.best_epoch),
            "train/epochs_run": float(result.epochs_run),
            "train/world_size": float(result.world_size),
            "train/resumed_from_epoch": float(result.resumed_from),
            "train/steps_per_s": result.steps_per_s,
            f"train/best_val_{params.select_on}": result.best_metric,
        }


STAGE = Train()
