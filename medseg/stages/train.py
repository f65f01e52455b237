"""Train stage: canonical dataset → trained model (``model`` output)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from medseg.io.dataset import DatasetIndex, load_case, read_index
from medseg.runner.contract import StageContext, StageSpec
from medseg.training.params import TrainParams


def load_split(folder: Path, index: DatasetIndex, split: str) -> list:
    """Load the cases of one split into memory as ``TrainingCase`` objects."""
    from medseg.training.loop import TrainingCase

    cases = []
    for record in index.split(split):  # type: ignore[arg-type]
        image, label = load_case(folder, record)
        cases.append(TrainingCase(record.case_id, image.array, label.array[0]))
    return cases


def run(
    context: StageContext,
    params: TrainParams,
    inputs: Mapping[str, Path],
    outputs: Mapping[str, Path],
) -> dict[str, float]:
    """Train on the train split, select on the val split, write weights, card and history."""
    from medseg.errors import DataError
    from medseg.inference.model import save_model
    from medseg.training.loop import train_segmentation

    folder = inputs["dataset"]
    index = read_index(folder)
    if index.spatial_dims != params.spatial_dims:
        raise DataError(
            f"dataset is {index.spatial_dims}D but train.spatial_dims is {params.spatial_dims}; "
            "set train.spatial_dims (and patch_size) to match"
        )
    train_cases = load_split(folder, index, "train")
    val_cases = load_split(folder, index, "val")
    result = train_segmentation(
        train_cases,
        val_cases,
        params,
        seed=context.seed,
        on_epoch=lambda epoch, metrics: context.log_metrics(metrics, step=epoch),
        progress=context.progress,
    )
    card = {
        "task": "instance segmentation: foreground U-Net + connected components",
        "spatial_dims": params.spatial_dims,
        "in_channels": index.channels,
        "out_channels": 2,
        "labels": {"0": "background", "1": "foreground"},
        "net": params.net.model_dump(mode="json"),
        "inference": params.inference.as_card(),
        "intensity": index.intensity,
        "spacing": list(index.cases[0].spacing),
        "training": {
            "dataset_digest": context.input_digests["dataset"],
            "train_cases": len(train_cases),
            "val_cases": len(val_cases),
            "epochs": params.epochs,
            "best_epoch": result.best_epoch,
            f"best_val_{params.select_on}": result.best_metric,
            "seed": context.seed,
        },
    }
    save_model(outputs["model"], result.state_dict, card)
    (outputs["model"] / "history.json").write_text(json.dumps(result.history, indent=2))
    final = result.history[-1]
    return {
        "train/final_loss": final["train/loss"],
        "train/best_epoch": float(result.best_epoch),
        f"train/best_val_{params.select_on}": result.best_metric,
    }


STAGE = StageSpec(
    name="train",
    version=1,
    params=TrainParams,
    inputs=("dataset",),
    outputs=("model",),
    run=run,
    description="train a MONAI U-Net with Dice+CE, keeping the best validation weights",
)
