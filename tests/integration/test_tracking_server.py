"""Tracking redirected to a real `mlflow server` on loopback by the workflow or the environment."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from mlflow.tracking import MlflowClient

import medseg
from medseg.demo import write_phantom_ctc
from tests.integration.helpers import child_runs, write_workflow

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    port = _free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{root / 'server.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        process.kill()
        pytest.fail("mlflow server did not start within 90 s")
    yield url, root
    process.terminate()
    process.wait(timeout=30)


def test_workflow_tracking_uri_and_environment_redirect_to_server(tmp_path, server, monkeypatch):
    url, root = server
    data = write_phantom_ctc(tmp_path / "data", frames=6, size=32, seed=2)
    params = {"ingest": {"train_on": "all"}, "train": {"epochs": 1, "patch_size": [32, 32], "batch_size": 2}}
    workflow = write_workflow(tmp_path, data, name="served", params=params, experiment="served")
    text = workflow.read_text().replace("experiment: served", f"experiment: served\n  uri: {url}")
    workflow.write_text(text)

    result = medseg.run_workflow(workflow, workspace=tmp_path / "ws")
    assert result.tracking_uri == url
    assert not (tmp_path / "ws" / "mlflow.db").exists()  # nothing went to the embedded store
    assert os.environ.get("MLFLOW_TRACKING_URI") != url  # the library leaves the caller's environment alone

    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("served")
    assert client.get_run(result.parent_run_id).info.status == "FINISHED"
    children = child_runs(client, experiment.experiment_id, result.parent_run_id)
    assert set(children) == {"ingest", "train", "evaluate", "export"}
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
    assert len(hits) == 4
