"""Post-processing chosen on validation data: the candidate that maximises the task's measure wins."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from medseg.inference import tuning
from medseg.inference.predict import (
    boundary_seeds,
    classes_and_seeds,
    final_objects,
    instances_from_classes,
    layered_seeds,
    object_class_map,
    shift_edges,
    split_touching,
)
from medseg.inference.settings import InferenceSettings
from medseg.inference.tuning import (
    ValidationCase,
    candidate_edge_shifts,
    candidate_foreground_thresholds,
    candidate_sizes,
    candidate_split_levels,
    choose_postprocessing,
    seed_split_sizes,
    selection_measure,
    training_object_sizes,
)
from medseg.metrics.evaluate import evaluate_case


def _cells_with_fragments() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference (4 cells of 100 px), markers, and a class map with the cells plus 12 fragments."""
    reference = np.zeros((64, 64), np.int32)
    for number, (y, x) in enumerate([(5, 5), (5, 40), (40, 5), (40, 40)], start=1):
        reference[y : y + 10, x : x + 10] = number
    markers = np.zeros_like(reference)
    for number in range(1, 5):
        ys, xs = np.nonzero(reference == number)
        markers[ys.mean().astype(int), xs.mean().astype(int)] = number
    classes = (reference > 0).astype(np.uint8)
    for index in range(12):  # 2x2 fragments between the cells
        y, x = 20 + 3 * (index // 4), 20 + 4 * (index % 4)
        classes[y : y + 2, x : x + 2] = 1
    return reference, markers, classes


SETTINGS = InferenceSettings(roi_size=(64, 64), overlap=0.25, min_object_size=0, fill_holes=False)


def test_fragments_are_removed_by_the_size_chosen_from_the_training_objects():
    reference, markers, classes = _cells_with_fragments()
    case = ValidationCase("case_0001", classes, None, reference, markers, fully_annotated=True)
    sizes = training_object_sizes([reference], instance_labels=True)
    assert sizes.tolist() == [100, 100, 100, 100]
    assert candidate_sizes(sizes, 0) == [0, 2, 5, 10, 20, 30, 50]
    choice = choose_postprocessing([case], SETTINGS, object_sizes=sizes, instance_labels=True)
    assert choice.measure == "op_csb"
    # Baseline (no size filter): 4 cells + 12 false positives → DET = 1 − 12/40.
    assert choice.baseline.det == pytest.approx(0.7) and choice.baseline.objects_per_case == 16
    assert choice.chosen.det == 1.0 and choice.chosen.seg == 1.0 and choice.chosen.objects_per_case == 4
    assert choice.settings.min_object_size == 5  # the smallest size that drops the 4-px fragments
    labels = instances_from_classes(classes, choice.settings)
    assert labels.max() == 4


def test_current_settings_win_ties_and_keep_largest_is_tried_for_semantic_labels():
    reference = np.zeros((32, 32), np.int32)
    reference[4:20, 4:20] = 1
    classes = (reference > 0).astype(np.uint8)
    classes[22:32, 17:32] = 1  # a spurious blob of 150 px: larger than any candidate size filter
    case = ValidationCase("case_0001", classes, None, reference, None, fully_annotated=True)
    assert selection_measure([case], instance_labels=False) == "dice"
    assert selection_measure([case], instance_labels=True) == "f1"
    choice = choose_postprocessing([case], SETTINGS, object_sizes=np.array([256]), instance_labels=False)
    assert choice.chosen.dice == 1.0 and choice.baseline.dice < 1.0
    assert max(candidate_sizes(np.array([256]), 0)) == 128  # no size filter removes the blob
    assert choice.settings.keep_largest and choice.settings.min_object_size == 0
    perfect = choose_postprocessing(
        [ValidationCase("c", (reference > 0).astype(np.uint8), None, reference, None, True)],
        SETTINGS,
        object_sizes=np.array([256]),
        instance_labels=False,
    )
    assert perfect.settings == SETTINGS  # nothing beats the baseline: it is kept


def test_seed_threshold_splits_touching_cells_of_a_boundary_map():
    reference = np.zeros((20, 40), np.int32)
    reference[5:15, 5:20] = 1
    reference[5:15, 20:35] = 2
    classes = (reference > 0).astype(np.uint8)  # the argmax saw no border between the cells
    interior = np.where(reference > 0, 0.6, 0.0).astype(np.float32)
    interior[:, 18:22] = 0.4  # but the interior probability dips along the contact
    case = ValidationCase("c", classes, interior, reference, None, True)
    boundary = InferenceSettings((20, 40), 0.25, 0, False, target="boundary")
    choice = choose_postprocessing([case], boundary, object_sizes=np.array([150, 150]), instance_labels=True)
    assert choice.baseline.f1 == pytest.approx(2 / 3) and choice.chosen.f1 == 1.0  # merged: IoU 0.5 with one
    assert choice.settings.seed_threshold == 0.5


def _touching_cells_drawn_faintly() -> tuple[np.ndarray, np.ndarray]:
    """Two 10×15 cells side by side and a 10×30 one below, and an interior probability map.

    The net is sure of each cell's core (0.99) but not of the border between the two touching
    cells (0.85, over every seed threshold tried); the long cell has two 2×2 peaks (0.99) in
    a 0.85 plateau: noise within one cell.
    """
    reference = np.zeros((40, 40), np.int32)
    reference[5:15, 5:20], reference[5:15, 20:35], reference[25:35, 5:35] = 1, 2, 3
    interior = np.where(reference > 0, 0.85, 0.0).astype(np.float32)
    interior[6:14, 6:18] = interior[6:14, 22:34] = 0.99
    interior[29:31, 10:12] = interior[29:31, 28:30] = 0.99
    return reference, interior


def test_layered_seeds_divide_a_seed_whose_higher_cores_are_object_sized_and_ignore_small_peaks():
    reference, interior = _touching_cells_drawn_faintly()
    foreground = reference > 0
    assert layered_seeds(interior, foreground, 0.8, 1_000).max() == 2  # no piece that large: 2 seeds
    seeds = layered_seeds(interior, foreground, 0.8, 50)  # cores of 96 voxels, peaks of 4
    assert sorted(np.unique(seeds).tolist()) == [0, 2, 3, 4]  # seed 1 (the top one) became 3 and 4
    assert np.array_equal(seeds > 0, interior >= 0.8)  # every voxel of the divided seed kept
    for number in (1, 2):  # each piece takes its own cell's half of the contact
        assert np.unique(seeds[reference == number]).size == 1
    assert np.unique(seeds[reference == 3]).tolist() == [2]  # the peaks never split the long cell


def test_touching_cells_drawn_faintly_are_split_by_layered_seeds_in_tuning_and_inference():
    reference, interior = _touching_cells_drawn_faintly()
    classes = (reference > 0).astype(np.uint8)  # the argmax drew no border anywhere
    case = ValidationCase("c", classes, interior, reference, None, True)
    boundary = InferenceSettings((40, 40), 0.25, 0, False, target="boundary", seed_threshold=0.8)
    plain = [instances_from_classes(classes, replace(boundary, seed_threshold=t)) for t in (0.35, 0.8)]
    assert [labels.max() for labels in plain] == [2, 2]  # no threshold parts the touching cells
    small = np.array([150, 150, 300])  # the cores (96 voxels) are over 40 % of the median object
    assert seed_split_sizes(small) == [60, 45, 30]
    choice = choose_postprocessing([case], boundary, object_sizes=small, instance_labels=True)
    assert choice.settings.seed_split_size == 60 and choice.baseline.f1 == 1.0
    large = np.array([300, 300, 300])  # 40 % is 120 voxels: only the last pass's 30 % (90) splits
    choice = choose_postprocessing([case], boundary, object_sizes=large, instance_labels=True)
    assert choice.baseline.f1 == pytest.approx(0.8) and choice.baseline.seed_split_size == 120
    assert choice.settings.seed_split_size == 90 and choice.chosen.f1 == 1.0
    assert choice.chosen.as_row()["seed_split_size"] == 90
    labels = instances_from_classes(
        classes, choice.settings, seeds=boundary_seeds(interior, classes, choice.settings)
    )
    assert labels.max() == 3 and all(np.unique(labels[reference == n]).size == 1 for n in (1, 2, 3))
    # Inference from the net's logits (background, interior, border) forms the same objects.
    background = np.where(reference > 0, 0.001, 0.998)
    inside = np.where(reference > 0, 0.998 * interior, 0.001)
    logits = torch.from_numpy(np.log(np.stack([background, inside, 1 - background - inside]))).float()
    net_classes, net_seeds = classes_and_seeds(logits, choice.settings)
    assert np.array_equal(instances_from_classes(net_classes, choice.settings, seeds=net_seeds), labels)


def test_each_labelling_forms_its_seeds_once_for_both_fills_and_every_edge_shift(monkeypatch):
    import medseg.inference.predict as predict

    formed: list[tuple[float, int]] = []

    def spy(interior: np.ndarray, foreground: np.ndarray, threshold: float, min_size: int) -> np.ndarray:
        formed.append((threshold, min_size))
        return layered_seeds(interior, foreground, threshold, min_size)

    monkeypatch.setattr(predict, "layered_seeds", spy)
    reference, interior = _touching_cells_drawn_faintly()
    case = ValidationCase("c", (reference > 0).astype(np.uint8), interior, reference, None, True)
    boundary = InferenceSettings((40, 40), 0.25, 0, False, target="boundary", seed_threshold=0.8)
    choice = choose_postprocessing([case], boundary, object_sizes=np.array([300] * 3), instance_labels=True)
    assert choice.settings.seed_split_size == 90  # the choice the test above asserts, with the spy
    fills, shifts = {c.fill_holes for c in choice.candidates}, {c.edge_shift for c in choice.candidates}
    assert fills == {False, True} and shifts == {-2, -1, 0, 1}
    # The grid's 4 seed thresholds once each (not once per fill), one labelling for the three
    # other edge shifts, then 90 and 60 voxels: the old code formed them 13 times.
    grid = [(t, 120) for t in (0.8, 0.35, 0.5, 0.65)]
    assert formed == [*grid, (choice.chosen.seed_threshold, 120), (0.8, 90), (0.8, 60)]


def test_fragments_where_the_label_is_unknown_do_not_steer_the_choice():
    reference, _, classes = _cells_with_fragments()
    sizes = training_object_sizes([reference], instance_labels=True)
    unknown = np.zeros(reference.shape, bool)
    unknown[18:30, 18:36] = True  # the fragments lie where the annotator drew nothing (ignore label)
    plain = ValidationCase("case_0001", classes, None, reference, None, fully_annotated=True)
    ignored = ValidationCase("case_0001", classes, None, reference, None, True, ignore=unknown)
    choice = choose_postprocessing([plain], SETTINGS, object_sizes=sizes, instance_labels=True)
    assert choice.settings.min_object_size == 5
    choice = choose_postprocessing([ignored], SETTINGS, object_sizes=sizes, instance_labels=True)
    assert choice.baseline.f1 == 1.0 and choice.baseline.objects_per_case == 4  # as evaluation scores it
    assert choice.settings.min_object_size == 0  # nothing to remove: the trained settings stay


@pytest.mark.parametrize("keep_largest", [False, True])
def test_unshifted_candidates_are_scored_from_one_table_as_evaluation_scores_them(keep_largest):
    reference, markers, classes = _cells_with_fragments()
    unknown = np.zeros(reference.shape, bool)
    unknown[18:24, 18:36] = True  # some fragments, not all, lie where the label is unknown,
    unknown[40:44, 40:50] = True  # and the top of a cell
    labels = instances_from_classes(classes, SETTINGS)
    for case in (
        ValidationCase("t001", classes, None, reference, markers, fully_annotated=True),
        ValidationCase("t002", classes, None, reference, None, fully_annotated=False, ignore=unknown),
    ):
        tables = tuning._Overlaps.of(case, labels)
        for size in (0, 4, 5, 100, 101):
            objects = final_objects(labels, min_size=size, keep_largest=keep_largest, edge_shift=0)
            expected = evaluate_case(
                case.case_id,
                reference,
                objects,
                markers=case.markers,
                fully_annotated=case.fully_annotated,
                ignore=case.ignore,
            )
            assert repr(tables.metrics(case, size, keep_largest)) == repr(expected)


def test_the_size_filter_relabels_images_only_for_shifted_candidates(monkeypatch):
    reference, markers, classes = _cells_with_fragments()
    sizes = training_object_sizes([reference], instance_labels=True)
    case = ValidationCase("t001", classes, None, reference, markers, fully_annotated=True)
    filtered = []
    original = tuning.final_objects

    def spy(labels, *, min_size, keep_largest, edge_shift):
        filtered.append(edge_shift)
        return original(labels, min_size=min_size, keep_largest=keep_largest, edge_shift=edge_shift)

    monkeypatch.setattr(tuning, "final_objects", spy)
    choice = choose_postprocessing([case], SETTINGS, object_sizes=sizes, instance_labels=True)
    assert choice.settings.min_object_size == 5 and choice.chosen.det == 1.0
    assert 0 not in filtered and sorted(set(filtered)) == [-2, -1, 1]


def _discs(centres: list[tuple[int, int]], radius: float, shape=(40, 64)) -> np.ndarray:
    """Instance labels of discs (numbered in order; a later disc overwrites an earlier one)."""
    ys, xs = np.indices(shape)
    labels = np.zeros(shape, np.int32)
    for number, (y, x) in enumerate(centres, start=1):
        labels[(ys - y) ** 2 + (xs - x) ** 2 <= radius**2] = number
    return labels


def test_split_touching_divides_two_merged_discs_and_leaves_convex_and_long_objects_whole():
    reference = _discs([(20, 20), (20, 36)], 9)  # two discs of radius 9 overlapping by 2 px
    merged = (reference > 0).astype(np.int32)
    split = split_touching(merged, 0.6)
    assert split.max() == 2
    for number in (1, 2):  # each half is one disc, but for its share of the lens where they overlap
        overlap = np.bincount(split[reference == number])
        assert overlap.argmax() > 0 and overlap.max() >= 0.95 * (reference == number).sum()
    assert split_touching(merged, 0.3).max() == 1  # the waist (≈ 4 px deep) is above 0.3 × 9
    bar = np.zeros((40, 64), np.int32)
    bar[15:25, 5:60] = 7  # an elongated object: its distance map is one ridge
    assert np.array_equal(split_touching(bar, 0.6), (bar > 0).astype(np.int32))
    disc = _discs([(20, 30)], 12)
    assert np.array_equal(split_touching(disc, 0.7), disc)


def test_split_touching_leaves_a_long_cell_with_a_wavy_ridge_whole():
    # A capsule whose width varies gently (±10 %): its ridge has local maxima 20 px apart, which
    # is where splitting at every distance-map peak cut real cells in two; its core stays one.
    ys, xs = np.indices((40, 100))
    half_width = 9 + 0.9 * np.sin(xs / 100 * 4 * np.pi)
    capsule = ((np.abs(ys - 20) <= half_width) & (xs >= 10) & (xs < 90)).astype(np.int32)
    assert np.array_equal(split_touching(capsule, 0.6), capsule)
    assert np.array_equal(split_touching(capsule, 0.7), capsule)


def test_split_touching_skips_fragments_and_numbers_objects_densely():
    labels = np.zeros((30, 30), np.int32)
    labels[2:4, 2:4] = 5  # a 2×2 fragment: skipped, relabelled
    labels[10:20, 10:20] = 9
    split = split_touching(labels, 0.6)
    assert sorted(np.unique(split).tolist()) == [0, 1, 2]
    assert (split[2:4, 2:4] == 1).all() and (split[10:20, 10:20] == 2).all()


def test_split_level_is_chosen_when_validation_cells_came_out_merged():
    reference = _discs([(20, 14), (20, 30), (20, 50)], 9)  # two touching cells and one apart
    markers = np.zeros_like(reference)
    for number, (y, x) in enumerate([(20, 14), (20, 30), (20, 50)], start=1):
        markers[y, x] = number
    classes = (reference > 0).astype(np.uint8)  # the net saw no gap between the touching pair
    case = ValidationCase("c", classes, None, reference, markers, True)
    sizes = training_object_sizes([reference], instance_labels=True)
    assert candidate_split_levels(None) == [None, 0.6, 0.7]
    assert candidate_split_levels(0.7) == [0.7, None, 0.6]  # the current value is the baseline
    choice = choose_postprocessing([case], SETTINGS, object_sizes=sizes, instance_labels=True)
    assert choice.baseline.objects_per_case == 2 and choice.baseline.seg < 0.7  # one cell lost
    assert choice.chosen.objects_per_case == 3 and choice.chosen.seg > 0.95 and choice.chosen.det == 1.0
    assert choice.settings.split_level == 0.6  # the first of the levels that splits (ties keep the first)
    assert instances_from_classes(classes, choice.settings).max() == 3  # inference splits the same way
    assert choice.chosen.as_row()["split_level"] == 0.6 and choice.baseline.as_row()["split_level"] == "off"


def test_foreground_threshold_is_chosen_when_validation_cells_came_out_too_small():
    reference = _discs([(20, 14), (20, 46)], 9)
    markers = np.zeros_like(reference)
    markers[20, 14], markers[20, 46] = 1, 2
    yy, xx = np.mgrid[:40, :64]
    depth = np.minimum(np.hypot(yy - 20, xx - 14), np.hypot(yy - 20, xx - 46))
    foreground = (1 / (1 + np.exp(depth - 7.5))).astype(np.float32)  # 0.5 at radius 7.5: cells too small
    logits = torch.from_numpy(np.stack([np.zeros_like(foreground), np.log(foreground / (1 - foreground))]))
    classes = object_class_map(logits) * (foreground >= 0.5)
    case = ValidationCase(
        "c",
        classes,
        None,
        reference,
        markers,
        True,
        foreground=foreground,
        object_classes=object_class_map(logits),
    )
    sizes = training_object_sizes([reference], instance_labels=True)
    assert candidate_foreground_thresholds(None) == [None, 0.3, 0.4, 0.5, 0.6, 0.7]
    choice = choose_postprocessing([case], SETTINGS, object_sizes=sizes, instance_labels=True)
    assert choice.baseline.seg == pytest.approx(177 / 253, abs=0.01)  # (7.5 / 9)² of each disc
    assert choice.settings.foreground_threshold == 0.3  # the edge moved out to radius 8.3
    assert choice.chosen.seg > 0.8 and choice.chosen.det == 1.0
    assert choice.chosen.as_row()["foreground_threshold"] == 0.3
    assert choice.baseline.as_row()["foreground_threshold"] == "argmax"
    # Inference applies it to the logits: the chosen objects, not the argmax's.
    grown, _ = classes_and_seeds(logits, choice.settings)
    assert int(grown.sum()) > int(classes.sum()) * 1.15
    assert instances_from_classes(grown, choice.settings).max() == 2


def test_shift_edges_moves_each_surface_by_whole_voxels_and_never_merges_objects():
    labels = np.zeros((9, 12), np.int32)
    labels[2:7, 1:6], labels[2:7, 6:11] = 1, 2  # two 5×5 squares touching along a column
    shrunk = shift_edges(labels, -1)
    assert (shrunk == 1).sum() == 3 * 3 and (shrunk == 2).sum() == 3 * 3  # each lost its 1-voxel rim
    assert not shrunk[:, 5:7].any()  # the contact columns went to neither
    grown = shift_edges(labels, 1)
    assert (grown == 1).sum() == 25 + 5 + 5 + 5  # up, down and left by one voxel (no corners)
    assert (grown[:, :6] == 1).sum() == (grown == 1).sum()  # nothing taken from its neighbour
    border = np.zeros((5, 5), np.int32)
    border[:, :3] = 7  # an object cut by the image edge keeps that side
    assert shift_edges(border, -1)[:, 0].tolist() == [7, 7, 7, 7, 7]
    assert shift_edges(border, -1).dtype == border.dtype and np.array_equal(shift_edges(border, 0), border)
    # Inference filters sizes before it shifts: a cell just at the size kept is not shrunk below it.
    small = (_discs([(20, 14)], 4) > 0).astype(np.uint8)
    settings = replace(SETTINGS, min_object_size=int(small.sum()), edge_shift=-1)
    kept = instances_from_classes(small, settings)
    assert kept.max() == 1 and 0 < (kept == 1).sum() < small.sum()


def test_edge_shift_is_chosen_when_a_confident_net_draws_cells_a_voxel_fat():
    reference = _discs([(20, 14), (20, 46)], 9)
    markers = np.zeros_like(reference)
    markers[20, 14], markers[20, 46] = 1, 2
    fat = _discs([(20, 14), (20, 46)], 10)  # one voxel too wide all round
    foreground = np.where(fat > 0, 0.999, 0.001).astype(np.float32)  # no threshold moves this edge
    case = ValidationCase("c", (fat > 0).astype(np.uint8), None, reference, markers, True,
                          foreground=foreground, object_classes=np.ones_like(fat, np.uint8))  # fmt: skip
    sizes = training_object_sizes([reference], instance_labels=True)
    assert candidate_edge_shifts(0) == [0, -2, -1, 1] and candidate_edge_shifts(-1) == [-1, 0, -2, 1]
    choice = choose_postprocessing([case], SETTINGS, object_sizes=sizes, instance_labels=True)
    assert choice.baseline.seg == pytest.approx(253 / 317, abs=0.01)  # the disc's area over the fat one's
    assert choice.settings.edge_shift == -1 and choice.chosen.seg > 0.9 and choice.chosen.det == 1.0
    assert choice.chosen.as_row()["edge_shift"] == -1 and choice.baseline.as_row()["edge_shift"] == 0
    # Inference shifts the same way: the chosen objects are the reference's size.
    labels = instances_from_classes((fat > 0).astype(np.uint8), choice.settings)
    assert labels.max() == 2 and abs(int((labels == 1).sum()) - int((reference == 1).sum())) < 15


def test_a_foreground_threshold_keeps_each_voxels_most_probable_object_class():
    probabilities = torch.tensor(
        [
            [[0.45, 0.42, 0.8, 0.1]],  # background: the argmax of the first three voxels
            [[0.35, 0.2, 0.05, 0.6]],  # interior
            [[0.2, 0.38, 0.15, 0.3]],  # border
        ]
    )
    boundary = InferenceSettings((1, 4), 0.25, 0, False, target="boundary")
    classes = [
        classes_and_seeds(probabilities.log(), replace(boundary, foreground_threshold=edge))[0].tolist()
        for edge in (None, 0.5, 0.1)
    ]
    assert classes == [[[0, 0, 0, 1]], [[1, 2, 0, 1]], [[1, 2, 2, 1]]]


def _noisy_disc_logits(seed: int = 3) -> tuple[np.ndarray, torch.Tensor]:
    """A disc (radius 12) and background/object logits for it with voxel noise: ragged edge, specks."""
    ys, xs = np.mgrid[:64, :64]
    disc = (ys - 32) ** 2 + (xs - 32) ** 2 <= 12**2
    noise = np.random.default_rng(seed).normal(0.0, 0.2, disc.shape)
    probability = np.clip(np.where(disc, 0.75, 0.25) + noise, 0.01, 0.99)
    logits = torch.from_numpy(np.log(np.stack([1 - probability, probability]))).float()
    return disc, logits


def test_smoothed_logits_keep_probabilities_summing_to_one_and_remove_voxel_noise():
    from scipy import ndimage

    from medseg.inference.predict import class_map, smoothed_logits

    disc, logits = _noisy_disc_logits()
    assert smoothed_logits(logits, 0.0) is logits
    smoothed = smoothed_logits(logits, 1.0)
    assert smoothed.shape == logits.shape and smoothed.dtype == torch.float32
    np.testing.assert_allclose(smoothed.exp().sum(dim=0).numpy(), 1.0, atol=1e-5)
    raw, clean = class_map(logits) > 0, class_map(smoothed) > 0
    assert (raw != disc).sum() > 400 > 20 > (clean != disc).sum()  # hundreds of wrong voxels, then a few
    assert ndimage.label(raw)[1] > 300 and ndimage.label(clean)[1] == 1  # the specks go
    # A constant field is left as it is; a straight edge between certain classes does not move.
    constant = torch.log(torch.full((2, 16, 16), 0.5))
    np.testing.assert_allclose(smoothed_logits(constant, 1.0).numpy(), constant.numpy(), atol=1e-6)
    step = torch.zeros((2, 16, 16))
    step[0, :, :8], step[1, :, 8:] = 5.0, 5.0
    assert np.array_equal(class_map(smoothed_logits(step, 2.0)), class_map(step))


def test_segment_instances_applies_the_settings_smoothing_to_the_net_output():
    from medseg.inference.predict import segment_instances

    disc, logits = _noisy_disc_logits(seed=4)
    settings = InferenceSettings(roi_size=(64, 64), overlap=0.25, min_object_size=0, fill_holes=True)
    identity = torch.nn.Identity()  # the "net" returns its input: the logits above, unchanged
    raw = segment_instances(identity, logits.numpy(), settings, device=torch.device("cpu"))
    smooth = segment_instances(
        identity, logits.numpy(), replace(settings, smoothing=1.0), device=torch.device("cpu")
    )
    assert raw.max() > 100 and smooth.max() == 1
    iou = [((labels > 0) & disc).sum() / ((labels > 0) | disc).sum() for labels in (raw, smooth)]
    assert iou[1] > 0.95 > 0.6 > iou[0]
