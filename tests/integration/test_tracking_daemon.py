"""The tracking daemon: a rerun reaches MLflow through it, without importing MLflow itself."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
import time

import pytest

import medseg
from medseg.tracking import daemon as daemon_module
from medseg.tracking.daemon import DaemonTracker, socket_path
from tests.integration.helpers import FAST_TRAIN, write_workflow

pytestmark = pytest.mark.integration


def _wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("timed out waiting for the tracking daemon")
        time.sleep(0.2)


def test_rerun_tracks_through_the_daemon_identically_and_a_replaced_store_is_refused(
    tmp_path, phantom_dir, monkeypatch
):
    from mlflow.tracking import MlflowClient

    workflow = write_workflow(
        tmp_path, phantom_dir, name="warm", params={"train": FAST_TRAIN}, experiment="warm"
    )
    workspace = tmp_path / "ws"
    store = workspace / "mlflow.db"
    uri = f"sqlite:///{store}"
    sock = socket_path(uri)
    first = medseg.run_workflow(workflow, workspace=workspace, tracking_daemon_idle_s=30)
    _wait_for(sock.exists)  # started in the background by the first run

    calls = []
    original = DaemonTracker.start_run
    monkeypatch.setattr(
        DaemonTracker, "start_run", lambda self, **kw: calls.append(kw["name"]) or original(self, **kw)
    )
    again = medseg.run_workflow(workflow, workspace=workspace, tracking_daemon_idle_s=30)
    assert again.executed == [] and calls[0] == "warm · running" and len(calls) == 6  # parent + 5 stages

    client = MlflowClient(uri)
    parent = client.get_run(again.parent_run_id)
    assert parent.info.run_name == "warm · all cached" and parent.info.status == "FINISHED"
    assert parent.data.metrics["eval/seg"] == first.metrics["eval/seg"]
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{again.parent_run_id}'"
    )
    assert sorted(run.info.run_name for run in children) == sorted(
        f"{name} (cached)" for name in ("ingest", "train", "postprocess", "evaluate", "export")
    )
    assert [d.dataset.name for d in parent.inputs.dataset_inputs] == ["warm/ingest.dataset"]
    assert again.review_link == first.review_link and "workflowType=machine_learning" in again.review_link

    # A changed param reruns a stage through the warm daemon: its artifacts are uploaded by the
    # daemon, which reads them from this machine's disk.
    (tmp_path / "changed").mkdir()
    changed = write_workflow(
        tmp_path / "changed",
        phantom_dir,
        name="warm",
        params={"train": FAST_TRAIN, "evaluate": {"surface_distances": False}},
        experiment="warm",
    )
    rerun = medseg.run_workflow(changed, workspace=workspace, tracking_daemon_idle_s=30)
    assert rerun.executed == ["evaluate", "export"] and len(calls) == 12
    (evaluate,) = client.search_runs(
        [parent.info.experiment_id],
        f"tags.mlflow.parentRunId = '{rerun.parent_run_id}' and tags.`medseg.stage` = 'evaluate'",
    )
    uploaded = {entry.path for entry in client.list_artifacts(evaluate.info.run_id, "report")}
    assert {"report/per_case.csv", "report/summary.json"} <= uploaded

    # From the shell: a rerun through the warm daemon never imports MLflow in the user's process.
    shell = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            "-m",
            "medseg.cli",
            "run",
            str(workflow),
            "--workspace",
            str(workspace),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "MEDSEG_TRACKING_DAEMON": "30"},
        check=False,
    )
    assert shell.returncode == 0 and "stages executed: none" in shell.stderr
    imported = {
        line.rsplit("|", 1)[-1].strip() for line in shell.stderr.splitlines() if "import time:" in line
    }
    assert "torch" not in imported and "mlflow" not in imported

    # medseg edited (or upgraded) while the daemon runs: the client's code differs from the
    # daemon's, so it looks for another socket, and the old daemon refuses it at the hello.
    same_code = DaemonTracker.connect(uri, store)
    assert same_code is not None
    same_code.close()
    with monkeypatch.context() as edited:
        edited.setattr(daemon_module, "code_identity", lambda: "edited")
        assert socket_path(uri) != sock
        edited.setattr(daemon_module, "socket_path", lambda _: sock)
        assert DaemonTracker.connect(uri, store) is None

    # A store deleted under the daemon (the workspace wiped and rebuilt): the daemon notices and
    # exits; the next run tracks in-process into the new file.
    store.unlink()
    assert DaemonTracker.connect(uri, store) is None  # no store file: nothing to serve
    _wait_for(lambda: not sock.exists(), timeout=30)  # stale: gone, socket removed
    rebuilt = subprocess.run(
        [sys.executable, "-m", "medseg.cli", "run", str(workflow), "--workspace", str(workspace)],
        capture_output=True,
        text=True,
        env={**os.environ, "MEDSEG_TRACKING_DAEMON": "0"},
        check=False,
    )
    assert rebuilt.returncode == 0 and "stages executed: none" in rebuilt.stderr
    with contextlib.closing(sqlite3.connect(store)) as db:  # this process's MLflow caches the old store
        names = [name for (name,) in db.execute("SELECT name FROM runs")]
    assert len(names) == 6 and "warm · all cached" in names  # one parent and five cached stages
    assert daemon_module.idle_seconds({"MEDSEG_TRACKING_DAEMON": "0"}) == 0
    assert daemon_module.idle_seconds({}) == daemon_module.DEFAULT_IDLE_S
