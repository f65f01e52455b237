"""Security defaults: an authenticated MLflow server, no telemetry, no credentials in clear text."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from medseg.demo import write_phantom_ctc
from medseg.errors import ConfigError
from medseg.transport import refuse_clear_text_credentials
from tests.integration.helpers import clean_env, free_port, run_cli, start_mlflow_server, stop, write_workflow

pytestmark = pytest.mark.integration

ADMIN_PASSWORD = "medseg-test-Admin-7731"


def test_basic_auth_server_records_runs_only_with_credentials(tmp_path):
    config = tmp_path / "basic_auth.ini"
    config.write_text(
        "[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
        f"database_uri = sqlite:///{tmp_path / 'auth.db'}\nadmin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    env = {
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "medseg-test-csrf-key",
    }
    process, url = start_mlflow_server(tmp_path, free_port(), app_name="basic-auth", env=env)
    try:
        data = write_phantom_ctc(tmp_path / "data", frames=6, size=32, seed=2)
        params = {
            "ingest": {"train_on": "all"},
            "train": {"epochs": 1, "patch_size": [32, 32], "batch_size": 2},
        }
        workflow = write_workflow(tmp_path, data, name="auth", params=params, experiment="auth")
        anonymous = run_cli("run", str(workflow), "--workspace", str(tmp_path / "ws1"),
                            env=clean_env(MLFLOW_TRACKING_URI=url))  # fmt: skip
        assert anonymous.returncode == 1
        (error,) = [line for line in anonymous.stderr.splitlines() if line.startswith("error:")]
        assert url in error and ADMIN_PASSWORD not in anonymous.stderr
        wrong = run_cli("run", str(workflow), "--workspace", str(tmp_path / "ws2"),
                        env=clean_env(MLFLOW_TRACKING_URI=url, MLFLOW_TRACKING_USERNAME="admin",
                                      MLFLOW_TRACKING_PASSWORD="guess"))  # fmt: skip
        assert wrong.returncode == 1
        admitted = run_cli("run", str(workflow), "--workspace", str(tmp_path / "ws3"),
                           env=clean_env(MLFLOW_TRACKING_URI=url, MLFLOW_TRACKING_USERNAME="admin",
                                         MLFLOW_TRACKING_PASSWORD=ADMIN_PASSWORD))  # fmt: skip
        assert admitted.returncode == 0, admitted.stderr[-2000:]
        os.environ.update(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=ADMIN_PASSWORD)
        try:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(url)
            (run,) = client.search_runs([client.get_experiment_by_name("auth").experiment_id],
                                        "tags.medseg.workflow = 'auth'")  # fmt: skip
            assert run.info.status == "FINISHED"
        finally:
            for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                os.environ.pop(name)
        store = (tmp_path / "server.db").read_bytes() + (tmp_path / "auth.db").read_bytes()
        assert ADMIN_PASSWORD.encode() not in store  # the server keeps a hash, never the password
    finally:
        stop(process)


def test_mlflow_telemetry_is_off_once_medseg_tracks():
    env = {
        key: value
        for key, value in clean_env().items()
        if key not in ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK")
    }
    code = (
        "import medseg.tracking.mlflow\n"
        "from mlflow.environment_variables import MLFLOW_DISABLE_TELEMETRY\n"
        "print(MLFLOW_DISABLE_TELEMETRY.get())"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip() == "True"


def test_credentials_never_travel_in_clear_text_beyond_loopback(tmp_path):
    for url in ("https://mlflow.internal", "http://127.0.0.1:5000", "http://localhost:8042/dicom-web"):
        refuse_clear_text_credentials(url, "MLflow tracking", {})
    with pytest.raises(
        ConfigError, match=r"MLflow tracking credentials would travel unencrypted to mlflow\.internal"
    ):
        refuse_clear_text_credentials("http://mlflow.internal:5000", "MLflow tracking", {})
    refuse_clear_text_credentials("http://mlflow.internal:5000", "x", {"MEDSEG_ALLOW_INSECURE_HTTP": "1"})
    data = write_phantom_ctc(tmp_path / "data", frames=6, size=32, seed=2)
    workflow = write_workflow(tmp_path, data, name="clear", params={}, experiment="clear")
    env = clean_env(MLFLOW_TRACKING_URI="http://mlflow.internal:5000", MLFLOW_TRACKING_USERNAME="u",
                    MLFLOW_TRACKING_PASSWORD="secret-pw")  # fmt: skip
    result = run_cli("run", str(workflow), "--workspace", str(tmp_path / "ws"), env=env)
    assert result.returncode == 1 and "would travel unencrypted to mlflow.internal" in result.stderr
    assert "secret-pw" not in result.stderr and not (tmp_path / "ws" / "cache").exists()
