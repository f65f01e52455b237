"""Real Cell Tracking Challenge data (Fluo-N2DH-GOWT1, sequence 01) through the whole pipeline."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

import medseg
from medseg.inference.model import CARD_FILE
from tests.conftest import GOWT1, require
from tests.integration.helpers import child_runs, write_workflow

pytestmark = pytest.mark.integration


def test_two_epoch_workflow_on_gowt1_is_tracked(tmp_path):
    data = require(GOWT1)
    # No post-processing search: on a two-epoch net's thousands of fragments it took half of
    # this test (about 57 s of 110). The search runs end to end in the demo and fold tests (phantom
    # CTC frames), its choices are known answers in tests/unit/test_tuning.py, and `bench accuracy`
    # runs it on GOWT1.
    params = {
        "ingest": {"split": {"val_fraction": 0.25, "test_fraction": 0.25}},
        "train": {"epochs": 2, "patch_size": [128, 128], "samples_per_image": 2, "batch_size": 4},
        "postprocess": {"search": False},
    }
    workflow = write_workflow(tmp_path, data, name="gowt1-2ep", params=params, experiment="gowt1-test")
    result = medseg.run_workflow(workflow, workspace=tmp_path / "ws")

    assert result.metrics["ingest/cases"] == 30.0
    assert result.metrics["ingest/fully_annotated"] == 4.0
    assert result.metrics["ingest/train_cases"] == 2.0 and result.metrics["ingest/val_cases"] == 1.0
    assert result.metrics["eval/n_cases"] == 27.0  # 1 fully annotated + 26 sparse frames
    assert result.metrics["eval/n_overlap_undefined"] == 26.0  # IoU only where fully annotated
    assert 0.0 <= result.metrics["eval/seg"] <= 1.0

    client = MlflowClient(result.tracking_uri)
    experiment = client.get_experiment_by_name("gowt1-test")
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["medseg.pipeline"] == "unet2d"
    assert {"eval/seg", "eval/iou", "eval/dice"} <= set(parent.data.metrics)
    children = child_runs(client, experiment.experiment_id, result.parent_run_id)
    assert set(children) == {"ingest", "train", "postprocess", "evaluate", "export"}
    for stage, run in children.items():
        assert run.info.status == "FINISHED"
        assert run.data.tags["medseg.stage_type"] == stage
        assert len(run.data.tags["medseg.cache_key"]) == 64
    assert [m.step for m in client.get_metric_history(children["train"].info.run_id, "val/dice")] == [1, 2]
    assert children["train"].data.params["optim.lr"] == "0.002"
    chosen = medseg.ModelCard.read(result.outputs["postprocess"]["model"] / CARD_FILE).postprocessing
    assert chosen.chosen_by == "train params (search disabled (postprocess.search))"
    # Planned from the fingerprint where the workflow is silent, logged as plan.*; the
    # workflow's values are kept (and the unused defaults of planned values are not logged).
    logged = children["train"].data.params
    assert logged["plan.patch_size"] == "[128, 128]" and logged["patch_size"] == "[128, 128]"
    assert logged["plan.target"] == "boundary" and logged["plan.select_on"] == "seg"
    assert logged["plan.net.strides"] == "[2, 2, 2, 2, 2]"  # 128 → 4 voxels
    assert logged["plan.net.channels"] == "[16, 32, 64, 128, 256, 256]" and "net.channels" not in logged
    assert logged["plan.border_width"] == "2"  # median nucleus diameter 60 px
    assert logged["plan.borders"] == "all"  # a 2 px rim leaves every nucleus one interior
    planned = set(logged["plan.planned"].split(","))
    assert {"net.channels", "target", "border_width"} <= planned and "patch_size" not in planned
    plan = json.loads((result.outputs["train"]["model"] / "plan.json").read_text())
    assert plan["origins"]["epochs"] == "set" and plan["values"]["batch_size"] == 4
    card = json.loads((result.outputs["export"]["export"] / "model_card.json").read_text())
    assert set(card["training"]["planned"]) == planned

    # Predictions are written in the CTC RES layout; scoring them on their own agrees.
    predictions = result.outputs["evaluate"]["report"] / "predictions"
    frames = sorted(path.name for path in predictions.glob("mask*.tif"))
    assert len(frames) == 27 and "mask021.tif" not in frames  # t021 is a training frame
    gt = tmp_path / "gt"
    (gt / "SEG").mkdir(parents=True)
    (gt / "TRA").mkdir()
    for name in frames:
        for kind, prefix in (("SEG", "man_seg"), ("TRA", "man_track")):
            (gt / kind / name.replace("mask", prefix)).symlink_to(
                data / "01_GT" / kind / name.replace("mask", prefix)
            )
    standalone, _ = medseg.evaluate_masks(predictions, gt, surface=False)
    assert standalone.seg == pytest.approx(result.metrics["eval/seg"], abs=1e-12)
    # DET against the TRA markers of the same frames, valid on the sparse frames too.
    assert result.metrics["eval/n_det_cases"] == 27.0
    assert standalone.det == pytest.approx(result.metrics["eval/det"], abs=1e-12)
    assert standalone.op_csb == pytest.approx(result.metrics["eval/op_csb"], abs=1e-12)
    html = (result.outputs["evaluate"]["report"] / "report.html").read_text()
    assert "Training curves" in html and "<svg" in html and "data:image/png;base64" in html

    cache_dir = result.outputs["ingest"]["dataset"]
    index = json.loads((cache_dir / "dataset.json").read_text())
    assert all(case["case_id"].startswith("case_") for case in index["cases"])
    assert "t021" not in json.dumps(index)  # source names stay in the private map only
