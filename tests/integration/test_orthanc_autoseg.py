"""Segmentation on arrival: the real Orthanc (Debian) with medseg's Python plugin, and the medseg worker.

Orthanc runs the settings ``medseg orthanc configure`` prints (plugin script, queue), with its
DICOMweb plugin; the worker is the ``medseg orthanc worker`` command in its own process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml
from mlflow.tracking import MlflowClient

import medseg
from medseg.io.dicom import read_dicom_seg
from medseg.io.dicomweb import DicomwebEndpoint, find_instances
from medseg.io.geometry import resample_to_grid
from medseg.orthanc.jobqueue import JobQueue, job_id
from tests.conftest import CT_SERIES, SHARED_DATA, require, write_ct_export
from tests.integration.helpers import ORTHANC_PLUGINS, clean_env, orthanc_request, run_cli, start_orthanc

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        shutil.which("Orthanc") is None or not (ORTHANC_PLUGINS / "libOrthancPython.so").exists(),
        reason="Orthanc or orthanc-python not installed (tests/system-packages.sh)",
    ),
]

AUTH = ("medseg-worker", "autoseg-s3cret")
CT_3SLICE = SHARED_DATA / "dicom" / "dcmqi-segmentations" / "ct-3slice"


def restamp(source: Path, folder: Path, *, name: str, description: str | None = None) -> tuple[Path, str]:
    """A copy of a real series as a new study and series (UIDs from ``name``); its folder and series UID."""
    folder.mkdir(parents=True)
    study = pydicom.uid.generate_uid(entropy_srcs=[f"{name}-study"])
    series = pydicom.uid.generate_uid(entropy_srcs=[f"{name}-series"])
    for path in sorted(source.iterdir()):
        dataset = pydicom.dcmread(path)
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study, series
        dataset.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[name, path.name])
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        if description is not None:
            dataset.SeriesDescription = description
        dataset.save_as(folder / path.name)
    return folder, str(series)


class Autoseg:
    """Orthanc with the plugin, the worker's configuration and helpers to drive both."""

    def __init__(self, root: Path) -> None:
        self.root = root
        write_ct_export(root / "export")
        broken = write_ct_export(root / "broken-export")
        (broken / "weights.pt").write_bytes(b"not a tensor archive")
        self.config = root / "autoseg.yaml"
        document = {
            "orthanc": {"url": "http://127.0.0.1:1"},  # set once Orthanc has its port
            "queue": "queue",
            "workspace": "ws",
            "tracking": {"experiment": "autoseg"},
            "retry": {"attempts": 2, "backoff_s": 0},
            "poll_s": 0.2,
            "rules": [
                {"name": "ct-body", "model": "export", "modality": "CT", "description": "body"},
                {"name": "broken", "model": "broken-export", "description": "^broken model$"},
            ],
        }
        self.config.write_text(yaml.safe_dump(document))
        configured = run_cli("orthanc", "configure", str(self.config))
        assert configured.returncode == 0, configured.stderr
        settings = json.loads(configured.stdout)
        assert Path(settings["PythonScript"]).name == "plugin.py"
        settings["Plugins"].append(str(ORTHANC_PLUGINS / "libOrthancDicomWeb.so"))
        settings["StableAge"] = 1
        self.orthanc_root = root / "orthanc"
        self.orthanc_root.mkdir()
        self.process, self.base = start_orthanc(self.orthanc_root, settings, auth=AUTH)
        document["orthanc"]["url"] = self.base
        self.config.write_text(yaml.safe_dump(document))
        self.queue = JobQueue(root / "queue")
        self.env = clean_env(MEDSEG_DICOMWEB_USER=AUTH[0], MEDSEG_DICOMWEB_PASSWORD=AUTH[1])

    def upload(self, folder: Path) -> str:
        """Send every file of ``folder`` to Orthanc; return the Orthanc series id."""
        for path in sorted(folder.iterdir()):
            answer = json.loads(orthanc_request(f"{self.base}/instances", path.read_bytes(), auth=AUTH))
        return json.loads(orthanc_request(f"{self.base}/instances/{answer['ID']}", auth=AUTH))["ParentSeries"]

    def worker(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "medseg.cli", "orthanc", "worker", str(self.config), *args],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    def restart_orthanc(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self.process, _ = start_orthanc(self.orthanc_root, {}, auth=AUTH)

    def segs_of(self, series_uid: str) -> list[dict]:
        endpoint = DicomwebEndpoint(url=f"{self.base}/dicom-web")
        environ = {"MEDSEG_DICOMWEB_USER": AUTH[0], "MEDSEG_DICOMWEB_PASSWORD": AUTH[1]}
        found = find_instances(endpoint, {"Modality": "SEG"}, environ=environ)
        return [item for item in found if self.referenced_series(item["sop"]) == series_uid]

    def referenced_series(self, sop_uid: str) -> str:
        found = json.loads(orthanc_request(f"{self.base}/tools/lookup", sop_uid.encode(), auth=AUTH))
        instance = next(item["ID"] for item in found if item["Type"] == "Instance")
        self.root.joinpath("seg.dcm").write_bytes(
            orthanc_request(f"{self.base}/instances/{instance}/file", auth=AUTH)
        )
        return str(pydicom.dcmread(self.root / "seg.dcm").ReferencedSeriesSequence[0].SeriesInstanceUID)

    def wait_for(self, condition, what: str, timeout: float = 120.0) -> float:
        """Poll ``condition`` until true; the seconds it took."""
        started = time.monotonic()
        while not condition():
            if time.monotonic() - started > timeout:
                pytest.fail(f"timed out waiting for {what}; Orthanc log:\n{self.log()[-3000:]}")
            time.sleep(0.25)
        return time.monotonic() - started

    def log(self) -> str:
        return (self.orthanc_root / "orthanc.log").read_text()


@pytest.fixture(scope="module")
def autoseg(tmp_path_factory):
    setup = Autoseg(tmp_path_factory.mktemp("autoseg"))
    yield setup
    setup.process.terminate()
    setup.process.wait(timeout=30)


def _expected_seg_equals_prediction(autoseg: Autoseg, folder: Path) -> None:
    """The SEG in Orthanc (last fetched) is voxel for voxel what ``Segmenter.predict`` gives."""
    expected = medseg.Segmenter.from_export(autoseg.root / "export").predict(folder)
    seg = read_dicom_seg(autoseg.root / "seg.dcm")
    placed = resample_to_grid(seg, expected.spatial_shape, expected.affine, order=0)
    np.testing.assert_array_equal(placed.array[0], (expected.array[0] > 0).astype(np.int32))


def test_a_matching_series_is_segmented_on_arrival_and_others_are_left_alone(autoseg, identified_ct):
    folder, series_uid = identified_ct
    worker = autoseg.worker()
    try:
        assert worker.stderr.readline().startswith("medseg worker: queue")  # started, waiting
        started = time.monotonic()
        series = autoseg.upload(folder)
        other = autoseg.upload(require(CT_3SLICE))  # CT too, but its description matches no rule
        autoseg.wait_for(lambda: autoseg.segs_of(series_uid), "the SEG in Orthanc")
        print(f"\nupload of 20 + 3 slices to SEG in Orthanc: {time.monotonic() - started:.1f} s")
    finally:
        worker.send_signal(signal.SIGTERM)
        _out, err = worker.communicate(timeout=120)
    assert worker.returncode == 0, err
    _expected_seg_equals_prediction(autoseg, folder)

    job = job_id(series, "ct-body")
    assert autoseg.queue.state(job) == "done"
    assert autoseg.queue.state(job_id(other, "ct-body")) is None and autoseg.queue.counts()["done"] == 1
    assert f"job {job}: done: SEG stored" in err
    assert f"medseg: queued job {job} for series {series} (rule ct-body)" in autoseg.log()
    assert f"medseg: job {job}: done" in autoseg.log()

    client = MlflowClient(f"sqlite:///{autoseg.root / 'ws' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("autoseg").experiment_id])
    parent = next(run for run in runs if run.info.run_name.startswith(f"autoseg-ct-body-{job} · ran "))
    assert parent.info.status == "FINISHED"
    assert {run.data.tags.get("medseg.stage") for run in runs} >= {"fetch", "predict", "write", "store"}
    database = (autoseg.root / "ws" / "mlflow.db").read_bytes()
    for identifying in (series_uid, series, AUTH[1], str(folder)):
        assert identifying.encode() not in database, identifying


def test_queued_jobs_survive_an_orthanc_restart_and_a_killed_worker(autoseg, tmp_path):
    folder, series_uid = restamp(require(CT_SERIES), tmp_path / "ct", name="restart")
    series = autoseg.upload(folder)
    job = job_id(series, "ct-body")
    autoseg.wait_for(lambda: autoseg.queue.state(job) == "pending", "the job in the queue")
    autoseg.restart_orthanc()  # the queue is on disk: nothing is lost

    worker = autoseg.worker()
    autoseg.wait_for(lambda: autoseg.queue.state(job) == "running", "the worker to claim the job")
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait(timeout=30)
    assert autoseg.queue.state(job) == "running" and not autoseg.segs_of(series_uid)

    rerun = subprocess.run(
        [sys.executable, "-m", "medseg.cli", "orthanc", "worker", str(autoseg.config), "--once"],
        env=autoseg.env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert rerun.returncode == 0, rerun.stderr
    assert autoseg.queue.state(job) == "done"
    assert f"medseg: job {job}: requeued: the worker processing it stopped" in autoseg.log()
    assert len(autoseg.segs_of(series_uid)) == 1
    _expected_seg_equals_prediction(autoseg, folder)


def test_a_failing_series_is_retried_reported_and_does_not_block_others(autoseg, identified_ct, tmp_path):
    bad_folder, bad_uid = restamp(
        require(CT_3SLICE), tmp_path / "bad", name="bad", description="broken model"
    )
    good_folder, good_uid = restamp(identified_ct[0], tmp_path / "good", name="good")
    bad = job_id(autoseg.upload(bad_folder), "broken")
    good = job_id(autoseg.upload(good_folder), "ct-body")
    autoseg.wait_for(
        lambda: autoseg.queue.state(bad) == "pending" and autoseg.queue.state(good) == "pending", "both jobs"
    )
    run = run_cli("orthanc", "worker", str(autoseg.config), "--once", env=autoseg.env)
    assert run.returncode == 0, run.stderr

    assert autoseg.queue.state(good) == "done" and len(autoseg.segs_of(good_uid)) == 1
    assert autoseg.queue.state(bad) == "failed" and not autoseg.segs_of(bad_uid)
    failed = json.loads((autoseg.queue.folder("failed") / f"{bad}.json").read_text())
    assert failed["attempts"] == 2 and "weights" in failed["error"]
    log = autoseg.log()
    assert f"medseg: job {bad}: retrying:" in log and f"medseg: job {bad}: failed:" in log
    error_lines = [line for line in log.splitlines() if f"medseg: job {bad}: failed" in line]
    assert error_lines[0].startswith("E")  # Orthanc's error level

    client = MlflowClient(f"sqlite:///{autoseg.root / 'ws' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("autoseg").experiment_id])
    statuses = [run.info.status for run in runs if run.info.run_name == f"autoseg-broken-{bad} · failed"]
    assert statuses == ["FAILED", "FAILED"]

    listed = run_cli("orthanc", "jobs", str(autoseg.config))
    assert listed.returncode == 0 and "failed: 1" in listed.stdout and bad in listed.stdout
