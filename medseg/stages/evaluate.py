"""Evaluate stage: model + dataset → report (metrics table, summary, overlays, predictions)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import Field

from medseg.params import Params
from medseg.runner.contract import StageContext, StageSpec


class EvaluateParams(Params):
    """Which split to evaluate, on which device, and whether to draw overlays.

    Predictions are always written as uint16 instance masks ``predictions/mask_<case>.tif``.
    """

    split: Literal["train", "val", "test"] = "test"
    overlays: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    sw_batch_size: int = Field(4, ge=1)


def run(
    context: StageContext,
    params: EvaluateParams,
    inputs: Mapping[str, Path],
    outputs: Mapping[str, Path],
) -> dict[str, float]:
    """Predict every case of the split and score it with SEG and foreground IoU/Dice."""
    from medseg.errors import DataError
    from medseg.inference.model import load_model
    from medseg.inference.predict import segment_instances
    from medseg.inference.settings import InferenceSettings
    from medseg.io.dataset import load_case, read_index
    from medseg.io.readers import read_image, write_image
    from medseg.io.volume import Volume
    from medseg.metrics.evaluate import evaluate_case, summarize
    from medseg.metrics.report import (
        pick_review_cases,
        write_case_table,
        write_overlay,
        write_summary,
    )
    from medseg.training.loop import resolve_device

    folder, report = inputs["dataset"], outputs["report"]
    index = read_index(folder)
    records = index.split(params.split)
    if not records:
        raise DataError(
            f"the {params.split} split is empty; set evaluate.split or the ingest split fractions"
        )
    device = resolve_device(params.device)
    net, card = load_model(inputs["model"], device)
    settings = InferenceSettings.from_card(card)
    predictions_dir = report / "predictions"
    predictions_dir.mkdir()
    results = []
    for number, record in enumerate(records, start=1):
        image, label = load_case(folder, record)
        instances = segment_instances(
            net, image.array, settings, device=device, sw_batch_size=params.sw_batch_size
        )
        results.append(
            evaluate_case(record.case_id, label.array[0], instances, fully_annotated=record.fully_annotated)
        )
        write_image(
            Volume(instances[None], image.affine, kind="label"),
            predictions_dir / f"mask_{record.case_id}.tif",
        )
        context.progress("evaluate", number, len(records))
    summary = summarize(results)
    write_case_table(report / "per_case.csv", results)
    write_summary(report / "summary.json", summary)
    if params.overlays and index.spatial_dims == 2:
        overlays = report / "overlays"
        overlays.mkdir()
        by_id = {record.case_id: record for record in records}
        for rank, case in pick_review_cases(results).items():
            image, label = load_case(folder, by_id[case.case_id])
            prediction = read_image(predictions_dir / f"mask_{case.case_id}.tif", kind="label")
            write_overlay(
                overlays / f"{rank}_{case.case_id}.png",
                image.array[0],
                label.array[0],
                prediction.array[0],
                f"{case.case_id} ({rank}) SEG {case.seg:.3f}",
            )
    for name in ("per_case.csv", "summary.json", "overlays"):
        if (report / name).exists():
            context.log_artifact(report / name, "report" if name != "overlays" else "report/overlays")
    return summary.as_metrics("eval")


STAGE = StageSpec(
    name="evaluate",
    version=1,
    params=EvaluateParams,
    inputs=("dataset", "model"),
    outputs=("report",),
    run=run,
    description="score predictions on a split with CTC SEG and foreground IoU/Dice",
)
