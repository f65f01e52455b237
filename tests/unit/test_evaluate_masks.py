"""Evaluation on its own: folders (CTC RES/GT, same-named files) and arrays, with clear errors."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import tifffile

import medseg
from medseg.io.layouts import ctc_mask_name
from tests.conftest import CTC_FIXTURE, require


def test_ctc_fixture_folders_score_one_with_counts():
    fixture = require(CTC_FIXTURE)
    summary, cases = medseg.evaluate_masks(fixture / "res", fixture / "GT")
    assert [case.case_id for case in cases] == [f"t{t:03d}" for t in range(6)]
    assert summary.seg == 1.0 and summary.missed == 0 and summary.false_positives == 0
    assert summary.classes["foreground"].hd95 == 0.0


def test_same_named_files_and_known_values(tmp_path):
    (tmp_path / "pred").mkdir()
    (tmp_path / "ref").mkdir()
    ref = np.zeros((8, 8), np.uint16)
    ref[0:4, 0:4] = 1
    pred = np.zeros_like(ref)
    pred[0:4, 0:2] = 7  # half of the object: not matched (needs > 0.5)
    for folder, array in (("pred", pred), ("ref", ref)):
        tifffile.imwrite(tmp_path / folder / "a.tif", array)
    summary, cases = medseg.evaluate_masks(tmp_path / "pred", tmp_path / "ref", surface=False)
    assert cases[0].seg == 0.0 and summary.missed == 1 and summary.false_positives == 1
    assert summary.iou == pytest.approx(0.5)


def test_folder_errors_name_the_files(tmp_path):
    fixture = require(CTC_FIXTURE)
    res = tmp_path / "res"
    shutil.copytree(fixture / "res", res)
    (res / ctc_mask_name(3)).unlink()
    with pytest.raises(
        medseg.DataError, match=r"1 reference frame\(s\) have no result mask, e\.g\. mask003\.tif"
    ):
        medseg.evaluate_masks(res, fixture / "GT")
    tifffile.imwrite(res / ctc_mask_name(3), np.zeros((5, 5), np.uint16))
    with pytest.raises(
        medseg.DataError, match=r"mask003\.tif vs man_seg003\.tif: prediction shape \(5, 5\) differs"
    ):
        medseg.evaluate_masks(res, fixture / "GT")
    tifffile.imwrite(res / ctc_mask_name(3), np.full((5, 5), 0.5, np.float32))
    with pytest.raises(medseg.DataError, match=r"mask003\.tif: label image has non-integer values"):
        medseg.evaluate_masks(res, fixture / "GT")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    tifffile.imwrite(tmp_path / "a" / "x.tif", np.zeros((2, 2), np.uint16))
    tifffile.imwrite(tmp_path / "b" / "y.tif", np.zeros((2, 2), np.uint16))
    with pytest.raises(medseg.DataError, match=r"1 case\(s\) missing in 'a', e\.g\. y"):
        medseg.evaluate_masks(tmp_path / "a", tmp_path / "b")


def test_sequences_must_pair_up():
    with pytest.raises(medseg.DataError, match="1 predictions, 2 references and 2 marker images"):
        medseg.evaluate_masks([np.zeros((2, 2))], [np.zeros((2, 2))] * 2)
    summary, _ = medseg.evaluate_masks([np.ones((2, 2), int)], [np.ones((2, 2), int)], surface=False)
    assert summary.seg == 1.0
