"""Seed variance: a workflow repeated over seeds, each seed cached, the parent reporting mean ± sd."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

import medseg
from medseg.api import workflow_status
from medseg.errors import ConfigError
from tests.integration.helpers import FAST_TRAIN, child_runs, run_cli, spy_on_stages, write_workflow

pytestmark = pytest.mark.integration


def _seeded(tmp_path, phantom_dir, seeds):
    path = write_workflow(
        tmp_path,
        phantom_dir,
        name="seeded",
        params={"train": FAST_TRAIN},
        experiment="seeded",
    )
    document = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**document, "seeds": seeds}))
    return path


def test_seeds_run_once_each_share_the_split_and_report_the_spread(tmp_path, phantom_dir, monkeypatch):
    workflow = _seeded(tmp_path, phantom_dir, [0, 1, 2])
    calls = spy_on_stages(monkeypatch)
    result = medseg.run_workflow(workflow, workspace=tmp_path / "ws")
    assert calls["ingest"] == 1 and calls["train"] == 3 and calls["export"] == 3

    per_seed = {seed: repeat.metrics["eval/seg"] for seed, repeat in result.repeats.items()}
    assert sorted(per_seed) == [0, 1, 2]
    values = np.array(list(per_seed.values()))
    assert result.metrics["eval/seg_mean"] == pytest.approx(values.mean(), abs=1e-12)
    assert result.metrics["eval/seg_sd"] == pytest.approx(values.std(ddof=1), abs=1e-12)
    assert result.metrics["seed_2/eval/seg"] == per_seed[2]
    # One split for all seeds; the seed reaches training (other weights per seed).
    datasets = {repeat.outputs["ingest"]["dataset"] for repeat in result.repeats.values()}
    assert len(datasets) == 1
    weights = {
        hashlib.sha256((repeat.outputs["train"]["model"] / "weights.pt").read_bytes()).hexdigest()
        for repeat in result.repeats.values()
    }
    assert len(weights) == 3

    client = MlflowClient(result.tracking_uri)
    experiment = client.get_experiment_by_name("seeded")
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == (
        "seeded (3 seeds) · ran ingest, train, postprocess, evaluate, export"
    )
    assert parent.data.metrics["eval/seg_sd"] == pytest.approx(values.std(ddof=1))
    assert parent.data.params["seeds"] == "[0, 1, 2]"
    repeats = client.search_runs(
        [experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert sorted(run.info.run_name for run in repeats) == [
        "seed 0 · ran ingest, train, postprocess, evaluate, export",
        "seed 1 · ran train, postprocess, evaluate, export (1 cached)",
        "seed 2 · ran train, postprocess, evaluate, export (1 cached)",
    ]
    for run in repeats:
        stages = child_runs(client, experiment.experiment_id, run.info.run_id)
        assert set(stages) == {"ingest", "train", "postprocess", "evaluate", "export"}
        assert run.data.params["run_seed"] == run.data.tags["medseg.seed"]

    # A rerun is all cache hits with the same spread; status lists each seed's stages.
    again = medseg.run_workflow(workflow, workspace=tmp_path / "ws")
    assert again.executed == [] and again.metrics == result.metrics
    assert client.get_run(again.parent_run_id).info.run_name == "seeded (3 seeds) · all cached"
    assert calls["train"] == 3
    status = {stage.name: stage.state for stage in workflow_status(workflow, workspace=tmp_path / "ws")}
    assert status["ingest"] == "cached" and status["train (seed 1)"] == "cached" and len(status) == 13

    shown = run_cli("run", str(workflow), "--workspace", str(tmp_path / "ws"), cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    row = next(line for line in shown.stdout.splitlines() if "eval/seg " in line or "eval/seg │" in line)
    assert f"{result.metrics['eval/seg_mean']:.4f} ± {result.metrics['eval/seg_sd']:.4f}" in row
    assert f"{per_seed[1]:.4f}" in row and "stages executed: none" in shown.stderr

    # A fourth seed trains once more; the three others stay cached.
    medseg.run_workflow(_seeded(tmp_path, phantom_dir, [0, 1, 2, 3]), workspace=tmp_path / "ws")
    assert calls["train"] == 4 and calls["ingest"] == 1


def test_a_repeated_seed_is_refused(tmp_path, phantom_dir):
    with pytest.raises(ConfigError, match=r"'seeds' lists \[1\] more than once"):
        medseg.validate_workflow(_seeded(tmp_path, phantom_dir, [1, 2, 1]))
