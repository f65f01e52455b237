"""Adversarial PHI audit (MIDI-B style): identifying text planted everywhere, found nowhere it must not be.

A synthetic hospital export holds DICOM CT studies and NIfTI labels with PHI planted in folder
names, file names, PatientName/ID/BirthDate, AccessionNumber, InstitutionName,
ReferringPhysicianName, Series/Study descriptions, ProtocolName, a private tag and the NIfTI
header's description — and in third-party exception texts (a damaged ``.nii.gz`` under a
PHI-named folder). It goes through ingest → train → postprocess → evaluate → export, the
predict pipeline writing DICOM SEG, and three failure paths (damaged file, wrong geometry,
missing label). Then every file of the workspace outside ``private/`` (the MLflow store, its
artifacts, the cache, the tracking journal, scratch) — gzip members decompressed — and the
DICOM SEG outputs' non-patient modules are scanned for every planted string: zero hits. A
positive control proves the scanner finds each planted string where it is.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import yaml
from mlflow.tracking import MlflowClient

from medseg.io.readers import read_image
from tests.integration.helpers import run_cli
from tests.unit.test_dicom import write_series

pytestmark = pytest.mark.integration

PLANTED_TAGS = {
    "PatientName": "Quorlin^Zyxwert",
    "PatientID": "PIDX93817",
    "PatientBirthDate": "19470321",
    "AccessionNumber": "ACCX55421",
    "InstitutionName": "Vexmoor General",
    "ReferringPhysicianName": "Drelbow^Amsy",
    "SeriesDescription": "Qarvex thorax",
    "ProtocolName": "Protoqix",
    "StudyDescription": "Studevra",
}
PRIVATE_VALUE = "PRIVQ7731"
NIFTI_DESCRIPTION = "Nerquil PIDN55102"
PATIENT_FOLDER = "Zyxwert_PIDF20411"  # a folder named after a patient
SERIES_FOLDER = "Quorlin_ctseries"
LABEL_FILE = "Quorlin_PIDL66310_label.nii.gz"
NEEDLES = sorted(
    {
        *("Quorlin", "Zyxwert", "PIDX93817", "19470321", "ACCX55421", "Vexmoor", "Drelbow"),
        *("Qarvex", "Protoqix", "Studevra", PRIVATE_VALUE, "Nerquil", "PIDN55102"),
        *("PIDF20411", "PIDL66310", "PIDP77120", "PIDG88231", "PIDM99342"),
    }
)
"""Distinct tokens of every planted value, folder and file name (the failure paths' too)."""

# The patient and study modules a DICOM SEG must copy from its source to sit beside it.
COPIED_FROM_SOURCE = {
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
    "ReferringPhysicianName", "StudyDescription", "StudyDate", "StudyTime", "StudyID",
    "StudyInstanceUID", "PatientAge", "IssuerOfPatientID",
}  # fmt: skip


def plant(folder: Path, seed: int) -> None:
    """A CT series (12 slices, a bright ball) under a PHI-named folder, with PHI in its tags and label."""
    rng = np.random.default_rng(seed)
    centre = rng.uniform(10, 22, size=3)
    grid = np.indices((12, 32, 32)).astype(float)
    grid[0] *= 2.5
    ball = ((grid - np.array([centre[0] * 0.4 * 2.5, centre[1], centre[2]])[:, None, None, None]) ** 2).sum(
        0
    ) < 36
    stack = np.where(ball, 900, 0) + rng.integers(0, 100, ball.shape)
    series, _ = write_series(folder / SERIES_FOLDER, 12, step=2.5, shape=(32, 32), spacing=(1.0, 1.0))
    for index, path in enumerate(sorted(series.iterdir(), reverse=True)):
        dataset = pydicom.dcmread(path)
        dataset.PixelData = stack[index].astype(np.int16).tobytes()
        for keyword, value in PLANTED_TAGS.items():
            setattr(dataset, keyword, value)
        # type 2 attributes every archive's series has (highdicom copies them into the SEG)
        dataset.PatientSex, dataset.StudyID, dataset.StudyTime, dataset.SeriesNumber = "O", "1", "101500", 3
        dataset.FrameOfReferenceUID, dataset.SliceThickness = "1.2.826.0.1.3680043.8.498.77", 2.5
        block = dataset.private_block(0x0011, "MEDSEG PHI TEST", create=True)
        block.add_new(0x01, "LO", PRIVATE_VALUE)
        dataset.save_as(series / f"Quorlin_{path.name}")
        path.unlink()
    image = read_image(series)
    label = (image.array[0] > 500).astype(np.int16)
    header = nib.Nifti1Header()
    header["descrip"] = NIFTI_DESCRIPTION.encode()
    nib.save(nib.Nifti1Image(label, image.affine, header), folder / LABEL_FILE)


def scan(paths: list[Path], needles: list[str]) -> dict[str, list[str]]:
    """Which needles each file holds (gzip members decompressed, case-insensitive)."""
    hits = {}
    for path in paths:
        content = path.read_bytes()
        if content[:2] == b"\x1f\x8b":
            content += gzip.decompress(content)
        lowered = content.lower()
        found = [needle for needle in needles if needle.lower().encode() in lowered]
        if found:
            hits[str(path)] = found
    return hits


def seg_outside_patient_modules(path: Path) -> bytes:
    """The text of a DICOM SEG without the patient/study attributes it must copy from its source."""
    dataset = pydicom.dcmread(path)
    for keyword in COPIED_FROM_SOURCE:
        if keyword in dataset:
            delattr(dataset, keyword)
    return "\n".join(str(element) for element in dataset.iterall() if element.keyword != "PixelData").encode()


def _workflow(folder: Path, name: str, document: dict) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "tracking": {"experiment": "phi-audit"}, **document}))
    return path


TINY_3D = {
    "train": {
        "epochs": 1,
        "patch_size": [16, 16, 8],
        "net": {"channels": [4, 8], "strides": [2], "num_res_units": 0},
    },
}


def test_no_planted_phi_reaches_tracking_or_the_workspace(tmp_path):
    hospital = tmp_path / "Vexmoor_export"
    for number in range(5):
        plant(hospital / f"{PATIENT_FOLDER}-{number}", seed=number)
    workspace = tmp_path / "ws"
    cases = {
        "layout": "cases",
        "image": "*_ctseries",  # the workflow is the researcher's text, logged as written
        "label": "*_label.nii.gz",
        "normalize": {"method": "ct", "window": [-100, 1000]},
    }
    study = _workflow(
        tmp_path,
        "phi-train",
        {"pipeline": "unet3d", "inputs": {"data": str(hospital)}, "params": {"ingest": cases, **TINY_3D}},
    )
    trained = run_cli("run", str(study), "--workspace", str(workspace))
    assert trained.returncode == 0, trained.stderr[-3000:]
    export = next((workspace / "cache").glob("*/export/model_card.json")).parent

    # Predict pipeline on a PHI-named series folder: DICOM SEG written beside the cohort.
    cohort = tmp_path / "cohort_PIDP77120"
    plant(cohort / "Zyxwert_PIDP77120", seed=9)
    (cohort / "Zyxwert_PIDP77120" / LABEL_FILE).unlink()
    predict = _workflow(
        tmp_path,
        "phi-predict",
        {
            "pipeline": "predict",
            "inputs": {"images": str(cohort), "model": str(export)},
            "params": {"write": {"format": "dicom-seg"}},
        },
    )
    predicted = run_cli("run", str(predict), "--workspace", str(workspace))
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    segs = list((workspace / "cache").glob("*/masks/*.dcm"))
    assert len(segs) == 1

    # Failure paths under PHI-named folders: each run fails naming a case id, tracking nothing identifying.
    failures = {
        "damaged": tmp_path / "fail_damaged_PIDG88231",
        "geometry": tmp_path / "fail_geometry_PIDM99342",
        "missing": tmp_path / "fail_missing_PIDM99342",
    }
    for kind, root in failures.items():
        (root / "images").mkdir(parents=True)
        (root / "labels").mkdir()
        for number in range(3):
            name = f"Quorlin_PIDG88231_{number}.nii.gz"
            volume = np.zeros((8, 8, 8), np.float32)
            nib.save(nib.Nifti1Image(volume, np.eye(4)), root / "images" / name)
            shape = (8, 8, 6) if kind == "geometry" and number == 1 else (8, 8, 8)
            nib.save(nib.Nifti1Image(np.zeros(shape, np.int16), np.eye(4)), root / "labels" / name)
        if kind == "damaged":
            path = root / "images" / "Quorlin_PIDG88231_1.nii.gz"
            path.write_bytes(path.read_bytes()[:60])  # truncated gzip: nibabel's error quotes the path
        if kind == "missing":
            (root / "labels" / "Quorlin_PIDG88231_1.nii.gz").unlink()
        flow = _workflow(
            tmp_path,
            f"phi-{kind}",
            {
                "pipeline": "unet3d",
                "inputs": {"data": str(root)},
                "params": {"ingest": {"layout": "paired", "normalize": {"method": "none"}}, **TINY_3D},
            },
        )
        failed = run_cli("run", str(flow), "--workspace", str(workspace))
        assert failed.returncode == 1, failed.stderr[-2000:]
        (error,) = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
        assert "case_0002" in error, error
        assert "here (never logged): case_0002 is" in failed.stderr

    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("phi-audit")
    runs = client.search_runs([experiment.experiment_id])
    failed_runs = [run for run in runs if run.info.status == "FAILED"]
    assert len(failed_runs) == 6  # parent and ingest of each failure
    assert all("case_0002" in run.data.tags["medseg.error"] for run in failed_runs)

    # The scan: the whole workspace outside private/, and the SEG outside the modules it must copy.
    surfaces = [
        path
        for path in workspace.rglob("*")
        if path.is_file() and "private" not in path.parts and path not in segs  # SEGs: below
    ]
    kinds = {path.relative_to(workspace).parts[0] for path in surfaces}
    assert {"mlflow.db", "mlartifacts", "cache"} <= kinds
    assert len(surfaces) > 50
    sources = [str(path) for path in (hospital, cohort, *failures.values())]
    needles = [*NEEDLES, *sources, PATIENT_FOLDER, SERIES_FOLDER, "Vexmoor_export"]
    assert scan(surfaces, needles) == {}
    for seg in segs:
        text = seg_outside_patient_modules(seg).lower()
        assert not [needle for needle in needles if needle.lower().encode() in text], seg
        assert pydicom.dcmread(seg).PatientID == PLANTED_TAGS["PatientID"]  # the patient module is kept

    # Positive control: the scanner finds every planted string where it was planted.
    private = scan(sorted((workspace / "private").glob("*.json")), needles)
    assert any("PIDF20411" in hits for hits in private.values())  # the private map keeps the sources
    control = tmp_path / "control"
    control.mkdir()
    planted = [*hospital.rglob("*.dcm")][:1] + [*hospital.rglob("*.nii.gz")][:1]
    for path in planted:
        shutil.copy(path, control / path.name)
    (control / "tags.txt").write_text(" ".join(needles))
    found = {needle for hits in scan(sorted(control.iterdir()), needles).values() for needle in hits}
    assert found == set(needles)
    dicom, nifti = (control / path.name for path in planted)
    assert {"Quorlin", "PIDX93817", "ACCX55421", "Vexmoor", "Drelbow", PRIVATE_VALUE} <= set(
        scan([dicom], needles)[str(dicom)]
    )
    assert {"Nerquil", "PIDN55102"} <= set(scan([nifti], needles)[str(nifti)])
