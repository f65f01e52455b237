"""Tracking redirected to a real `mlflow server` on loopback by the workflow or the environment."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import pytest
from mlflow.tracking import MlflowClient
from mlflow.utils import rest_utils

import medseg
from medseg.demo import write_phantom_ctc
from medseg.stages import REGISTRY
from tests.integration.helpers import (
    child_runs,
    free_port,
    run_cli,
    start_mlflow_server,
    stop,
    write_workflow,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    process, url = start_mlflow_server(root, free_port())
    yield url, root
    stop(process)


def test_workflow_tracking_uri_and_environment_redirect_to_server(tmp_path, server, monkeypatch, capsys):
    url, root = server
    requests = Counter()
    send = rest_utils.http_request

    def counted(host_creds, endpoint, method, *args, **kwargs):
        requests[f"{method} {endpoint.rsplit('/api/2.0/', 1)[-1]}"] += 1
        return send(host_creds, endpoint, method, *args, **kwargs)

    monkeypatch.setattr(rest_utils, "http_request", counted)
    data = write_phantom_ctc(tmp_path / "data", frames=6, size=32, seed=2)
    params = {"ingest": {"train_on": "all"}, "train": {"epochs": 1, "patch_size": [32, 32], "batch_size": 2}}
    workflow = write_workflow(tmp_path, data, name="served", params=params, experiment="served")
    text = workflow.read_text().replace("experiment: served", f"experiment: served\n  uri: {url}")
    workflow.write_text(text)

    result = medseg.run_workflow(workflow, workspace=tmp_path / "ws")
    assert result.tracking_uri == url
    assert capsys.readouterr().out == ""  # the library prints nothing (MLflow's "View run" links)
    # Every run is addressed by what create_run returned: no run is read back (one request each,
    # about a second on a password-checking server).
    assert requests["GET mlflow/runs/get"] == 0
    assert requests["POST mlflow/runs/create"] == 6 and requests["POST mlflow/runs/update"] == 6
    assert not (tmp_path / "ws" / "mlflow.db").exists()  # nothing went to the embedded store
    assert os.environ.get("MLFLOW_TRACKING_URI") != url  # the library leaves the caller's environment alone

    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("served")
    assert client.get_run(result.parent_run_id).info.status == "FINISHED"
    children = child_runs(client, experiment.experiment_id, result.parent_run_id)
    assert set(children) == {"ingest", "train", "postprocess", "evaluate", "export"}
    report = {a.path for a in client.list_artifacts(children["evaluate"].info.run_id, "report")}
    assert "report/summary.json" in report
    assert any((root / "artifacts").rglob("summary.json"))  # artifacts stored by the server

    # The CLI takes MLFLOW_TRACKING_URI over the workflow's setting.
    plain = write_workflow(tmp_path, data, name="served-env", params=params, experiment="served-env")
    env = {**os.environ, "MLFLOW_TRACKING_URI": url}
    completed = subprocess.run(
        [sys.executable, "-m", "medseg.cli", "run", str(plain), "--workspace", str(tmp_path / "ws")],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert "stages executed: none" in completed.stderr  # same data and params: all cached
    hits = client.search_runs(
        [client.get_experiment_by_name("served-env").experiment_id], "tags.medseg.cache_hit = 'true'"
    )
    assert len(hits) == 5


def _outage_study(tmp_path, url, name):
    data = write_phantom_ctc(tmp_path / "data", frames=6, size=32, seed=2)
    params = {"ingest": {"train_on": "all"}, "train": {"epochs": 3, "patch_size": [32, 32], "batch_size": 2}}
    workflow = write_workflow(tmp_path, data, name=name, params=params, experiment=name)
    workflow.write_text(
        workflow.read_text().replace(f"experiment: {name}", f"experiment: {name}\n  uri: {url}")
    )
    return workflow


def _server_down_during_training(monkeypatch, root, port, *, comes_back: bool):
    """Spy on the train stage: the server dies as it starts and (maybe) returns as it ends."""
    spec = REGISTRY["train"]
    state = {}

    execute = spec.execute

    def run(context, params, inputs, outputs):
        stop(state["process"])
        result = execute(context, params, inputs, outputs)  # every epoch logs metrics: to the journal
        journal = context.private_dir.parent / "tracking-journal"
        state["journalled"] = sum(len(p.read_text().splitlines()) for p in journal.rglob("journal.jsonl"))
        if comes_back:
            state["process"], _ = start_mlflow_server(root, port)
        return result

    monkeypatch.setattr(spec, "execute", run)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # what `medseg` sets (0 retries here)
    return state


def test_server_outage_mid_run_is_journalled_and_replayed(tmp_path, monkeypatch):
    root, port = tmp_path / "server", free_port()
    root.mkdir()
    state = _server_down_during_training(monkeypatch, root, port, comes_back=True)
    state["process"], url = start_mlflow_server(root, port)
    try:
        result = medseg.run_workflow(_outage_study(tmp_path, url, "outage"), workspace=tmp_path / "ws")
        client = MlflowClient(url)
        children = child_runs(
            client, client.get_experiment_by_name("outage").experiment_id, result.parent_run_id
        )
        train = children["train"]
        assert state["journalled"] >= 3  # 3 epochs of metrics waited in the journal
        # Every epoch's metrics reached the server after it came back, in order, with their steps.
        assert [m.step for m in client.get_metric_history(train.info.run_id, "train/loss")] == [1, 2, 3]
        assert train.info.status == "FINISHED" and "train/final_loss" in train.data.metrics
        assert client.get_run(result.parent_run_id).info.status == "FINISHED"
        assert not (tmp_path / "ws" / "tracking-journal").exists() or not any(
            (tmp_path / "ws" / "tracking-journal").iterdir()
        )
    finally:
        stop(state["process"])


def test_server_gone_for_good_fails_clearly_and_sync_sends_the_rest(tmp_path, monkeypatch):
    root, port = tmp_path / "server", free_port()
    root.mkdir()
    state = _server_down_during_training(monkeypatch, root, port, comes_back=False)
    state["process"], url = start_mlflow_server(root, port)
    with pytest.raises(medseg.TrackingError, match=rf"127.0.0.1:{port}.*failed in start_run"):
        medseg.run_workflow(_outage_study(tmp_path, url, "gone"), workspace=tmp_path / "ws")
    journals = list((tmp_path / "ws" / "tracking-journal").iterdir())
    assert len(journals) == 1 and (journals[0] / "journal.jsonl").is_file()
    assert (tmp_path / "ws" / "cache").is_dir()  # the trained model is committed: nothing recomputed later

    state["process"], _ = start_mlflow_server(root, port)
    try:
        done = run_cli("tracking", "sync", "--workspace", str(tmp_path / "ws"))
        assert done.returncode == 0, done.stderr
        assert "sent 1 journal" in done.stderr
        client = MlflowClient(url)
        runs = client.search_runs([client.get_experiment_by_name("gone").experiment_id])
        train = next(run for run in runs if run.data.tags.get("medseg.stage") == "train")
        assert [m.step for m in client.get_metric_history(train.info.run_id, "train/loss")] == [1, 2, 3]
        assert train.info.status == "FINISHED"
        parent = next(run for run in runs if "mlflow.parentRunId" not in run.data.tags)
        assert parent.info.status == "FAILED" and "start_run" in parent.data.tags["medseg.error"]
        assert not any((tmp_path / "ws" / "tracking-journal").iterdir())
    finally:
        stop(state["process"])
