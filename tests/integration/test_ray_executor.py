"""Cohort inference on a real local Ray cluster (head + 2 worker nodes on loopback) equals in-process."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import yaml

import medseg
from medseg.errors import ConfigError
from medseg.inference.cohort import predict_cohort
from medseg.inference.executors import ExecutorParams
from medseg.io.readers import read_image
from tests.conftest import CT_SERIES, GOWT1, require, write_ct_export, write_untrained_export
from tests.integration.helpers import clean_env, run_cli

pytestmark = pytest.mark.integration
ray = pytest.importorskip("ray", reason="Ray is the dev extra's (pip install -e '.[dev]')")
IDENTIFYING = "DOE-JOHN"
"""Part of every cohort file name: it must reach no Ray task name, log or dashboard."""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A Ray head without CPUs and two worker nodes with one CPU each, all on this machine."""
    from ray.cluster_utils import Cluster

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    started = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(2):
        started.add_node(num_cpus=1)
    started.wait_for_nodes()
    yield started
    started.shutdown()


def write_cell_export(folder: Path) -> Path:
    """An export folder of a small, untrained 2D U-Net for fluorescence frames (seeded: fixed output)."""
    card = {
        "name": "cells",
        "preprocessing": {"spatial_dims": 2, "channels": 1, "normalize": {"method": "percentile"}},
        "inference": {"roi_size": [128, 128], "overlap": 0.25, "min_object_size": 0, "fill_holes": False},
    }
    return write_untrained_export(folder, spatial_dims=2, seed=3, card=card)


def tiff_cohort(folder: Path, frames: tuple[int, ...]) -> Path:
    """GOWT1 frames copied under identifying names (``DOE-JOHN-<frame>.tif``)."""
    folder.mkdir(parents=True)
    for frame in frames:
        shutil.copy(require(GOWT1 / "01") / f"t{frame:03d}.tif", folder / f"{IDENTIFYING}-{frame}.tif")
    return folder


def run_predict(root: Path, images: Path, model: Path, workspace: str, executor: dict | None = None):
    document = {
        "pipeline": "predict",
        "name": "cohort",
        "inputs": {"images": str(images), "model": str(model)},
        "params": {"predict": {"executor": executor}} if executor else {},
        "tracking": {"experiment": "cohort"},
    }
    workflow = root / f"{workspace}.yaml"
    workflow.write_text(yaml.safe_dump(document))
    return medseg.run_workflow(workflow, workspace=root / workspace)


def same_masks(first, second) -> None:
    labels = [result.outputs["predict"]["labels"] for result in (first, second)]
    assert (labels[0] / "predictions.csv").read_bytes() == (labels[1] / "predictions.csv").read_bytes()
    cases = sorted(path.name for path in (labels[0] / "cases").iterdir())
    assert cases == sorted(path.name for path in (labels[1] / "cases").iterdir())
    for case in cases:
        expected, found = (read_image(folder / "cases" / case / "label.nii.gz") for folder in labels)
        np.testing.assert_array_equal(found.array, expected.array, err_msg=case)
        assert np.array_equal(found.affine, expected.affine)


def test_predict_pipeline_on_ray_writes_the_in_process_masks(cluster, tmp_path):
    on_ray = {"kind": "ray", "address": cluster.address, "workers": 2}
    ct_model = write_ct_export(tmp_path / "ct-model")
    ct = run_predict(tmp_path, require(CT_SERIES), ct_model, "ct-local")
    assert ct.metrics["predict/cases"] == 1 and ct.metrics["predict/mean_volume_ml"] > 0
    same_masks(ct, run_predict(tmp_path, CT_SERIES, ct_model, "ct-ray", on_ray))

    cells = tiff_cohort(tmp_path / "cohort", (0, 1, 2))
    cell_model = write_cell_export(tmp_path / "cell-model")
    local = run_predict(tmp_path, cells, cell_model, "cells-local")
    assert local.metrics["predict/cases"] == 3 and local.metrics["predict/mean_objects"] > 0
    distributed = run_predict(tmp_path, cells, cell_model, "cells-ray", on_ray)
    assert distributed.executed == ["ingest", "predict", "write"]
    same_masks(local, distributed)

    # One cached unit on the driver: the executor is not in the cache key, and Ray ran one MLflow run.
    again = run_predict(tmp_path, cells, cell_model, "cells-local", on_ray)
    assert again.executed == []
    sessions = Path(cluster.head_node.get_session_dir_path())
    files = [path for path in sessions.rglob("*") if path.is_file()]
    assert files and [path for path in files if IDENTIFYING.encode() in path.read_bytes()] == []


def test_a_killed_worker_is_retried_or_its_cases_reported(cluster, tmp_path):
    cells = tiff_cohort(tmp_path / "cohort", (3, 4, 5, 6, 7, 8))
    model = write_cell_export(tmp_path / "model")
    cases = sorted((path.stem, path) for path in cells.iterdir())
    expected = predict_cohort(model, cases, tmp_path / "local", "nifti")
    assert all(item.error is None for item in expected)

    def kill_a_worker(description: str, done: float, total: float, name: str) -> None:
        if done == 1:  # the first case is back: both workers hold cases now
            os.kill(worker_pids()[0], signal.SIGKILL)

    for retries in (1, 0):
        output = tmp_path / f"ray-{retries}"
        executor = ExecutorParams(kind="ray", address=cluster.address, workers=2, retries=retries)
        results = predict_cohort(model, cases, output, "nifti", executor=executor, progress=kill_a_worker)
        assert [item.name for item in results] == [item.name for item in expected]
        failed = [item for item in results if item.error]
        if retries:
            assert failed == []  # the dead worker came back and redid its cases
        else:
            assert 1 <= len(failed) <= 2 < len(results)  # its cases in flight are reported, the rest done
            assert all("its Ray worker died 1 time(s) while segmenting it" in item.error for item in failed)
        for item, reference in zip(results, expected, strict=True):
            if item.error is None:
                np.testing.assert_array_equal(read_image(item.path).array, read_image(reference.path).array)
                assert not any(output.glob(".*partial*"))


def worker_pids() -> list[int]:
    """Process ids of the running medseg Ray workers (titled by their actor class or their task's name)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if command.startswith((b"ray::CaseWorker", b"ray::segment case_")):  # idle, or on a case
                found.append(int(entry.name))
    return sorted(found)


def test_cli_predict_on_ray_and_a_clear_error_without_it(cluster, tmp_path, monkeypatch):
    cells = tiff_cohort(tmp_path / "cohort", (9, 10))
    model = write_cell_export(tmp_path / "model")
    done = run_cli(
        "predict", str(model), str(cells), str(tmp_path / "out"), "--executor", "ray",
        "--address", cluster.address, "--workers", "2",
        cwd=tmp_path, env=clean_env(RAY_USAGE_STATS_ENABLED="0"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [
        f"{IDENTIFYING}-10.nii.gz",
        f"{IDENTIFYING}-9.nii.gz",
    ]
    refused = run_cli("predict", str(model), str(cells), str(tmp_path / "x"), "--executor", "spark")
    assert refused.returncode == 1
    assert "--executor: Input should be 'local' or 'ray'" in refused.stdout + refused.stderr

    monkeypatch.setitem(__import__("sys").modules, "ray", None)  # as if medseg[ray] were not installed
    with pytest.raises(ConfigError, match=r"executor 'ray' needs Ray: pip install 'medseg\[ray\]'"):
        predict_cohort(model, [("a", cells)], tmp_path / "y", "nifti", executor=ExecutorParams(kind="ray"))


def test_a_dicom_seg_segmented_on_ray_references_the_driver_s_series(cluster, identified_ct, tmp_path):
    import pydicom

    folder, series_uid = identified_ct
    model = write_ct_export(tmp_path / "model")
    executor = ExecutorParams(kind="ray", address=cluster.address, workers=1, cpus_per_worker=1)
    (local,) = predict_cohort(model, [("ct", folder)], tmp_path / "local", "dicom-seg")
    (remote,) = predict_cohort(model, [("ct", folder)], tmp_path / "ray", "dicom-seg", executor=executor)
    assert remote.error is None and remote.voxels == local.voxels > 0
    ours, theirs = pydicom.dcmread(remote.path), pydicom.dcmread(local.path)
    assert ours.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid  # the worker saw 000001.dcm...
    np.testing.assert_array_equal(ours.pixel_array, theirs.pixel_array)
