"""No patient data in MLflow: DICOM with known PHI through ingest → train → evaluate → export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

import medseg
from medseg.io.readers import read_image, write_image
from medseg.io.volume import Volume
from tests.integration.helpers import run_cli
from tests.unit.test_dicom import PHI, write_series

pytestmark = pytest.mark.integration


def write_case(folder: Path, seed: int) -> None:
    """A 3D DICOM CT series (12 slices of 32×32, a bright ball) and its NIfTI label on the same grid."""
    rng = np.random.default_rng(seed)
    centre = rng.uniform(10, 22, size=3)
    grid = np.indices((12, 32, 32)).astype(float)
    grid[0] *= 2.5  # slices 2.5 mm apart, pixels 1 mm: a round ball in mm
    ball = ((grid - np.array([centre[0] * 0.4 * 2.5, centre[1], centre[2]])[:, None, None, None]) ** 2).sum(
        0
    ) < 36
    stack = np.where(ball, 900, 0) + rng.integers(0, 100, ball.shape)
    series_folder, _ = write_series(folder / "image", 12, step=2.5, shape=(32, 32), spacing=(1.0, 1.0))
    for index, path in enumerate(sorted(series_folder.iterdir(), reverse=True)):  # IM0012 is the lowest slice
        import pydicom

        dataset = pydicom.dcmread(path)
        dataset.PixelData = stack[index].astype(np.int16).tobytes()
        dataset.save_as(path)
    image = read_image(series_folder)  # RAS+ as ingest will see it
    label = (image.array[0] > 500).astype(np.int32)
    write_image(Volume(label[None], image.affine, kind="label"), folder / "label.nii.gz")


def test_phi_never_reaches_the_mlflow_store(tmp_path):
    data = tmp_path / "hospital"
    for number in range(5):
        write_case(data / f"{PHI['PatientID']}-{number}", seed=number)
    workflow = tmp_path / "study.yaml"
    workflow.write_text(
        yaml.safe_dump(
            {
                "pipeline": "unet3d",
                "name": "privacy",
                "inputs": {"data": str(data)},
                "params": {
                    "ingest": {"normalize": {"method": "ct", "window": [-100, 1000]}},
                    "train": {
                        "epochs": 1,
                        "patch_size": [16, 16, 8],
                        "net": {"channels": [4, 8], "strides": [2], "num_res_units": 0},
                    },
                },
                "tracking": {"experiment": "privacy"},
            }
        )
    )
    workspace = tmp_path / "ws"
    completed = run_cli("run", str(workflow), "--workspace", str(workspace))
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "stages executed: ingest, train, postprocess, evaluate, export" in completed.stderr

    secrets = [*PHI.values(), "Doe", "20240102", "19610704", str(data), "hospital", PHI["PatientID"]]
    store = [
        workspace / "mlflow.db",
        *(path for path in (workspace / "mlartifacts").rglob("*") if path.is_file()),
    ]
    assert len(store) > 10  # the database and the logged artifacts (reports, model, workflow)
    assert any(b"case_00" in path.read_bytes() for path in store)  # the scan reads what was logged
    # The MLflow model carries medseg's own source as its code: byte-identical to the package
    # (so nothing of the data can hide there) and without compiled files (they embed paths).
    package = Path(medseg.__file__).parent
    shipped = [path for path in store if "/artifacts/code/medseg/" in path.as_posix()]
    assert shipped and all(path.suffix == ".py" for path in shipped)
    for path in shipped:
        source = package / path.as_posix().split("/artifacts/code/medseg/", 1)[1]
        assert path.read_bytes() == source.read_bytes(), path
    store = [path for path in store if path not in shipped]
    for path in store:
        content = path.read_bytes()
        found = [secret for secret in secrets if secret.encode() in content]
        assert not found, f"{path.relative_to(workspace)} holds {found}"
    printed = completed.stdout + completed.stderr
    assert not [secret for secret in secrets if secret in printed]
    private = list((workspace / "private").glob("*.json"))
    assert private and PHI["PatientID"] in private[0].read_text()  # the map stays in the workspace
