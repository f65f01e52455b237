"""The shipped 3D example on real MR volumes (BraTS 2015 sample): the 3D path end to end."""

from __future__ import annotations

import json

import nibabel as nib
import pytest
import yaml

from tests.conftest import PROJECT, SHARED_DATA, require
from tests.integration.helpers import run_cli

pytestmark = pytest.mark.integration

BRATS = SHARED_DATA / "nifti" / "brats2015-sample"


def test_brats_3d_example_runs_end_to_end(tmp_path):
    """The committed example, with its data path made absolute and a 120-step budget (the example's
    400-step accuracy is measured in bench: `python -m bench.run planning_3d`)."""
    require(BRATS)
    example = PROJECT / "workflows" / "examples" / "brats_unet3d.yaml"
    document = yaml.safe_load(example.read_text())
    document["inputs"]["data"] = str((example.parent / document["inputs"]["data"]).resolve())
    document["params"]["train"]["budget"] = {"steps": 120}
    document["params"]["export"] = {"mlflow_model": False, "torch_export": False}  # tested in 2D
    workflow = tmp_path / "brats_unet3d.yaml"
    workflow.write_text(yaml.safe_dump(document))
    completed = run_cli("run", str(workflow), "--workspace", str(tmp_path / "ws"), cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    cache = tmp_path / "ws" / "cache"
    index = json.loads(next(cache.glob("*/dataset/dataset.json")).read_text())
    assert index["spatial_dims"] == 3 and len(index["cases"]) == 6
    assert all(
        case["shape"] == [120, 120, 78] and case["spacing"] == [2.0, 2.0, 2.0] for case in index["cases"]
    )
    assert "brats" not in json.dumps(index)  # source folder names stay in the private map
    summary = json.loads(next(cache.glob("*/report/summary.json")).read_text())
    assert summary["n_cases"] == 1 and summary["dice"] > 0.5, summary  # bench, 400 steps: 0.717
    overlays = sorted(path.name for path in cache.glob("*/report/overlays/*.png"))
    assert {name.split("_")[0] for name in overlays} == {"best", "median", "worst"}  # axial slices
    prediction = next(cache.glob("*/report/predictions/*.nii.gz"))
    assert nib.aff2axcodes(nib.load(prediction).affine) == ("R", "A", "S")
    card = json.loads(next(cache.glob("*/export/model_card.json")).read_text())
    assert card["spatial_dims"] == 3 and card["inference"]["roi_size"] == [48, 48, 64]  # planned
