"""DET (AOGM-D), OP_CSB and object matching: known answers, and agreement with py-ctcmetrics."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import tifffile

import medseg
from bench.ctc_perturb import write_perturbed_sequence
from medseg.io.layouts import ctc_mask_name
from medseg.metrics.detection import DetectionCounts, detection_counts, match_objects
from medseg.metrics.overlap import overlap_table
from tests.conftest import CTC_FIXTURE, GOWT1, require


def _markers() -> np.ndarray:
    markers = np.zeros((20, 20), np.uint16)
    markers[1:5, 1:5] = 1  # 16 px each
    markers[1:5, 10:14] = 2
    markers[10:14, 1:5] = 3
    markers[10:14, 10:14] = 4
    return markers


def test_det_counts_each_kind_of_error():
    markers = _markers()
    prediction = np.zeros_like(markers)
    prediction[0:6, 0:15] = 7  # covers markers 1 and 2 whole: one object must be split
    prediction[10:12, 1:5] = 8  # half of marker 3 (8 of 16 px): not more than half, missed
    prediction[16:19, 16:19] = 9  # detects nothing: false positive
    # marker 4: no object at all, missed
    counts = detection_counts(markers, prediction)
    assert counts == DetectionCounts(markers=4, false_negatives=2, false_positives=2, splits=1)
    # AOGM-D = 5·1 + 10·2 + 1·2 = 27 of AOGM-D0 = 40
    assert counts.aogm_d == 27
    assert counts.det == pytest.approx(1 - 27 / 40)


def test_det_is_one_for_a_perfect_result_and_zero_when_worse_than_nothing():
    markers = _markers()
    assert detection_counts(markers, markers * 3).det == 1.0
    assert detection_counts(markers, np.zeros_like(markers)).det == 0.0
    noise = np.arange(400, dtype=np.uint16).reshape(20, 20) + 1  # 400 one-pixel objects
    assert detection_counts(markers, noise).det == 0.0  # capped at AOGM-D0
    assert math.isnan(DetectionCounts().det)


def test_object_matching_known_answer():
    reference = np.zeros((10, 10), np.int32)
    reference[0:4, 0:4] = 1  # 16 px
    reference[6:10, 6:10] = 2
    prediction = np.zeros_like(reference)
    prediction[0:4, 0:3] = 5  # IoU 12/16 = 0.75 with object 1
    prediction[6:10, 8:10] = 6  # IoU 8/16 = 0.5 with object 2
    prediction[5, 0] = 7  # spurious
    at = {match.threshold: match for match in match_objects(overlap_table(reference, prediction))}
    assert (at[0.5].true_positives, at[0.5].false_positives, at[0.5].false_negatives) == (2, 1, 0)
    assert at[0.5].precision == pytest.approx(2 / 3) and at[0.5].recall == 1.0
    assert at[0.5].f1 == pytest.approx(0.8)
    assert at[0.5].pq == pytest.approx((0.75 + 0.5) / (2 + 0.5))
    assert at[0.55].true_positives == 1 and at[0.75].true_positives == 1 and at[0.8].true_positives == 0
    assert at[0.8].f1 == 0.0


def test_java_fixture_scores_one_everywhere():
    fixture = require(CTC_FIXTURE)
    summary, _ = medseg.evaluate_masks(fixture / "res", fixture / "GT", surface=False)
    assert summary.seg == 1.0 and summary.det == 1.0 and summary.op_csb == 1.0


def _truncated_gt(gt: Path, out: Path, last_frame: int) -> Path:
    """A CTC GT folder holding frames 0..last_frame of ``gt`` (links), with its track file cut there."""
    for kind, prefix in (("TRA", "man_track"), ("SEG", "man_seg")):
        (out / kind).mkdir(parents=True)
        for path in (gt / kind).glob(f"{prefix}*.tif"):
            if int(path.stem.removeprefix(prefix)) <= last_frame:
                (out / kind / path.name).symlink_to(path.resolve())
    lines = []
    for line in (gt / "TRA" / "man_track.txt").read_text().split("\n"):
        if line.strip():
            label, begin, end, parent = (int(v) for v in line.split())
            if begin <= last_frame:
                lines.append(f"{label} {begin} {min(end, last_frame)} {parent}")
    (out / "TRA" / "man_track.txt").write_text("\n".join(lines) + "\n")
    return out


def test_det_seg_op_csb_agree_with_py_ctcmetrics_on_real_gowt1(tmp_path):
    from ctc_metrics.scripts.evaluate import evaluate_sequence

    gt = _truncated_gt(require(GOWT1) / "01_GT", tmp_path / "GT", last_frame=12)
    res = tmp_path / "RES"
    assert write_perturbed_sequence(gt, res) == 13
    summary, cases = medseg.evaluate_masks(res, gt, surface=False)
    expected = evaluate_sequence(str(res), str(gt), metrics=["DET", "SEG"], threads=1)
    assert abs(summary.det - expected["DET"]) < 1e-9
    assert abs(summary.seg - expected["SEG"]) < 1e-9
    assert abs(summary.op_csb - expected["OP_CSB"]) < 1e-9
    # Every kind of error occurred, and only SEG frames were scored for SEG.
    counts = summary.detection
    assert counts.false_negatives > 0 and counts.false_positives > 0 and counts.splits > 0
    assert summary.det < 0.95 and summary.n_det_cases == 13
    assert summary.n_cases == len(list((gt / "SEG").iterdir())) == 7
    assert sum(case.has_reference for case in cases) == 7 and len(cases) == 13


def test_sparse_gt_frames_are_flagged_and_left_out_of_pixel_measures():
    fixture = require(GOWT1) / "01_GT"
    frames = {2: False, 21: True}  # t002 outlines a few of ~25 cells; t021 outlines all
    references = [tifffile.imread(fixture / "SEG" / f"man_seg{t:03d}.tif") for t in frames]
    markers = [tifffile.imread(fixture / "TRA" / f"man_track{t:03d}.tif") for t in frames]
    summary, cases = medseg.evaluate_masks(references, references, markers=markers, surface=False)
    assert [case.fully_annotated for case in cases] == list(frames.values())
    assert math.isnan(cases[0].iou) and math.isnan(cases[0].f1) and cases[1].iou == 1.0
    assert summary.n_overlap_undefined == 1 and summary.iou == 1.0 and summary.f1 == 1.0
    # DET is valid on the sparse frame: its unannotated cells are missed by the (sparse) "prediction".
    assert cases[1].det == 1.0 and cases[0].det < 0.5


def test_markers_and_masks_must_describe_the_same_frames(tmp_path):
    fixture = require(CTC_FIXTURE)
    res = tmp_path / "res"
    res.mkdir()
    for path in (fixture / "res").glob("mask*.tif"):
        (res / path.name).symlink_to(path)
    tifffile.imwrite(res / ctc_mask_name(9), np.zeros((5, 5), np.uint16))
    with pytest.raises(
        medseg.DataError, match=r"1 result mask\(s\) have no TRA marker frame, e\.g\. mask009\.tif"
    ):
        medseg.evaluate_masks(res, fixture / "GT")


def test_without_markers_seg_and_object_measures_only(tmp_path):
    fixture = require(CTC_FIXTURE)
    gt = tmp_path / "GT"
    (gt / "SEG").mkdir(parents=True)
    for path in (fixture / "GT" / "SEG").iterdir():
        (gt / "SEG" / path.name).symlink_to(path)
    summary, _ = medseg.evaluate_masks(fixture / "res", gt, surface=False)
    metrics = summary.as_metrics("eval")
    assert metrics["eval/seg"] == 1.0 and metrics["eval/f1"] == 1.0 and metrics["eval/pq"] == 1.0
    assert "eval/det" not in metrics and summary.n_det_cases == 0
