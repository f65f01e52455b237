"""The command line as users call it: demo, run, status, validate, cache gc."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def medseg(*args, cwd, env=None):
    return subprocess.run(
        [sys.executable, "-m", "medseg.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        check=False,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


def test_demo_then_status_rerun_and_gc(tmp_path):
    demo = medseg("demo", "--dir", "demo", cwd=tmp_path)
    assert demo.returncode == 0, demo.stderr
    assert "stages executed: ingest, train, postprocess, evaluate, export" in demo.stderr
    assert re.search(r"eval/seg\s+│\s+0\.\d{4}", demo.stdout)
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/demo/.medseg/mlflow.db" in demo.stderr
    assert "Warning" not in demo.stderr + demo.stdout  # third-party warnings go to the debug log
    assert not re.search(r"^[DIWE]\d{4} ", demo.stderr, re.MULTILINE)  # nor torch's own log lines
    debug_log = (tmp_path / "demo" / ".medseg" / "logs" / "debug.log").read_text()
    assert "py.warnings WARNING" in debug_log and "FutureWarning" in debug_log  # MONAI's, torch.export's

    status = medseg("status", "demo/demo.yaml", "--workspace", "demo/.medseg", cwd=tmp_path)
    assert status.returncode == 0 and status.stdout.count("cached") == 5

    rerun = medseg("run", "demo/demo.yaml", "--workspace", "demo/.medseg", cwd=tmp_path)
    assert rerun.returncode == 0 and "stages executed: none" in rerun.stderr

    abandoned = tmp_path / "demo" / ".medseg" / "scratch" / ("0" * 64)
    abandoned.mkdir(parents=True)  # what a killed run of a since-changed workflow leaves behind
    (abandoned / "last_epoch.pt").write_bytes(b"checkpoint")
    kept = medseg("cache", "gc", "demo/demo.yaml", "--workspace", "demo/.medseg", cwd=tmp_path)
    assert "removed 0 cache entries; kept 5" in kept.stderr
    assert "removed 1 unfinished run checkpoint folder(s)" in kept.stderr and not abandoned.exists()
    dropped = medseg("cache", "gc", "--workspace", "demo/.medseg", cwd=tmp_path)
    assert "removed 5 cache entries" in dropped.stderr
    status = medseg("status", "demo/demo.yaml", "--workspace", "demo/.medseg", cwd=tmp_path)
    assert status.stdout.count("will run") == 5


def test_typo_fails_before_any_work(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "w.yaml").write_text(
        "pipeline: unet2d\ninputs: {data: data}\nparams:\n  train:\n    optim: {lrr: 1}\n"
    )
    result = medseg("run", "w.yaml", "--workspace", "ws", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == "error: w.yaml: unknown key 'params.train.optim.lrr'; did you mean 'lr'?"
    assert not (tmp_path / "ws").exists()
    assert medseg("validate", "w.yaml", cwd=tmp_path).returncode == 1


def test_plan_shows_values_and_origins_that_training_then_uses(tmp_path, phantom_dir):
    import json

    import yaml
    from mlflow.tracking import MlflowClient

    from tests.integration.helpers import FAST_TRAIN, write_workflow

    workflow = write_workflow(
        tmp_path, phantom_dir, name="planned", params={"train": FAST_TRAIN}, experiment="planned"
    )
    shown = medseg("plan", str(workflow), "--workspace", "ws", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "train.net.channels" in shown.stdout and "planned" in shown.stdout and "workflow" in shown.stdout
    listed = medseg("plan", str(workflow), "--workspace", "ws", "--json", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    (plan,) = json.loads(listed.stdout)
    values = plan["values"]
    assert values["train.patch_size"] == {"value": [32, 32], "origin": "workflow"}
    assert values["train.epochs"] == {"value": 2, "origin": "workflow"}
    assert (
        values["train.net.channels"]["origin"] == "planned" and values["train.target"]["origin"] == "planned"
    )
    assert values["train.budget"]["value"] is None  # epochs are set: no budget planned
    assert plan["facts"]["trial_mib_per_patch"] > 0

    ran = medseg("run", str(workflow), "--workspace", "ws", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    executed = ran.stderr.split("stages executed:")[1].split(";")[0]
    assert "train" in executed and "ingest" not in executed  # `medseg plan` built the dataset
    client = MlflowClient(f"sqlite:///{tmp_path / 'ws' / 'mlflow.db'}")
    train = client.search_runs(
        [client.get_experiment_by_name("planned").experiment_id], "tags.`medseg.stage` = 'train'"
    )[0]
    for key, entry in values.items():  # what training used is what `medseg plan` showed
        logged = train.data.params[f"plan.{key.removeprefix('train.')}"]
        assert yaml.safe_load(logged) == entry["value"], key
