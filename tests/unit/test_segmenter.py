"""Segmenter on 3D images: training geometry in, the caller's geometry out (real CT volumes)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg.errors import DataError
from medseg.inference.card import CARD_VERSION, ModelCard
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


def threshold_segmenter(
    spacing: list[float] | None, roi: tuple[int, ...] = (32, 32, 16), **card: object
) -> Segmenter:
    """A ``Segmenter`` of the ``Threshold`` net; ``card`` overrides fields of its model card."""
    document = {
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 2,
        "net": {"channels": [4, 8], "strides": [2]},
        "preprocessing": {
            "spatial_dims": 3,
            "channels": 1,
            "spacing": spacing,
            "normalize": {"method": "none"},
        },
        "inference": {
            "roi_size": list(roi),
            "overlap": 0.25,
            "min_object_size": 0,
            "fill_holes": False,
            "target": "foreground",
        },
        **card,
    }
    return Segmenter(torch.jit.script(Threshold()), ModelCard.parse(document))


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


VERSION_1_CARD = {  # as medseg wrote cards before the card had a version (train stage v3)
    "task": "instance segmentation: foreground U-Net + connected components",
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 2,
    "labels": {"0": "background", "1": "foreground"},
    "net": {"channels": [4, 8], "strides": [2], "num_res_units": 0},
    "inference": {"roi_size": [32, 32, 16], "overlap": 0.25, "min_object_size": 5, "fill_holes": False},
    "intensity": {"method": "ct", "window": [-1000.0, 1000.0]},
    "preprocessing": {"orientation": "RAS", "spacing": [4.0, 4.0, 4.0]},
    "spacing": [1.5, 1.5, 3.0],
    "training": {"dataset_digest": "abc", "best_epoch": 7, "best_val_seg": 0.81, "loss": "dice_ce"},
    "postprocessing": {"chosen_by": "train params (search disabled)"},
}


def test_a_version_1_card_is_migrated_and_round_trips(tmp_path):
    card = ModelCard.parse(VERSION_1_CARD)
    assert card.card_version == CARD_VERSION == 2
    assert card.preprocessing.normalize.method == "ct" and card.preprocessing.normalize.window == (
        -1000.0,
        1000.0,
    )
    assert card.preprocessing.spacing == (4.0, 4.0, 4.0) and card.preprocessing.orientation == "RAS"
    assert (card.preprocessing.spatial_dims, card.preprocessing.channels) == (3, 1)
    assert (card.training.select_on, card.training.best_val, card.training.best_epoch) == ("seg", 0.81, 7)
    assert card.inference.roi_size == (32, 32, 16) and card.inference.target == "foreground"
    assert ModelCard.read(card.write(tmp_path / "model.json")) == card


def test_a_wrong_card_field_is_named(tmp_path):
    path = tmp_path / "model_card.json"
    path.write_text(json.dumps({**VERSION_1_CARD, "inference": {"overlap": 0.25}}))
    with pytest.raises(DataError, match=r"model_card.json: inference.roi_size: .*re-export"):
        ModelCard.read(path)


def test_windows_per_pass_do_not_change_the_logits():
    from medseg.inference.predict import SW_BATCH_SIZE, predict_logits
    from medseg.nets.unet import NetParams, build_net

    torch.manual_seed(0)
    net = build_net(
        NetParams(channels=(4, 8), strides=(2,), num_res_units=0),
        spatial_dims=3,
        in_channels=1,
        out_channels=2,
    ).eval()
    image = np.random.default_rng(0).normal(size=(1, 40, 36, 20)).astype(np.float32)
    logits = {
        count: predict_logits(
            net, image, roi_size=(16, 16, 8), overlap=0.25, device=torch.device("cpu"), sw_batch_size=count
        )
        for count in (SW_BATCH_SIZE, 4, 7)
    }
    assert SW_BATCH_SIZE == 2
    torch.testing.assert_close(logits[SW_BATCH_SIZE], logits[4], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits[7], logits[4], rtol=0, atol=1e-5)
