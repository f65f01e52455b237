"""Third-party plugins: real packages installed with pip, found through medseg's entry-point groups.

``tests/fixtures/plugins/medseg-example-plugin`` declares a stage, a network, a loss and an ingest
layout; ``medseg-broken-plugin`` declares a loss whose module cannot be imported. Both are
installed with ``pip install --target`` into a scratch site (the project's venv is untouched),
which the ``medseg`` command sees through ``PYTHONPATH``, as it would see any installed package.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from medseg.io.readers import read_image
from tests.conftest import GOWT1, PROJECT, require
from tests.integration.helpers import child_runs, clean_env, run_cli

pytestmark = pytest.mark.integration

FIXTURES = PROJECT / "tests" / "fixtures" / "plugins"
FRAMES = (2, 5, 6, 7)

PIPELINE = {
    "name": "plugin_study",
    "inputs": {"data": {}},
    "stages": {
        "images": {"uses": "ingest_images", "inputs": {"source": "inputs.data"}},
        "ingest": {
            "uses": "ingest",
            "inputs": {"source": "inputs.data"},
            "params": {"layout": "flat", "split": {"val_fraction": 0.25, "test_fraction": 0.25}},
        },
        "train": {
            "uses": "train",
            "inputs": {"dataset": "ingest.dataset"},
            "params": {
                "net": {"architecture": "tiny_fcn", "width": 4},
                "loss": {"name": "tversky", "alpha": 0.4, "beta": 0.6},
                "target": "boundary",
                "epochs": 1,
                "patch_size": [64, 64],
                "batch_size": 2,
                "samples_per_image": 2,
            },
        },
        "evaluate": {"uses": "evaluate", "inputs": {"dataset": "ingest.dataset", "model": "train.model"}},
        "count": {
            "uses": "object_count",
            "inputs": {"dataset": "ingest.dataset"},
            "params": {"min_size": 20},
        },
    },
}


def install(site: Path, *packages: Path) -> Path:
    """``pip install --target site`` of copies of the fixture packages (the sources stay clean)."""
    copies = []
    for package in packages:
        copy = site.parent / "src" / package.name
        shutil.copytree(package, copy, dirs_exist_ok=True)
        copies.append(str(copy))
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*pip, "--target", str(site), *copies], check=True, capture_output=True)
    return site


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("plugins")
    return install(root / "site", FIXTURES / "medseg-example-plugin", FIXTURES / "medseg-broken-plugin")


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """The pipeline, a workflow and real GOWT1 frames with their masks in the plugin's flat layout."""
    folder = tmp_path_factory.mktemp("study")
    data = folder / "flat"
    data.mkdir()
    for frame in FRAMES:
        (data / f"f{frame}_img.tif").symlink_to(require(GOWT1 / "01" / f"t{frame:03d}.tif"))
        (data / f"f{frame}_mask.tif").symlink_to(GOWT1 / "01_GT" / "SEG" / f"man_seg{frame:03d}.tif")
    (folder / "plugin_study.yaml").write_text(yaml.safe_dump(PIPELINE, sort_keys=False))
    workflow = {
        "pipeline": "plugin_study.yaml",
        "inputs": {"data": "flat"},
        "tracking": {"experiment": "plug"},
    }
    (folder / "wf.yaml").write_text(yaml.safe_dump(workflow))
    return folder


def test_medseg_plugins_lists_entries_by_package_and_the_broken_one_in_a_line(site):
    listed = run_cli("plugins", env=clean_env(PYTHONPATH=str(site)))
    assert listed.returncode == 0, listed.stderr
    rows = [line.split("│")[1:5] for line in listed.stdout.splitlines() if line.startswith("│")]
    assert sorted(tuple(cell.strip() for cell in row) for row in rows) == [
        ("medseg.layouts", "flat", "medseg-example-plugin", "0.3.0"),
        ("medseg.losses", "tversky", "medseg-example-plugin", "0.3.0"),
        ("medseg.nets", "tiny_fcn", "medseg-example-plugin", "0.3.0"),
        ("medseg.stages", "object_count", "medseg-example-plugin", "0.3.0"),
    ]
    assert listed.stderr.strip().splitlines() == [
        "broken: medseg-broken-plugin 0.1.0 (medseg.losses:sharp): "
        "ModuleNotFoundError: No module named 'medseg_missing_dependency'"
    ]
    assert "no medseg plugins installed" in run_cli("plugins").stderr


def test_plugin_stage_net_loss_and_layout_run_through_medseg_run(site, study, tmp_path):
    env = clean_env(PYTHONPATH=str(site))
    workspace = tmp_path / "ws"
    completed = run_cli("run", "wf.yaml", "--workspace", str(workspace), cwd=study, env=env)
    assert completed.returncode == 0, completed.stderr
    # The broken plugin is named once, in one line, and medseg's own stages ran regardless.
    mentions = [line for line in completed.stderr.splitlines() if "medseg-broken-plugin" in line]
    assert len(mentions) == 1 and "ModuleNotFoundError" in mentions[0]

    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("plug")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(run for run in runs if "mlflow.parentRunId" not in run.data.tags)
    children = child_runs(client, experiment.experiment_id, parent.info.run_id)
    assert set(children) == {"images", "ingest", "train", "evaluate", "count"}
    assert all(run.info.status == "FINISHED" for run in children.values())
    train = children["train"].data.params
    assert train["net.architecture"] == "tiny_fcn" and train["net.width"] == "4"
    assert train["loss.name"] == "tversky" and train["loss.alpha"] == "0.4"
    assert 0.0 <= children["evaluate"].data.metrics["eval/seg"] <= 1.0
    # The plugin stage's known answer: reference objects of at least 20 px per frame.
    expected = []
    for frame in FRAMES:
        mask = read_image(GOWT1 / "01_GT" / "SEG" / f"man_seg{frame:03d}.tif", kind="label").array
        _, sizes = np.unique(mask[mask > 0], return_counts=True)
        expected.append(int(np.sum(sizes >= 20)))
    assert children["count"].data.metrics["count/mean_objects"] == pytest.approx(np.mean(expected))

    # Cache keys carry the version of the plugins a stage is or names, and only those.
    manifests = {
        entry["stage"]: entry
        for entry in (json.loads(path.read_text()) for path in (workspace / "cache").glob("*/manifest.json"))
    }
    plugin = {"plugin:medseg-example-plugin": "0.3.0"}
    for stage in ("ingest", "train", "object_count"):
        assert manifests[stage]["versions"].items() >= plugin.items(), stage
    for stage in ("ingest_images", "evaluate"):
        assert "plugin:medseg-example-plugin" not in manifests[stage]["versions"], stage

    def states(environment: dict[str, str]) -> dict[str, str]:
        shown = run_cli("status", "wf.yaml", "--workspace", str(workspace), cwd=study, env=environment)
        assert shown.returncode == 0, shown.stderr
        rows = [line.split("│")[1:3] for line in shown.stdout.splitlines() if line.startswith("│")]
        return {name.strip(): state.strip() for name, state in rows}

    assert set(states(env).values()) == {"cached"}
    upgraded = tmp_path / "upgraded"
    shutil.copytree(FIXTURES / "medseg-example-plugin", upgraded)
    project = upgraded / "pyproject.toml"
    project.write_text(project.read_text().replace('version = "0.3.0"', 'version = "0.3.1"'))
    newer = install(tmp_path / "site-0.3.1", upgraded)
    after = states(clean_env(PYTHONPATH=str(newer)))
    assert after["images"] == "cached" and after["ingest"] != "cached" and after["count"] != "cached"


def test_naming_a_broken_plugin_says_which_package_failed_and_why(site, study, tmp_path):
    document = yaml.safe_load((study / "wf.yaml").read_text())
    document["params"] = {"train": {"loss": {"name": "sharp"}}}
    (study / "broken.yaml").write_text(yaml.safe_dump(document))
    completed = run_cli("validate", "broken.yaml", cwd=study, env=clean_env(PYTHONPATH=str(site)))
    assert completed.returncode == 1
    error = [line for line in completed.stderr.splitlines() if line.startswith("error")]
    assert len(error) == 1
    assert (
        "train.loss" in error[0] and "loss 'sharp' comes from plugin medseg-broken-plugin 0.1.0" in error[0]
    )
    assert "No module named 'medseg_missing_dependency'" in error[0]
    # Without the plugins installed, the workflow names what is missing.
    plain = run_cli("validate", "wf.yaml", cwd=study)
    assert plain.returncode == 1 and "unknown stage 'object_count'" in plain.stderr
