"""Helpers for end-to-end tests: workflow files in a temp dir, stage spies, MLflow queries."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from medseg.stages import REGISTRY

FAST_TRAIN = {"epochs": 2, "patch_size": [32, 32], "batch_size": 4, "samples_per_image": 2}
"""Train params that make the phantom study run in seconds."""


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_workflow(
    folder: Path,
    data: Path,
    *,
    name: str,
    params: dict,
    experiment: str,
    torch_export: bool = False,
    mlflow_model: bool = False,
) -> Path:
    """Write a unet2d workflow binding ``data`` with ``params`` overrides; return its path.

    The export skips the ``torch.export`` program unless ``torch_export`` (2-4 s per export;
    ``test_demo_workflow.py`` exports and checks it) and the MLflow model unless
    ``mlflow_model`` (several seconds; ``test_demo_workflow.py`` and ``test_export_predict.py``
    are its tests).
    """
    export = {"torch_export": torch_export, "mlflow_model": mlflow_model}
    params = {**params, "export": {**export, **params.get("export", {})}}
    path = folder / f"{name}.yaml"
    document = {
        "pipeline": "unet2d",
        "name": name,
        "inputs": {"data": str(data)},
        "params": params,
        "tracking": {"experiment": experiment},
    }
    path.write_text(yaml.safe_dump(document))
    return path


def spy_on_stages(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Count calls of every registered stage's ``execute``."""
    calls: Counter[str] = Counter()
    for name, spec in list(REGISTRY.items()):

        def counted(context, params, inputs, outputs, _execute=spec.execute, _name=name):
            calls[_name] += 1
            return _execute(context, params, inputs, outputs)

        monkeypatch.setattr(spec, "execute", counted)
    return calls


def child_runs(client, experiment_id: str, parent_id: str) -> dict:
    """The nested runs of ``parent_id`` keyed by their ``medseg.stage`` tag."""
    runs = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    return {run.data.tags["medseg.stage"]: run for run in runs}


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without tracking or workspace redirects, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in {"MLFLOW_TRACKING_URI", "MEDSEG_WORKSPACE"}}
    return {**env, "COLUMNS": "200", **extra}


def run_cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, module: str = "medseg.cli"
):
    """Run ``python -m medseg.cli ARGS`` (or another module) and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env or clean_env(),
        check=False,
    )


def start_mlflow_server(
    root: Path, port: int, *, app_name: str | None = None, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, str]:
    """Start ``mlflow server`` on loopback (SQLite store and served artifacts under ``root``).

    The server keeps its store across restarts on the same ``root`` and ``port``. ``app_name``
    (``basic-auth``) and ``env`` (its settings) start it with authentication.

    Returns the process and its URL once ``/health`` answers (fails the test after 90 s).
    """
    import time
    import urllib.request

    process = subprocess.Popen(
        [
            sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
            "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
            "--artifacts-destination", str(root / "artifacts"), "--workers", "1",
            *(["--app-name", app_name] if app_name else []),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return process, url
        except OSError:
            time.sleep(0.5)
    stop(process)
    pytest.fail("mlflow server did not start within 90 s")


def stop(process: subprocess.Popen) -> None:
    """Terminate a server started by a test, and its workers (the whole process group)."""
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


ORTHANC_PLUGINS = Path("/usr/share/orthanc/plugins")


def orthanc_request(url: str, data: bytes | None = None, *, auth: tuple[str, str] | None = None) -> bytes:
    """GET (or POST ``data`` to) an Orthanc URL, with HTTP basic ``auth``."""
    import base64
    import urllib.request

    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.read()


def start_orthanc(root: Path, settings: dict, *, auth: tuple[str, str]) -> tuple[subprocess.Popen, str]:
    """Start Orthanc on a free loopback port with ``settings`` (storage under ``root``).

    Restarting with the same ``root`` keeps the port and the stored instances. Returns the
    process and the REST root URL; its log is ``root/orthanc.log``.
    """
    import json
    import time
    import urllib.error

    path = root / "orthanc.json"
    if path.is_file():
        config = json.loads(path.read_text())
    else:
        config = {
            "Name": "medseg-test",
            "StorageDirectory": str(root / "db"),
            "IndexDirectory": str(root / "db"),
            "HttpPort": free_port(),
            "DicomPort": free_port(),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {auth[0]: auth[1]},
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            **settings,
        }
        path.write_text(json.dumps(config))
    log = (root / "orthanc.log").open("a")
    process = subprocess.Popen(["Orthanc", str(path)], stdout=log, stderr=log, start_new_session=True)
    log.close()
    base = f"http://127.0.0.1:{config['HttpPort']}"
    deadline = time.monotonic() + 60
    while True:
        try:
            orthanc_request(f"{base}/system", auth=auth)
            return process, base
        except (OSError, urllib.error.URLError):
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                pytest.fail(f"Orthanc did not start: {(root / 'orthanc.log').read_text()[-2000:]}")
            time.sleep(0.3)
