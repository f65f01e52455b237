"""k-fold cross-validation: one ensemble model, out-of-fold post-processing, folds resumable one by one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

import medseg
import medseg.training.loop as loop
from medseg.errors import DataError, StageError
from medseg.inference.model import load_model
from medseg.io.dataset import load_case, read_index
from medseg.nets.unet import build_net
from tests.integration.helpers import FAST_TRAIN, child_runs, write_workflow

pytestmark = pytest.mark.integration


def _workflow(tmp_path, phantom_dir, folds, name="folds"):
    params = {"ingest": {"train_on": "all"}, "train": {**FAST_TRAIN, "folds": folds}}
    return write_workflow(tmp_path, phantom_dir, name=name, params=params, experiment=name)


def test_three_folds_make_one_ensemble_chosen_out_of_fold(tmp_path, phantom_dir):
    result = medseg.run_workflow(_workflow(tmp_path, phantom_dir, 3), workspace=tmp_path / "ws")
    dataset = result.outputs["ingest"]["dataset"]
    index = read_index(dataset)
    pooled = {record.case_id for record in index.split("train") + index.split("val")}
    model = result.outputs["train"]["model"]
    folds = json.loads((model / "folds.json").read_text())
    assert folds["folds"] == 3 and set(folds["cases"]) == pooled  # the test split is never used
    sizes = np.bincount(list(folds["cases"].values()))
    assert sizes.max() - sizes.min() <= 1 and len(sizes) == 3
    assert result.metrics["train/folds"] == 3.0
    mean = np.mean([result.metrics[f"train/fold_{fold}_best_val_seg"] for fold in range(3)])
    assert result.metrics["train/best_val_seg"] == pytest.approx(mean)

    export = result.outputs["export"]["export"]
    card = json.loads((export / "model_card.json").read_text())
    assert card["folds"] == 3
    assert card["postprocessing"]["chosen_by"] == f"out-of-fold predictions (3 folds, {len(pooled)} cases)"
    assert card["postprocessing"]["weights"] in card["postprocessing"]["weights_scores"]
    assert card["postprocessing"].get("weights_epoch") is None  # each fold has its own best epoch

    # The ensemble's probabilities are the mean of the three fold nets' (each built on its own).
    net, loaded = load_model(result.outputs["train"]["model"], torch.device("cpu"))
    state = torch.load(model / "weights.pt", weights_only=True)
    members = []
    for fold in range(3):
        member = build_net(loaded.net, spatial_dims=2, in_channels=1, out_channels=loaded.out_channels)
        prefix = f"members.{fold}."
        member.load_state_dict({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)})
        members.append(member.eval())
    image, _ = load_case(dataset, index.split("test")[0])
    window = torch.as_tensor(image.array[None, :, :32, :32])
    with torch.inference_mode():
        mean_probability = torch.stack([m(window).softmax(1) for m in members]).mean(0)
        assert torch.allclose(net(window).softmax(1), mean_probability, atol=1e-5)

    # Every consumer gets the ensemble: the exported ONNX model and the Segmenter.
    assert result.metrics["export/onnx_max_abs_diff"] < 1e-3
    formats = medseg.ModelCard.read(export / "model_card.json").formats
    assert "model.pt2" not in formats  # not asked: ONNX from the TorchScript-based exporter, and it says why
    assert formats["model.onnx"].endswith("(deprecated with TorchScript) (no torch.export program)")
    labels = medseg.Segmenter.from_export(export).predict(image)
    assert labels.array.max() >= 1

    client = MlflowClient(result.tracking_uri)
    experiment = client.get_experiment_by_name("folds")
    train_run = child_runs(client, experiment.experiment_id, result.parent_run_id)["train"]
    for fold in range(3):
        assert len(client.get_metric_history(train_run.info.run_id, f"fold_{fold}/train/loss")) == 2


def test_a_crash_in_one_fold_retrains_that_fold_only(tmp_path, phantom_dir, monkeypatch):
    real = loop.train_segmentation
    calls = []

    def crashing(*args, **kwargs):
        calls.append(kwargs["checkpoint"].parent.name)
        if len(calls) == 2:
            raise StageError("simulated crash in fold 1")
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "train_segmentation", crashing)
    workflow = _workflow(tmp_path, phantom_dir, 3, name="crash")
    with pytest.raises(StageError, match="simulated crash"):
        medseg.run_workflow(workflow, workspace=tmp_path / "ws")
    assert calls == ["fold_0", "fold_1"]

    def counted(*args, **kwargs):
        calls.append(kwargs["checkpoint"].parent.name)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "train_segmentation", counted)
    result = medseg.run_workflow(workflow, workspace=tmp_path / "ws")
    assert calls[2:] == ["fold_1", "fold_2"]  # fold 0 was kept from the crashed run
    assert result.metrics["train/folds"] == 3.0


def test_more_folds_than_cases_is_a_clear_error(tmp_path, phantom_dir):
    workflow = _workflow(tmp_path, phantom_dir, 50, name="toomany")
    with pytest.raises(DataError, match=r"train\.folds=50 but the train and val splits hold \d+ case"):
        medseg.run_workflow(workflow, workspace=tmp_path / "ws")
