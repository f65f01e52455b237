import math

import numpy as np
import pytest

from medseg.inference.predict import drop_small
from medseg.io.readers import read_image
from medseg.metrics import evaluate_case, foreground_from_table, overlap_table, seg_score, summarize
from medseg.metrics.overlap import keep_objects, object_overlaps
from medseg.metrics.surface import surface_distances
from tests.conftest import CTC_FIXTURE, require


def test_overlap_table_counts_every_pair():
    ref = np.array([[0, 1, 1], [2, 2, 0]])
    pred = np.array([[5, 5, 0], [5, 7, 7]])
    table = overlap_table(ref, pred)
    # rows: ref 0,1,2 ; cols: pred 0,5,7
    assert table.tolist() == [[0, 1, 1], [1, 1, 0], [0, 1, 1]]
    assert table.sum() == ref.size


def test_object_overlaps_keep_a_column_per_label_and_drop_objects_as_a_size_filter_would():
    ref = np.array([[0, 1, 1], [2, 2, 0]])
    pred = np.array([[1, 1, 0], [1, 3, 3]])  # label 2 absent
    table = object_overlaps(ref, pred, 3)
    assert table.tolist() == [[0, 1, 0, 1], [1, 1, 0, 0], [0, 1, 0, 1]]
    assert np.array_equal(keep_objects(table, np.ones(4, bool)), overlap_table(ref, pred))
    # Dropping label 1 makes its voxels background and label 3 the only object.
    assert keep_objects(table, np.array([False, False, True, True])).tolist() == [[1, 1], [2, 0], [1, 1]]


@pytest.mark.parametrize("seed", range(5))
def test_a_size_filters_table_follows_from_the_whole_predictions(seed):
    rng = np.random.default_rng(seed)
    ref = rng.integers(0, 6, (24, 24)) * (rng.random((24, 24)) < 0.6)
    pred = rng.integers(0, 9, (24, 24)) * (rng.random((24, 24)) < 0.5)
    pred[pred == 4] = 0  # an absent label
    count = int(pred.max())
    sizes = np.bincount(pred.ravel(), minlength=count + 1)
    table = object_overlaps(ref, pred, count)
    for min_size in sorted(set(sizes.tolist())):
        kept = drop_small(pred, count, min_size)
        assert np.array_equal(keep_objects(table, sizes >= max(min_size, 1)), overlap_table(ref, kept))


def test_perfect_match_with_other_label_numbers_scores_one():
    ref = np.zeros((10, 10), int)
    ref[1:4, 1:4], ref[6:9, 6:9] = 1, 2
    pred = np.where(ref == 1, 9, np.where(ref == 2, 4, 0))
    score = seg_score(ref, pred)
    assert score.seg == 1.0 and score.matched == 2 and score.false_positives == 0


def test_reference_split_by_two_predictions_matches_only_the_majority_part():
    ref = np.zeros((1, 10), int)
    ref[0, 0:10] = 1  # |R| = 10
    pred = np.zeros((1, 10), int)
    pred[0, 0:6], pred[0, 6:10] = 1, 2  # 6 > 5 matches; 4 does not
    score = seg_score(ref, pred)
    assert score.jaccard.tolist() == [pytest.approx(6 / 10)]
    assert score.matched == 1 and score.false_positives == 1


def test_reference_split_in_half_is_unmatched():
    ref = np.ones((1, 10), int)
    pred = np.zeros((1, 10), int)
    pred[0, :5], pred[0, 5:] = 1, 2  # exactly half: |R∩S| > 0.5|R| fails
    assert seg_score(ref, pred).jaccard.tolist() == [0.0]


def test_prediction_covering_two_references_matches_both():
    ref = np.zeros((1, 12), int)
    ref[0, 0:4], ref[0, 6:10] = 1, 2
    pred = np.zeros((1, 12), int)
    pred[0, 0:12] = 3  # covers both fully: each R matched, J = 4/12
    score = seg_score(ref, pred)
    assert score.jaccard.tolist() == [pytest.approx(4 / 12), pytest.approx(4 / 12)]
    assert score.false_positives == 0


def test_empty_frames():
    empty = np.zeros((5, 5), int)
    assert math.isnan(seg_score(empty, empty).seg)
    one = empty.copy()
    one[1:3, 1:3] = 1
    missed = seg_score(one, empty)
    assert missed.jaccard.tolist() == [0.0] and missed.matched == 0
    fp_only = seg_score(empty, one)
    assert fp_only.n_reference == 0 and fp_only.false_positives == 1


def test_seg_3d_known_answer():
    ref = np.zeros((4, 4, 4), int)
    ref[0:2, 0:2, 0:2] = 1  # 8 voxels
    pred = np.zeros_like(ref)
    pred[0:2, 0:2, 0:3] = 1  # 12 voxels, overlap 8
    assert seg_score(ref, pred).seg == pytest.approx(8 / 12)


def test_foreground_iou_dice_known_answer_and_nan_when_empty():
    ref = np.array([1, 1, 1, 0, 0])
    pred = np.array([0, 1, 1, 1, 0])
    overlap = foreground_from_table(overlap_table(ref, pred))
    assert (overlap.tp, overlap.fp, overlap.fn) == (2, 1, 1)
    assert overlap.iou == pytest.approx(0.5) and overlap.dice == pytest.approx(4 / 6)
    both_empty = foreground_from_table(overlap_table(np.zeros(3, int), np.zeros(3, int)))
    assert math.isnan(both_empty.iou) and math.isnan(both_empty.dice)


def test_summary_pools_seg_over_objects_and_skips_nan_overlap():
    ref_a = np.array([[1, 1, 0, 2, 2]])
    pred_a = np.array([[1, 1, 0, 0, 0]])  # J = 1 and 0
    ref_b = np.array([[3, 3, 3, 0, 0]])
    pred_b = np.array([[3, 3, 0, 0, 0]])  # J = 2/3
    cases = [
        evaluate_case("a", ref_a, pred_a),
        evaluate_case("b", ref_b, pred_b, fully_annotated=False),
    ]
    summary = summarize(cases)
    assert summary.seg == pytest.approx((1 + 0 + 2 / 3) / 3)
    assert summary.n_reference == 3 and summary.matched == 2
    assert summary.iou == pytest.approx(0.5)  # case b excluded: not fully annotated
    assert summary.n_overlap_undefined == 1


def test_ctc_organisers_fixture_scores_one():
    fixture = require(CTC_FIXTURE)
    cases = []
    for gt in sorted((fixture / "GT" / "SEG").glob("man_seg*.tif")):
        frame = gt.name.removeprefix("man_seg")
        ref = read_image(gt, kind="label").array[0]
        res = read_image(fixture / "res" / f"mask{frame}", kind="label").array[0]
        cases.append(evaluate_case(frame, ref, res))
    summary = summarize(cases)
    assert len(cases) == 6 and summary.n_reference > 0
    assert summary.seg == pytest.approx(1.0, abs=1e-12)


def test_per_class_values_in_rows_and_summary():
    ref = np.array([[1, 1, 0, 2]])
    pred = np.array([[4, 4, 4, 0]])
    case = evaluate_case("a", ref, pred)
    row = case.as_row()
    assert row["missed"] == 1 and row["iou_foreground"] == pytest.approx(2 / 4)
    assert row["dice_foreground"] == pytest.approx(4 / 6)
    metrics = summarize([case]).as_metrics("eval")
    assert metrics["eval/iou_foreground"] == pytest.approx(0.5) and metrics["eval/missed"] == 1.0


def test_surface_distances_in_mm_known_answer():
    ref = np.zeros((40, 40), bool)
    ref[10:20, 10:20] = True
    shifted = np.roll(ref, 3, axis=0)
    hd95, assd = surface_distances(ref, ref, (2.0, 1.0))
    assert hd95 == 0.0 and assd == 0.0
    hd95, assd = surface_distances(ref, shifted, (2.0, 1.0))
    assert hd95 == pytest.approx(6.0)  # 3 rows of 2 mm
    assert 0 < assd < 6.0
    assert all(math.isnan(v) for v in surface_distances(ref, np.zeros_like(ref), None))
