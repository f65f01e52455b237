"""Evaluate stage: model + dataset → report (metrics table, summary, overlays, HTML, predictions)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from medseg.params import Params
from medseg.runner.contract import Kind, Stage, StageContext, ports


class EvaluateParams(Params):
    """Which split to evaluate, on which device, and what to compute besides SEG and IoU/Dice.

    Predictions are written under ``predictions/``: CTC frames as ``mask<T>.tif`` (uint16, the
    challenge's RES layout, ready for its own evaluation tools), other cases as
    ``<case id>.nii.gz``.
    """

    split: Literal["train", "val", "test"] = "test"
    surface_distances: bool = True
    overlays: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    sw_batch_size: int = Field(4, ge=1)


class Evaluate(Stage[EvaluateParams]):
    """The ``evaluate`` stage (see ``execute``)."""

    name = "evaluate"
    version = 6
    params = EvaluateParams
    inputs = ports(dataset=Kind.DATASET, model=Kind.MODEL)
    outputs = ports(report=Kind.REPORT)
    description = "score predictions on a split: CTC SEG and DET, object F1/PQ, IoU/Dice, HD95/ASSD; report"

    def execute(
        self,
        context: StageContext,
        params: EvaluateParams,
        inputs: Mapping[str, Path],
        outputs: Mapping[str, Path],
    ) -> dict[str, float]:
        """Predict every case of the split, score it, and write and log the report."""
        from medseg.errors import DataError
        from medseg.inference.model import load_model
        from medseg.inference.predict import segment_instances
        from medseg.io.dataset import load_case, load_ignore, load_markers, read_index
        from medseg.io.layouts import ctc_mask_name
        from medseg.io.readers import read_image, write_image
        from medseg.io.volume import Volume
        from medseg.metrics.evaluate import evaluate_case, summarize
        from medseg.metrics.report import (
            pick_review_cases,
            write_case_table,
            write_html_report,
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
        settings = card.inference
        predictions_dir = report / "predictions"
        predictions_dir.mkdir()
        results, prediction_files = [], {}
        for number, record in enumerate(records, start=1):
            image, label = load_case(folder, record)
            markers = load_markers(folder, record)
            ignore = load_ignore(folder, record) if markers is None else None  # CTC: DET needs it all
            instances = segment_instances(
                net, image.array, settings, device=device, sw_batch_size=params.sw_batch_size
            )
            results.append(
                evaluate_case(
                    record.case_id,
                    label.array[0],
                    instances,
                    markers=markers.array[0] if markers is not None else None,
                    fully_annotated=record.fully_annotated,
                    spacing=image.spacing,
                    surface=params.surface_distances,
                    ignore=ignore,
                )
            )
            name = ctc_mask_name(record.frame) if record.frame is not None else f"{record.case_id}.nii.gz"
            write_image(Volume(instances[None], image.affine, kind="label"), predictions_dir / name)
            prediction_files[record.case_id] = predictions_dir / name
            context.progress("evaluate", number, len(records))
        summary = summarize(results)
        write_case_table(report / "per_case.csv", results)
        write_summary(report / "summary.json", summary)

        overlays: dict[str, Path] = {}
        if params.overlays:
            (report / "overlays").mkdir()
            by_id = {record.case_id: record for record in records}
            for rank, case in pick_review_cases(results).items():
                image, label = load_case(folder, by_id[case.case_id])
                prediction = read_image(prediction_files[case.case_id], kind="label")
                planes = [volume.array[0] for volume in (image, label, prediction)]
                where = ""
                if index.spatial_dims == 3:  # the axial slice with the most reference voxels
                    axial = int(np.argmax((planes[1] > 0).sum(axis=(0, 1))))
                    planes = [np.rot90(plane[:, :, axial]) for plane in planes]  # RAS+: anterior up
                    where = f", slice {axial}"
                overlays[rank] = report / "overlays" / f"{rank}_{case.case_id}.png"
                title = f"{case.case_id} ({rank}{where}) SEG {case.seg:.3f}"
                if case.detection is not None:
                    title += f" DET {case.det:.3f}, {case.n_predicted} objects"
                write_overlay(overlays[rank], *planes, title)
        history_path = inputs["model"] / "history.json"
        history = json.loads(history_path.read_text()) if history_path.is_file() else []
        write_html_report(
            report / "report.html",
            title=f"Evaluation on the {params.split} split",
            postprocessing=card.postprocessing.model_dump(exclude_none=True) if card.postprocessing else {},
            summary=summary,
            cases=results,
            history=history,
            overlays=overlays,
        )
        for name in ("per_case.csv", "summary.json", "report.html"):
            context.log_artifact(report / name, "report")
        if overlays:
            context.log_artifact(report / "overlays", "report/overlays")
        return summary.as_metrics("eval")


STAGE = Evaluate()
