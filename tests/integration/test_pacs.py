"""A real PACS: Orthanc (Debian packages) with its DICOMweb plugin, started on loopback by the test."""

from __future__ import annotations

import json
import shutil
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
from tests.conftest import SHARED_DATA, require, write_ct_export
from tests.integration.helpers import free_port, orthanc_request, spy_on_stages, start_orthanc

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        shutil.which("Orthanc") is None, reason="Orthanc not installed (tests/system-packages.sh)"
    ),
]

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
USER, PASSWORD = "medseg-test", "s3cret-pacs-password"
CT_3SLICE = SHARED_DATA / "dicom" / "dcmqi-segmentations" / "ct-3slice"


def _request(url: str, data: bytes | None = None, *, auth: bool = True) -> bytes:
    return orthanc_request(url, data, auth=(USER, PASSWORD) if auth else None)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory, identified_ct):
    """Orthanc with DICOMweb on a free loopback port, password-protected, holding two real CT series."""
    root = tmp_path_factory.mktemp("orthanc")
    process, base = start_orthanc(root, {"Plugins": [str(PLUGIN)]}, auth=(USER, PASSWORD))
    for folder in (identified_ct[0], require(CT_3SLICE)):
        for path in sorted(folder.iterdir()):
            _request(f"{base}/instances", path.read_bytes())
    yield base, process
    process.terminate()
    process.wait(timeout=30)


def pacs_workflow(folder: Path, base: str, query: dict, *, model: Path) -> Path:
    path = folder / "pacs.yaml"
    endpoint = {"url": f"{base}/dicom-web"}
    document = {
        "pipeline": "pacs_predict",
        "name": "pacs-cohort",
        "inputs": {"model": str(model)},
        "params": {"fetch": {"endpoint": endpoint, "query": query}, "store": {"endpoint": endpoint}},
        "tracking": {"experiment": "pacs"},
    }
    path.write_text(yaml.safe_dump(document))
    return path


def test_pacs_in_predict_seg_out_and_query_back(orthanc, identified_ct, tmp_path, monkeypatch):
    base, _ = orthanc
    folder, series_uid = identified_ct
    monkeypatch.setenv("MEDSEG_DICOMWEB_USER", USER)
    monkeypatch.setenv("MEDSEG_DICOMWEB_PASSWORD", PASSWORD)
    export = write_ct_export(tmp_path / "export")
    query = {"series_uid": series_uid}
    workflow = pacs_workflow(tmp_path, base, query, model=export)
    calls = spy_on_stages(monkeypatch)

    first = medseg.run_workflow(workflow, workspace=tmp_path / "ws")
    assert first.executed == ["fetch", "ingest", "predict", "write", "store"]
    assert first.metrics["fetch/series"] == 1.0 and first.metrics["fetch/instances"] == 20.0
    assert first.metrics["store/instances"] == 1.0

    # What was retrieved is the series that was uploaded, file for file (pixel data equal).
    retrieved = first.outputs["fetch"]["dicom"]
    record = json.loads((retrieved / "retrieved.json").read_text())
    assert len(record) == 20 and all(len(item["sha256"]) == 64 for item in record)
    originals = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in folder.iterdir()}
    for item in record:
        fetched = pydicom.dcmread(retrieved / item["file"])
        assert np.array_equal(fetched.pixel_array, originals[item["sop_instance_uid"]].pixel_array)

    # The SEG is in the PACS, found by query, referencing the source series, equal to the prediction.
    endpoint = DicomwebEndpoint(url=f"{base}/dicom-web")
    segs = find_instances(endpoint, {"Modality": "SEG"})
    assert len(segs) == 1
    seg_path = tmp_path / "from-pacs.dcm"
    seg_path.write_bytes(_request(f"{base}/instances/{_orthanc_id(base, segs[0]['sop'])}/file"))
    seg = pydicom.dcmread(seg_path)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    expected = medseg.Segmenter.from_export(export).predict(folder)
    placed = resample_to_grid(read_dicom_seg(seg_path), expected.spatial_shape, expected.affine, order=0)
    np.testing.assert_array_equal(placed.array[0], (expected.array[0] > 0).astype(np.int32))

    # A rerun fetches again (the archive is live) but the same content keeps the rest cached.
    second = medseg.run_workflow(workflow, workspace=tmp_path / "ws")
    assert second.executed == ["fetch", "store"] and second.cached == ["ingest", "predict", "write"]
    assert calls == {
        "dicomweb_fetch": 2,
        "ingest_images": 1,
        "predict": 1,
        "write_masks": 1,
        "dicomweb_store": 2,
    }
    assert len(find_instances(endpoint, {"Modality": "SEG"})) == 1  # storing the same SEG again is idempotent

    # Neither the password nor UIDs reach MLflow.
    database = (tmp_path / "ws" / "mlflow.db").read_bytes()
    assert PASSWORD.encode() not in database and series_uid.encode() not in database
    for path in (tmp_path / "ws").rglob("*"):
        if path.is_file() and "cache" not in path.parts and "private" not in path.parts:
            assert PASSWORD.encode() not in path.read_bytes(), path


def _orthanc_id(base: str, sop_uid: str) -> str:
    found = json.loads(_request(f"{base}/tools/lookup", sop_uid.encode()))
    return next(item["ID"] for item in found if item["Type"] == "Instance")


def test_query_by_modality_and_description_selects_series(orthanc):
    from medseg.io.dicomweb import DicomwebQuery, query_series

    base, _ = orthanc
    endpoint = DicomwebEndpoint(url=f"{base}/dicom-web")
    environ = {"MEDSEG_DICOMWEB_USER": USER, "MEDSEG_DICOMWEB_PASSWORD": PASSWORD}
    both = query_series(endpoint, DicomwebQuery(modality="CT"), environ=environ)
    assert len(both) >= 2
    description = pydicom.dcmread(next(require(CT_3SLICE).iterdir())).SeriesDescription
    one = query_series(
        endpoint, DicomwebQuery(modality="CT", description=f"^{description}$"), environ=environ
    )
    assert len(one) == 1 and one[0] in both
    with pytest.raises(medseg.DataError, match="max_series=1"):
        query_series(endpoint, DicomwebQuery(modality="CT", max_series=1), environ=environ)
    with pytest.raises(medseg.DataError, match="no series"):
        query_series(endpoint, DicomwebQuery(modality="MR"), environ=environ)


def test_wrong_password_and_a_dead_server_fail_clearly_and_cache_nothing(orthanc, tmp_path, monkeypatch):
    base, _ = orthanc
    monkeypatch.setenv("MEDSEG_DICOMWEB_USER", USER)
    monkeypatch.setenv("MEDSEG_DICOMWEB_PASSWORD", "wrong")
    workflow = pacs_workflow(tmp_path, base, {"modality": "CT"}, model=write_ct_export(tmp_path / "export"))
    with pytest.raises(medseg.DataError, match=rf"{base}/dicom-web answered HTTP 401.*MEDSEG_DICOMWEB_USER"):
        medseg.run_workflow(workflow, workspace=tmp_path / "ws")
    cache = tmp_path / "ws" / "cache"
    assert not [p for p in cache.iterdir() if p.is_dir() and p.name != "tmp"]
    assert not list((cache / "tmp").iterdir())
    client = MlflowClient(f"sqlite:///{tmp_path / 'ws' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("pacs").experiment_id])
    assert {run.info.status for run in runs} == {"FAILED"}
    assert "wrong" not in json.dumps([run.data.tags for run in runs])

    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MEDSEG_DICOMWEB_PASSWORD", PASSWORD)
    workflow = pacs_workflow(tmp_path, dead, {"modality": "CT"}, model=tmp_path / "export")
    with pytest.raises(medseg.DataError, match=rf"{dead}/dicom-web is unreachable"):
        medseg.run_workflow(workflow, workspace=tmp_path / "ws")
    assert not [p for p in cache.iterdir() if p.is_dir() and p.name != "tmp"]


def test_credentials_in_the_workflow_are_refused(tmp_path):
    workflow = pacs_workflow(
        tmp_path, f"http://{USER}:{PASSWORD}@127.0.0.1:1", {"modality": "CT"}, model=tmp_path
    )
    with pytest.raises(medseg.ConfigError, match="credentials do not belong in the workflow") as caught:
        medseg.validate_workflow(workflow)
    assert PASSWORD not in str(caught.value)
