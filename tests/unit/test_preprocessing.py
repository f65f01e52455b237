"""One preprocessing: the image ingest caches is exactly what the Segmenter feeds the net."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import medseg.inference.segmenter as segmenter_module
from medseg.inference.card import ModelCard
from medseg.inference.segmenter import Segmenter
from medseg.inference.settings import InferenceSettings
from medseg.io.dataset import read_index
from medseg.io.ingest import IngestParams, ingest_dataset
from medseg.io.preprocessing import NormalizeParams
from medseg.io.readers import read_image, write_image
from medseg.io.volume import Volume
from medseg.nets.unet import NetParams, build_net
from tests.conftest import CT_SERIES, SHARED_DATA, require

GOWT1 = SHARED_DATA / "ctc" / "Fluo-N2DH-GOWT1"
CT_NIFTI = SHARED_DATA / "dicom" / "totalsegmentator-example" / "example_ct_sm.nii.gz"


def _case_folder(tmp_path: Path, image: Path) -> Path:
    """A ``cases`` layout with one case: ``image`` and a body mask (> -500 HU) on its grid."""
    case = tmp_path / "source" / "case"
    case.mkdir(parents=True)
    (case / ("image" if image.is_dir() else "image.nii.gz")).symlink_to(image)
    volume = read_image(image)
    write_image(
        Volume((volume.array > -500).astype(np.int32), volume.affine, kind="label"), case / "label.nii.gz"
    )
    return tmp_path / "source"


def _ctc_frame(tmp_path: Path) -> Path:
    """A CTC layout holding GOWT1 frame 2 of sequence 01 and its reference mask only."""
    gowt1 = require(GOWT1)
    (tmp_path / "gowt1" / "01").mkdir(parents=True)
    (tmp_path / "gowt1" / "01_GT" / "SEG").mkdir(parents=True)
    (tmp_path / "gowt1" / "01" / "t002.tif").symlink_to(gowt1 / "01" / "t002.tif")
    (tmp_path / "gowt1" / "01_GT" / "SEG" / "man_seg002.tif").symlink_to(
        gowt1 / "01_GT" / "SEG" / "man_seg002.tif"
    )
    return tmp_path / "gowt1"


SOURCES = {
    "2d-tiff": (
        {"layout": "ctc", "normalize": {"method": "percentile", "lower": 1.0, "upper": 99.8}},
        _ctc_frame,
        lambda source: source / "01" / "t002.tif",
    ),
    "nifti": (
        {
            "layout": "cases",
            "spacing": (4.0, 4.0, 5.0),
            "normalize": {"method": "ct", "window": (-200.0, 300.0)},
        },
        lambda tmp: _case_folder(tmp, require(CT_NIFTI)),
        lambda source: source / "case" / "image.nii.gz",
    ),
    "dicom-ct": (
        {"layout": "cases", "spacing": (2.0, 2.0, 3.0), "normalize": {"method": "zscore"}},
        lambda tmp: _case_folder(tmp, require(CT_SERIES)),
        lambda source: source / "case" / "image",
    ),
    "dicom-ct-auto": (
        {"layout": "cases", "spacing": (2.0, 2.0, 3.0), "normalize": {"method": "auto"}},
        lambda tmp: _case_folder(tmp, require(CT_SERIES)),
        lambda source: source / "case" / "image",
    ),
}


def test_auto_normalisation_is_decided_per_modality(tmp_path):
    def decided(source: Path, layout: str, name: str) -> NormalizeParams:
        params = IngestParams.model_validate(
            {
                "layout": layout,
                "train_on": "all",
                "normalize": {"method": "auto"},
                "split": {"val_fraction": 0.0, "test_fraction": 0.0},
            }
        )
        index, _ = ingest_dataset(source, params, tmp_path / name, seed=0, progress=lambda *args: None)
        return index.preprocessing.normalize

    assert decided(_ctc_frame(tmp_path), "ctc", "cells").method == "percentile"
    # a 3D NIfTI says no modality: per-image z-score
    assert decided(_case_folder(tmp_path / "nifti", require(CT_NIFTI)), "cases", "nifti").method == "zscore"
    ct = decided(_case_folder(tmp_path / "ct", require(CT_SERIES)), "cases", "ct")
    raw = read_image(require(CT_SERIES)).array
    body = raw[raw > -500]  # the label of _case_folder: nnU-Net's statistics of labelled voxels
    assert ct.method == "ct_zscore"
    assert ct.window[0] == pytest.approx(np.percentile(body, 0.5), abs=15)
    assert ct.window[1] == pytest.approx(np.percentile(body, 99.5), abs=40)
    assert ct.mean == pytest.approx(body.mean(), rel=0.05) and ct.std == pytest.approx(body.std(), rel=0.05)


@pytest.mark.parametrize("kind", list(SOURCES))
def test_ingest_cache_equals_what_the_segmenter_feeds_the_net(kind, tmp_path, monkeypatch):
    overrides, make_source, image_of = SOURCES[kind]
    source = make_source(tmp_path)
    params = IngestParams.model_validate(
        {"train_on": "all", "split": {"val_fraction": 0.0, "test_fraction": 0.0}, **overrides}
    )
    out = tmp_path / "dataset"
    out.mkdir()
    index, _ = ingest_dataset(source, params, out, seed=0, progress=lambda *args: None)
    (record,) = index.cases
    cached = read_image(out / record.image)

    preprocessing = read_index(out).preprocessing
    dims = preprocessing.spatial_dims
    net_params = NetParams(channels=(4, 8), strides=(2,), num_res_units=0)
    card = ModelCard(
        spatial_dims=dims,
        in_channels=1,
        out_channels=2,
        net=net_params,
        preprocessing=preprocessing,
        inference=InferenceSettings(roi_size=(16,) * dims, overlap=0.0, min_object_size=0, fill_holes=False),
    )
    fed = []
    original = segmenter_module.segment_instances

    def spy(module, data, settings, **kwargs):
        fed.append(np.array(data))
        return original(module, data, settings, **kwargs)

    monkeypatch.setattr(segmenter_module, "segment_instances", spy)
    net = build_net(net_params, spatial_dims=dims, in_channels=1, out_channels=2)
    labels = Segmenter(net, card).predict(image_of(source))

    assert fed[0].dtype == cached.array.dtype == np.float32
    assert fed[0].shape == cached.array.shape
    np.testing.assert_array_equal(fed[0], cached.array)
    source_image = read_image(image_of(source))
    assert labels.spatial_shape == source_image.spatial_shape  # and the labels come back onto the source grid
    if dims == 3:
        assert cached.spacing == pytest.approx(preprocessing.spacing)
        assert cached.spatial_shape != source_image.spatial_shape
