"""End to end on the phantom: run, cache hits proven by spies, partial rerun, MLflow run tree."""

from __future__ import annotations

import json

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

import medseg
from medseg.demo import write_phantom_ctc
from medseg.runner.cache import ARTIFACT_FILE
from medseg.training.params import TrainParams
from tests.integration.helpers import (
    FAST_TRAIN,
    child_runs,
    clean_env,
    run_cli,
    spy_on_stages,
    write_workflow,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    data = write_phantom_ctc(root / "source-data", frames=10, size=64, seed=5)
    return root, data


def test_a_planned_value_set_to_its_default_is_its_own_training(study, tmp_path):
    """``train.target`` left to the plan and set to its default are two trainings, not one cache entry."""
    _, data = study
    workspace = tmp_path / "ws"
    params = {"ingest": {"train_on": "all"}, "train": FAST_TRAIN}
    planned = medseg.run_workflow(
        write_workflow(tmp_path, data, name="planned", params=params, experiment="keys"), workspace=workspace
    )
    default = TrainParams.model_fields["target"].default
    set_params = {**params, "train": {**FAST_TRAIN, "target": default}}
    chosen = medseg.run_workflow(
        write_workflow(tmp_path, data, name="set", params=set_params, experiment="keys"), workspace=workspace
    )
    assert chosen.executed == ["train", "postprocess", "evaluate", "export"] and chosen.cached == ["ingest"]
    models = [run.outputs["train"]["model"] for run in (planned, chosen)]
    plans = [json.loads((model / "plan.json").read_text()) for model in models]
    assert (plans[0]["values"]["target"], plans[0]["origins"]["target"]) == ("boundary", "planned")
    assert (plans[1]["values"]["target"], plans[1]["origins"]["target"]) == ("foreground", "set")
    assert default == "foreground"


def test_a_training_the_minutes_cut_short_is_called_out_wherever_it_shows(study, tmp_path, monkeypatch):
    """Steps planned, minutes cut, two seeds: results, runs' tags, cards and a cached rerun say so."""
    import itertools
    from types import SimpleNamespace

    import yaml

    import medseg.training.loop as loop

    _, data = study
    workspace = tmp_path / "ws"
    ticks = itertools.count(0.0, 10.0)  # training's clock, read at its start and once per epoch
    monkeypatch.setattr(loop, "time", SimpleNamespace(monotonic=lambda: next(ticks)))
    budget = {"steps": 40, "minutes": 0.5}  # at 10 s an epoch the minutes hold 3 epochs
    train = {key: value for key, value in FAST_TRAIN.items() if key != "epochs"}
    params = {"ingest": {"train_on": "all"}, "train": {**train, "budget": budget}}
    workflow = write_workflow(tmp_path, data, name="capped", params=params, experiment="cap")
    workflow.write_text(yaml.safe_dump({**yaml.safe_load(workflow.read_text()), "seeds": [0, 1]}))
    result = medseg.run_workflow(workflow, workspace=workspace)
    client = MlflowClient(result.tracking_uri)
    for seed, repeat in result.repeats.items():
        steps_run = repeat.metrics["train/steps_run"]
        assert repeat.metrics["train/cut_by_minutes"] == 1.0
        assert steps_run < repeat.metrics["train/steps_planned"] == 40
        (warning,) = repeat.warnings  # one warning, the train stage's
        assert warning.startswith(f"train: the minutes of train.budget ended training after {steps_run:.0f} ")
        assert f"seed {seed}: {warning}" in result.warnings
        card = json.loads((repeat.outputs["train"]["model"] / "model.json").read_text())
        assert card["training"]["stopped_by"] == "minutes"
        parent = client.get_run(repeat.parent_run_id)
        assert parent.data.tags["medseg.warning"] == warning
        runs = child_runs(client, parent.info.experiment_id, repeat.parent_run_id)
        assert runs["train"].data.tags["medseg.warning"] == warning.removeprefix("train: ")
        assert "medseg.warning" not in runs["evaluate"].data.tags
    assert len(result.warnings) == 2
    assert client.get_run(result.parent_run_id).data.tags["medseg.warning"] == "\n".join(result.warnings)

    rerun = run_cli("run", str(workflow), "--workspace", str(workspace), env=clean_env(COLUMNS="400"))
    assert rerun.returncode == 0, rerun.stderr
    assert "stages executed: none" in rerun.stderr
    for warning in result.warnings:
        assert f"warning: {warning}" in " ".join(rerun.stderr.split())


def test_run_rerun_partial_rerun_and_mlflow_tree(study, monkeypatch):
    root, data = study
    calls = spy_on_stages(monkeypatch)
    workspace = root / "ws"
    params = {"ingest": {"train_on": "all"}, "train": FAST_TRAIN}
    workflow = write_workflow(
        root, data, name="phantom", params=params, experiment="e2e", torch_export=True, mlflow_model=True
    )

    first = medseg.run_workflow(workflow, workspace=workspace)
    assert first.executed == ["ingest", "train", "postprocess", "evaluate", "export"]
    assert first.warnings == []
    for key in ("eval/seg", "eval/iou", "eval/dice"):
        assert 0.0 <= first.metrics[key] <= 1.0
    assert first.metrics["eval/n_cases"] == 2.0
    for stage, outputs in first.outputs.items():  # postprocess links the train weights, not their record
        for output in outputs.values():
            record = json.loads((output / ARTIFACT_FILE).read_text())
            assert (record["stage"], record["key"]) == (stage, output.parent.name)

    second = medseg.run_workflow(workflow, workspace=workspace)
    assert second.executed == [] and second.cached == first.executed
    assert calls == {"ingest": 1, "train": 1, "postprocess": 1, "evaluate": 1, "export": 1}
    assert second.metrics == first.metrics

    changed = write_workflow(
        root,
        data,
        name="phantom",
        params={**params, "train": {**FAST_TRAIN, "optim": {"lr": 0.01}}},
        experiment="e2e",
        torch_export=True,
        mlflow_model=True,
    )
    third = medseg.run_workflow(changed, workspace=workspace)
    assert third.executed == ["train", "postprocess", "evaluate", "export"] and third.cached == ["ingest"]
    assert calls == {"ingest": 1, "train": 2, "postprocess": 2, "evaluate": 2, "export": 2}

    client = MlflowClient(first.tracking_uri)
    assert first.tracking_uri == f"sqlite:///{(workspace / 'mlflow.db').resolve()}"
    experiment = client.get_experiment_by_name("e2e")
    parents = client.search_runs([experiment.experiment_id], "tags.medseg.workflow = 'phantom'")
    assert len(parents) == 3 and all(run.info.status == "FINISHED" for run in parents)

    parent = client.get_run(first.parent_run_id)
    assert parent.data.params["train.optim.lr"] == "0.002"
    assert parent.data.params["ingest.split.val_fraction"] == "0.2"
    assert parent.data.metrics["eval/seg"] == pytest.approx(first.metrics["eval/seg"])
    parent_files = {a.path for a in client.list_artifacts(first.parent_run_id, "workflow")}
    assert parent_files == {"workflow/resolved.json", "workflow/workflow.yaml"}
    assert {a.path for a in client.list_artifacts(first.parent_run_id)} >= {"environment.json"}

    children = child_runs(client, experiment.experiment_id, first.parent_run_id)
    assert set(children) == {"ingest", "train", "postprocess", "evaluate", "export"}
    assert all(run.data.tags["medseg.cache_hit"] == "false" for run in children.values())
    loss = client.get_metric_history(children["train"].info.run_id, "train/loss")
    assert [m.step for m in loss] == [1, 2]
    assert {"val/dice", "val/seg", "train/lr"} <= set(children["train"].data.metrics)
    assert {"eval/seg", "eval/iou", "eval/dice"} <= set(children["evaluate"].data.metrics)
    # The phantom has TRA markers: DET and OP_CSB are reported beside SEG, with object F1/PQ.
    scored = children["evaluate"].data.metrics
    assert {"eval/det", "eval/op_csb", "eval/f1", "eval/pq", "eval/det_splits"} <= set(scored)
    assert scored["eval/op_csb"] == pytest.approx((scored["eval/det"] + scored["eval/seg"]) / 2)
    chosen = children["postprocess"].data.params
    assert chosen["postprocess.measure"] == "op_csb"
    assert int(chosen["postprocess.chosen.min_object_size"]) >= 0
    assert chosen["postprocess.chosen.split_level"] in {"off", "0.6", "0.7"}  # a candidate level, or none
    assert int(chosen["postprocess.chosen.seed_split_size"]) > 0  # boundary target: layered seeds
    table = {a.path for a in client.list_artifacts(children["postprocess"].info.run_id, "postprocessing")}
    assert table == {"postprocessing/postprocessing_candidates.csv"}
    report = {a.path for a in client.list_artifacts(children["evaluate"].info.run_id, "report")}
    assert {"report/per_case.csv", "report/summary.json", "report/report.html", "report/overlays"} <= report
    overlays = {a.path for a in client.list_artifacts(children["evaluate"].info.run_id, "report/overlays")}
    assert {path.split("/")[-1].split("_")[0] for path in overlays} == {"best", "median", "worst"}
    assert {"eval/hd95_foreground", "eval/assd_foreground", "eval/missed"} <= set(parent.data.metrics)
    models = client.search_logged_models([experiment.experiment_id])
    assert any(model.source_run_id == children["export"].info.run_id for model in models)

    hits = child_runs(client, experiment.experiment_id, second.parent_run_id)
    assert all(run.data.tags["medseg.cache_hit"] == "true" for run in hits.values())
    for stage, run in hits.items():
        assert run.data.tags["medseg.producer_run_id"] == children[stage].info.run_id
    assert client.get_run(second.parent_run_id).data.tags["medseg.stages_executed"] == "none"

    # No source path reaches the tracking store (database or artifacts).
    needle = str(data).encode()
    for path in workspace.rglob("*"):
        if path.is_file() and "cache" not in path.parts and "private" not in path.parts:
            assert needle not in path.read_bytes(), path


def run_phantom(study):
    """The phantom study with the fast train params (cached after its first run)."""
    root, data = study
    params = {"ingest": {"train_on": "all"}, "train": FAST_TRAIN}
    workflow = write_workflow(
        root, data, name="phantom", params=params, experiment="e2e", torch_export=True, mlflow_model=True
    )
    return medseg.run_workflow(workflow, workspace=root / "ws"), data


def test_exported_model_segments_in_source_geometry(study):
    result, data = run_phantom(study)
    segmenter = medseg.Segmenter.from_export(result.outputs["export"]["export"])
    image = medseg.read_image(data / "01" / "t004.tif")
    labels = segmenter.predict(image)
    assert labels.kind == "label" and labels.array.shape == image.array.shape
    np.testing.assert_array_equal(labels.affine, image.affine)
    assert labels.array.dtype == np.int32 and labels.array.min() >= 0
    with pytest.raises(medseg.DataError, match="does not fit the model"):
        segmenter.predict(np.zeros((1, 8, 8, 8), np.float32))


def test_segmenter_applies_the_chosen_postprocessing_like_the_evaluate_stage(study):
    import json

    result, data = run_phantom(study)
    card = json.loads((result.outputs["export"]["export"] / "model_card.json").read_text())
    chosen = json.loads((result.outputs["postprocess"]["model"] / "model.json").read_text())
    assert card["inference"] == chosen["inference"] and card["postprocessing"]["measure"] == "op_csb"
    assert card["postprocessing"]["chosen_by"].startswith("validation (val split")
    segmenter = medseg.Segmenter.from_export(result.outputs["export"]["export"])
    predictions = sorted((result.outputs["evaluate"]["report"] / "predictions").glob("mask*.tif"))
    assert predictions
    for path in predictions:
        frame = path.stem.removeprefix("mask")
        labels = segmenter.predict(medseg.read_image(data / "01" / f"t{frame}.tif"))
        np.testing.assert_array_equal(labels.array[0], medseg.read_image(path, kind="label").array[0])


def test_onnx_and_torch_export_match_pytorch_at_any_size(study):
    import onnxruntime
    import torch

    from medseg.inference.model import load_model

    result, data = run_phantom(study)
    assert result.metrics["export/onnx_max_abs_diff"] < 1e-4
    session = onnxruntime.InferenceSession(
        str(result.outputs["export"]["export"] / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    # The exported weights are the ones postprocess kept (best or last epoch).
    net, _ = load_model(result.outputs["postprocess"]["model"], torch.device("cpu"))
    image = medseg.read_image(data / "01" / "t004.tif").array[None, :, :24, :32].astype(np.float32)
    batch = np.concatenate([image, image[:, :, ::-1].copy()])  # batch 2, a size the export never saw
    (logits,) = session.run(["logits"], {"image": batch})
    with torch.inference_mode():
        expected = net(torch.as_tensor(batch)).numpy()
    assert logits.shape == expected.shape == (2, 3, 24, 32)
    assert np.abs(logits - expected).max() < 1e-4

    # The torch.export program, loaded back, at the same unseen batch and size; the card lists it.
    export = result.outputs["export"]["export"]
    assert result.metrics["export/pt2_max_abs_diff"] < 1e-4
    program = torch.export.load(str(export / "model.pt2")).module()
    with torch.no_grad():
        assert np.abs(program(torch.as_tensor(batch)).numpy() - expected).max() < 1e-4
    formats = medseg.ModelCard.read(export / "model_card.json").formats
    assert set(formats) == {"model.pt2", "model.onnx", "model.ts", "weights.pt"}
    assert "deprecated" in formats["model.ts"]
    assert formats["model.onnx"].endswith("by the torch.onnx dynamo exporter (from the torch.export program)")


@pytest.mark.parametrize("broken", ["best", "last"])
def test_postprocess_keeps_whichever_weights_score_higher_on_validation(study, tmp_path, broken):
    """One of the train stage's two weight files zeroed (one output everywhere): the other is kept."""
    import csv
    import shutil

    import torch

    from medseg.inference.card import ModelCard
    from medseg.inference.model import CARD_FILE, LAST_WEIGHTS_FILE, WEIGHTS_FILE
    from medseg.runner.contract import StageContext
    from medseg.stages.postprocess import Postprocess, PostprocessParams
    from medseg.tracking.base import NullTracker

    result, _ = run_phantom(study)
    model = tmp_path / "trained"
    shutil.copytree(result.outputs["train"]["model"], model)
    spoiled = model / (WEIGHTS_FILE if broken == "best" else LAST_WEIGHTS_FILE)
    torch.save({name: torch.zeros_like(value) for name, value in torch.load(spoiled).items()}, spoiled)
    kept = model / (LAST_WEIGHTS_FILE if broken == "best" else WEIGHTS_FILE)
    output = tmp_path / "out"
    output.mkdir()
    context = StageContext("postprocess", "k", {}, 0, NullTracker(), "r", tmp_path / "p", tmp_path / "s")
    inputs = {"dataset": result.outputs["ingest"]["dataset"], "model": model}
    metrics = Postprocess().execute(context, PostprocessParams(), inputs, {"model": output})
    record = ModelCard.read(output / CARD_FILE).postprocessing
    other = "last" if broken == "best" else "best"
    assert record.weights == other
    assert (output / WEIGHTS_FILE).read_bytes() == kept.read_bytes()
    assert record.weights_scores[broken] < record.weights_scores[other] == record.score
    trained = ModelCard.read(model / CARD_FILE).training
    assert record.weights_epoch == (trained.epochs_run if other == "last" else trained.best_epoch)
    assert metrics["postprocess/val_op_csb"] == record.score
    assert metrics[f"postprocess/val_op_csb_{broken}_weights"] == record.weights_scores[broken]
    # The kept weights' choice was made on the probabilities as predicted and smoothed: the card
    # keeps the better smoothing (none on ties), the table holds both choices' candidates.
    assert set(record.smoothing_scores) == {"0", "1"}
    smoothing = ModelCard.read(output / CARD_FILE).inference.smoothing
    first_best = max(record.smoothing_scores.values())
    assert smoothing == next(float(key) for key, v in record.smoothing_scores.items() if v == first_best)
    assert record.smoothing_scores[f"{smoothing:g}"] == record.score
    assert metrics["postprocess/val_op_csb_smoothing_1"] == record.smoothing_scores["1"]
    with (output / "postprocessing_candidates.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == record.candidates and {row["smoothing"] for row in rows} == {"0.0", "1.0"}
    # ... and on the image alone and averaged over its mirrors: the card keeps the better (none
    # on ties), and the smoothing scores are those of the kept mirroring.
    assert set(record.mirror_scores) == {"off", "on"} and {row["mirror"] for row in rows} == {"False", "True"}
    mirror = ModelCard.read(output / CARD_FILE).inference.mirror
    first_best = max(record.mirror_scores.values())
    assert mirror == (record.mirror_scores["off"] != first_best)
    assert record.mirror_scores["on" if mirror else "off"] == record.score
    assert metrics["postprocess/val_op_csb_mirror_on"] == record.mirror_scores["on"]
    kept = [row for row in rows if row["mirror"] == str(mirror) and row["smoothing"] == f"{smoothing:.1f}"]
    assert max(float(row["score"]) for row in kept) == record.score


@pytest.mark.parametrize("mirror", ["always", "never"])
def test_postprocess_mirrors_always_or_never_when_told_and_evaluate_follows(study, tmp_path, mirror):
    """``postprocess.mirror`` fixes the mirroring instead of choosing it; evaluate does what the card says."""
    import torch

    from medseg.inference.card import ModelCard
    from medseg.inference.model import CARD_FILE, load_model
    from medseg.runner.contract import StageContext
    from medseg.stages.evaluate import Evaluate, EvaluateParams
    from medseg.stages.postprocess import Postprocess, PostprocessParams
    from medseg.tracking.base import NullTracker

    result, data = run_phantom(study)
    dataset, model = result.outputs["ingest"]["dataset"], tmp_path / "model"
    model.mkdir()
    context = StageContext("postprocess", "k", {}, 0, NullTracker(), "r", tmp_path / "p", tmp_path / "s")
    inputs = {"dataset": dataset, "model": result.outputs["train"]["model"]}
    metrics = Postprocess().execute(context, PostprocessParams(mirror=mirror), inputs, {"model": model})
    card = ModelCard.read(model / CARD_FILE)
    state = "on" if mirror == "always" else "off"
    assert card.inference.mirror is (mirror == "always")
    assert list(card.postprocessing.mirror_scores) == [state]
    assert card.postprocessing.mirror_scores[state] == card.postprocessing.score
    assert [key for key in metrics if "_mirror_" in key] == [f"postprocess/val_op_csb_mirror_{state}"]
    report = tmp_path / "report"
    report.mkdir()
    params = EvaluateParams(overlays=False, surface_distances=False)
    Evaluate().execute(context, params, {"dataset": dataset, "model": model}, {"report": report})
    net, _ = load_model(model, torch.device("cpu"))
    segmenter = medseg.Segmenter(net, card, "cpu")
    for path in sorted((report / "predictions").glob("mask*.tif")):
        image = medseg.read_image(data / "01" / f"t{path.stem.removeprefix('mask')}.tif")
        expected = segmenter.predict(image, flip_tta=mirror == "always").array[0]
        np.testing.assert_array_equal(medseg.read_image(path, kind="label").array[0], expected)
