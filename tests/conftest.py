"""Shared fixtures: paths to the real data beside the project, a phantom dataset, a real CT series."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Commands under test track in-process: a tracking daemon per test workspace would outlive the
# test by its idle time. tests/integration/test_tracking_daemon.py switches it on where tested.
os.environ["MEDSEG_TRACKING_DAEMON"] = "0"

PROJECT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT.parent / "shared" / "data"
GOWT1 = SHARED_DATA / "ctc" / "Fluo-N2DH-GOWT1"
CTC_FIXTURE = SHARED_DATA / "ctc" / "java-ctcmetrics-fixture" / "test_data"
CT_SERIES = SHARED_DATA / "dicom" / "totalsegmentator-example" / "example_ct_dicom"


def require(path: Path) -> Path:
    """Skip the test when a real-data folder is not beside the project."""
    if not path.exists():
        pytest.skip(f"real data not available: {path}")
    return path


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small phantom in CTC layout (12 frames of 64×64)."""
    from medseg.demo import write_phantom_ctc

    return write_phantom_ctc(tmp_path_factory.mktemp("phantom"), frames=12, size=64, seed=3)


@pytest.fixture(scope="session")
def identified_ct(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The real 20-slice CT series with the UIDs its anonymiser blanked filled in, as a PACS holds it.

    Returns the folder and its SeriesInstanceUID.
    """
    import pydicom

    folder = tmp_path_factory.mktemp("ct") / "series"
    folder.mkdir()
    study = pydicom.uid.generate_uid(entropy_srcs=["medseg-test-study"])
    series = pydicom.uid.generate_uid(entropy_srcs=["medseg-test-series"])
    for path in sorted(require(CT_SERIES).iterdir()):
        dataset = pydicom.dcmread(path)
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study, series
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID
        dataset.save_as(folder / path.name)
    return folder, str(series)


def write_untrained_export(folder: Path, *, spatial_dims: int, seed: int, card: dict) -> Path:
    """An export folder of a small, untrained 1-channel 2-class U-Net (seeded: its output is fixed).

    ``card`` holds the model card's fields beyond the net's (name, preprocessing, inference...).
    """
    import json

    import torch

    from medseg.nets.unet import NetParams, build_net

    folder.mkdir(parents=True, exist_ok=True)
    params = NetParams(channels=(4, 8), strides=(2,), num_res_units=0)
    torch.manual_seed(seed)
    net = build_net(params, spatial_dims=spatial_dims, in_channels=1, out_channels=2)
    torch.save(net.state_dict(), folder / "weights.pt")
    net_fields = {"spatial_dims": spatial_dims, "in_channels": 1, "out_channels": 2}
    document = {**net_fields, "net": params.model_dump(mode="json"), **card}
    (folder / "model_card.json").write_text(json.dumps(document))
    return folder


def write_ct_export(folder: Path) -> Path:
    """An export folder of a small, untrained 3D U-Net for CT (seeded, so its output is fixed)."""
    card = {
        "name": "ct-body",
        "preprocessing": {
            "spatial_dims": 3,
            "channels": 1,
            "spacing": [4.0, 4.0, 4.0],
            "normalize": {"method": "ct", "window": [-1000.0, 1000.0]},
        },
        "inference": {"roi_size": [32, 32, 16], "overlap": 0.25, "min_object_size": 0, "fill_holes": False},
        "segments": [{"number": 1, "label": "body", "category": ["91723000", "Anatomical Structure"]}],
    }
    return write_untrained_export(folder, spatial_dims=3, seed=0, card=card)
