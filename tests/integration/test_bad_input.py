"""Bad input stops with one line naming the file and the fix, caches nothing, fails the run."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import tifffile
from mlflow.tracking import MlflowClient

import medseg
from medseg.demo import write_phantom_ctc
from tests.integration.helpers import child_runs, write_workflow

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return write_phantom_ctc(tmp_path_factory.mktemp("pristine"), frames=6, size=32, seed=1)


def _break_unreadable(data):
    (data / "01" / "t003.tif").write_bytes(b"II*\x00 this is not really a tiff")


def _break_zero_bytes(data):
    (data / "01" / "t002.tif").write_bytes(b"")


def _break_shape(data):
    tifffile.imwrite(data / "01_GT" / "SEG" / "man_seg004.tif", np.ones((16, 32), np.uint16))


def _break_empty(data):
    for path in (data / "01_GT" / "SEG").iterdir():
        path.unlink()


CASES = [
    (_break_unreadable, r"^case case_0004: t003\.tif: cannot read image .*damaged or not a valid image \("),
    (
        _break_zero_bytes,
        r"^case case_0003: t002\.tif: file is empty \(0 bytes\); replace it with a valid image \(",
    ),
    (_break_shape, r"^case case_0005: label: mask shape \(16, 32\) differs from the image's shape"),
    (_break_empty, r"^no annotated case found in the data input"),
]


@pytest.mark.parametrize(("damage", "message"), CASES, ids=["unreadable", "zero-bytes", "shape", "empty"])
def test_bad_input_fails_cleanly(tmp_path, pristine, damage, message):
    data = tmp_path / "data"
    shutil.copytree(pristine, data)
    damage(data)
    workspace = tmp_path / "ws"
    workflow = write_workflow(tmp_path, data, name="bad", params={}, experiment="bad-input")
    with pytest.raises(medseg.DataError, match=message) as error:
        medseg.run_workflow(workflow, workspace=workspace)
    assert "\n" not in str(error.value)
    assert str(tmp_path) not in str(error.value)  # file names, never source paths

    cache = workspace / "cache"
    assert not [p for p in cache.iterdir() if (p / "manifest.json").exists()]
    assert not list((cache / "tmp").iterdir())

    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("bad-input")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.medseg.workflow = 'bad'")
    assert parent.info.status == "FAILED"
    ingest = child_runs(client, experiment.experiment_id, parent.info.run_id)["ingest"]
    assert ingest.info.status == "FAILED"
    assert ingest.data.tags["medseg.error"] == str(error.value)
    if str(error.value).startswith("case "):  # the case id leads to its source in the private map
        case_id = str(error.value).split(":")[0].removeprefix("case ")
        (private,) = (workspace / "private").glob("*.json")
        assert case_id in private.read_text()


def test_cli_prints_one_line_and_exits_1(tmp_path, pristine):
    data = tmp_path / "data"
    shutil.copytree(pristine, data)
    _break_shape(data)
    workflow = write_workflow(tmp_path, data, name="bad", params={}, experiment="bad-input")
    command = [sys.executable, "-m", "medseg.cli", "run", str(workflow), "--workspace", str(tmp_path / "ws")]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "case case_0005: label: mask shape" in errors[0]
    assert "here (never logged): case_0005 is '01/t004' in the data input" in result.stderr
    assert "Traceback" not in result.stderr
    debug = subprocess.run(
        [sys.executable, "-m", "medseg.cli", "--debug", *command[3:]],
        capture_output=True,
        text=True,
        check=False,
    )
    assert debug.returncode == 1 and "Traceback" in debug.stderr
