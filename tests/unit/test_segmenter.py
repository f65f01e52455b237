"""Segmenter on 3D images: training geometry in, the caller's geometry out (real CT volumes)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg.inference.segmenter import Segmenter
from medseg.io.geometry import to_ras
from medseg.io.readers import read_image
from medseg.io.volume import Volume
from tests.conftest import SHARED_DATA, require

CT = SHARED_DATA / "dicom" / "totalsegmentator-example"


class Threshold(torch.nn.Module):
    """Logits ``(N, 2, *S)``: voxels above -500 HU (body, not air) are foreground; a known answer."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.cat([-(image + 500), image + 500], dim=1)


def threshold_segmenter(spacing: list[float] | None) -> Segmenter:
    card = {
        "spatial_dims": 3,
        "in_channels": 1,
        "intensity": {"method": "none"},
        "preprocessing": {"orientation": "RAS", "spacing": spacing},
        "inference": {
            "roi_size": [32, 32, 16],
            "overlap": 0.25,
            "min_object_size": 0,
            "fill_holes": False,
            "target": "foreground",
        },
    }
    return Segmenter(torch.jit.script(Threshold()), card)


def flipped(volume: Volume) -> Volume:
    """The same image stored LAS-ward: first axis reversed, affine adjusted (same world)."""
    array = volume.array[:, ::-1].copy()
    affine = volume.affine @ np.array(
        [[-1, 0, 0, volume.spatial_shape[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float
    )
    return Volume(array, affine, kind=volume.kind)


@pytest.mark.parametrize("spacing", [None, [4.0, 4.0, 4.0]])
def test_3d_prediction_comes_back_on_the_input_grid(spacing):
    require(CT)
    source = read_image(CT / "example_ct_sm.nii.gz")  # 122×101×30 at 3 mm, RAS
    segmenter = threshold_segmenter(spacing)
    results = []
    for image in (source, flipped(source)):
        labels = segmenter.predict(image)
        assert labels.spatial_shape == image.spatial_shape
        assert np.array_equal(labels.affine, image.affine)
        agreement = float(((labels.array[0] > 0) == (image.array[0] > -500)).mean())
        # At the training spacing the answer is exact; through 4 mm and back, edges move a voxel.
        assert agreement == 1.0 if spacing is None else agreement > 0.9
        results.append(labels)
    # Stored either way round, the image gets the same labels at the same world positions.
    assert np.array_equal(flipped(results[0]).array, results[1].array)


def test_dicom_series_prediction_matches_its_nifti_twin_in_world_space():
    require(CT)
    dicom = read_image(CT / "example_ct_dicom")  # RAS+ from the series
    segmenter = threshold_segmenter(None)
    labels = segmenter.predict(dicom)
    # The same CT, stored the other way round, must give the same voxels once both are in RAS.
    twin = Volume(np.ascontiguousarray(dicom.array[:, ::-1, ::-1]), dicom.affine @ np.diag([-1, -1, 1, 1.0]))
    twin.affine[:3, 3] = (
        dicom.affine[:3, :3] @ (np.array(dicom.spatial_shape) - 1) * [1, 1, 0] + dicom.affine[:3, 3]
    )
    twin_labels = segmenter.predict(twin)
    back, affine = to_ras(twin_labels.array[0], twin_labels.affine)
    assert np.allclose(affine, labels.affine) and np.array_equal(back, labels.array[0])
    assert nib.aff2axcodes(labels.affine) == ("R", "A", "S")


@pytest.mark.parametrize("classes", [2, 3])
def test_class_map_equals_argmax_in_slabs(classes):
    from medseg.inference.predict import class_map

    logits = torch.randn(classes, 7, 5, 3, generator=torch.Generator().manual_seed(classes))
    logits[:, 0, 0, 0] = 1.0  # a tie: argmax takes the first class, so must class_map
    expected = logits.argmax(dim=0).numpy()
    for slab in (1, 15, 10_000):  # one row per slab, several rows, the whole volume
        result = class_map(logits, voxels_per_slab=slab)
        assert result.dtype == np.uint8 and np.array_equal(result, expected)
