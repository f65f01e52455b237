"""Post-processing chosen on validation data, nnU-Net style: try the candidates, keep the best.

The net runs once per validation case; every candidate post-processing is then applied to the
stored class maps (and interior probabilities) and scored with the task's measure:

- ``op_csb`` — (SEG + DET) / 2, when the cases have CTC ``TRA`` markers;
- ``f1`` — object F1 at IoU ≥ 0.5, for instance labels;
- ``dice`` — foreground Dice, for semantic labels (one organ / lesion class).

Candidates: minimum object size as fractions of the training objects' median size (and 0),
hole filling on/off, the seed threshold of the boundary target (interior probability, or the
argmax), splitting objects whose deep core is several pieces (instance labels; ``SPLIT_LEVELS``,
``predict.split_touching``) or not, and
keep-largest-component for semantic labels. The current settings are tried
first and kept unless a candidate scores higher. A second pass moves the objects' edges: with
the other values chosen, it tries thresholds on the foreground probability
(``FOREGROUND_THRESHOLDS``, instead of the argmax), then the seed thresholds again at the best
edge (coordinate-wise: each is one more labelling of the validation cases, and an untrained
net's thousands of fragments make a labelling cost seconds). A last pass shifts every object's
surface by whole voxels (``EDGE_SHIFTS``, ``predict.shift_edges``): where the net's foreground
probability is confident right up to a voxel beyond the true edge, no threshold moves it, and
cells drawn a voxel fat all round lose SEG on every cell.

Every candidate of a ``boundary`` net forms its seeds in layers (``predict.layered_seeds``): a
seed that breaks, at interior probability 0.9, 0.95 or 0.98, into pieces of at least a fraction
of the median training object each is one seed per piece — two touching cells whose shared
border the net draws too faintly for any seed threshold. The grid runs at the first of
``SEED_SPLIT_FRACTIONS``; the last pass tries the others.

The size filter and keep-largest only drop whole objects, so each labelling's unshifted
candidates are scored from one overlap table per case (:class:`_Overlaps`), not from a
relabelled image each.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from medseg.inference.predict import (
    boundary_seeds,
    final_objects,
    instances_from_classes,
    kept_objects,
    split_touching,
    thresholded_class_map,
)
from medseg.inference.settings import InferenceSettings
from medseg.metrics.detection import detection_from_table
from medseg.metrics.evaluate import (
    CaseMetrics,
    EvaluationSummary,
    evaluate_case,
    metrics_from_table,
    summarize,
)
from medseg.metrics.overlap import keep_objects, object_overlaps

Measure = Literal["op_csb", "f1", "dice"]
SIZE_FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
"""Candidate minimum object sizes, as fractions of the median training object size."""
SEED_THRESHOLDS = (0.35, 0.5, 0.65, 0.8)
"""Candidate interior-probability thresholds for boundary-target seeds (besides the argmax)."""
SPLIT_LEVELS = (0.6, 0.7)
"""Candidate core levels for splitting merged objects (fractions of each object's greatest depth).
Measured on the GOWT1 example's validation frames (600 steps): 0.5 → OP_CSB 0.931, 0.55 → 0.945,
0.6 → 0.945, 0.65 → 0.931, 0.7 → 0.927, 0.8 → 0.934, none → 0.891."""
FOREGROUND_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
"""Candidate foreground-probability thresholds (besides the argmax): below 0.5 objects grow."""
EDGE_SHIFTS = (-2, -1, 1)
"""Candidate surface shifts in voxels (besides none): negative shrinks every object. Measured on
the GOWT1 example's frames (600 steps, objects a voxel fat all round): SEG on validation 0.892
unshifted, 0.903 at −1, 0.885 at −2, 0.859 at +1."""

SMOOTHINGS = (0.0, 1.0)
"""Candidate Gaussian σ in voxels for the class probabilities (``predict.smoothed_logits``), the
first kept on ties. Each is its own set of validation maps and its own full choice (the postprocess
stage compares them as it compares best and last weights). Measured on the shipped examples' nets
(3 seeds each, σ 0 / 1 / 2 / 3): on MSC's noisy frames the nets leave ragged edges and specks, and
σ 1 raises validation OP_CSB on two seeds of three (0.751 → 0.784, 0.722 → 0.762; the third
0.758 → 0.753), test SEG 0.613 → 0.622 as chosen. On GOWT1 validation moves by under 0.002
either way. σ 2 and 3, on the same nets, beat σ 1 on validation on three nets of six by at most
0.003 and lost by up to 0.017; each candidate costs one more full choice, so they are not tried."""

MIRRORS = (False, True)
"""Candidate test-time mirroring (``predict.predict_logits``'s ``flip_tta``), the first kept on
ties: each is its own set of validation maps and its own full choice, like ``SMOOTHINGS``.
Measured (post-processing v12 otherwise, stop 47) on the shipped example's nets at 3 000 steps:
MSC's five seeds raise validation OP_CSB with it on every net (by 0.003–0.010) and test SEG 0.683
→ 0.708 on the mean (0.680 / 0.706 / 0.658 / 0.712 / 0.659 → 0.714 / 0.707 / 0.691 / 0.711 /
0.715); GOWT1's three seeds 0.931 → 0.933. It costs 2^dims passes of the net per image."""

SEED_SPLIT_FRACTIONS = (0.4, 0.3, 0.2)
"""Candidate smallest pieces that split a seed of a boundary net (``predict.layered_seeds``), as
fractions of the median training object; the first is the grid's. Measured on the GOWT1 example's
net (600 steps): at 0.4 test SEG 0.889 → 0.911, DET 0.987 → 0.996 (a touching pair no longer
merged), validation within 0.0004; at 0.2 the same, but one unannotated test cell cut in two. On
MSC's net, 0.2–0.3 raise validation SEG 0.558 → 0.581 where 0.4 leaves it (test SEG 0.566 →
0.612 at 0.3, the one chosen, and at 0.4; 0.625 at 0.2)."""


@dataclass(frozen=True)
class ValidationCase:
    """The net's output on one validation case and its ground truth.

    Attributes:
        case_id: pseudonymous case id.
        classes: uint8 class map ``(*spatial)`` (argmax of the logits).
        interior: float32 interior probability ``(*spatial)`` (boundary target), else None.
        reference: int instance labels ``(*spatial)``.
        markers: CTC ``TRA`` marker labels ``(*spatial)`` or None.
        fully_annotated: whether every object is outlined in ``reference``.
        ignore: bool ``(*spatial)``, voxels whose label is unknown (``ingest.ignore_label``),
            left out of every candidate's score as evaluation leaves them out; or None.
        foreground: float32 foreground probability ``(*spatial)`` (1 − background's), or None
            (then no foreground threshold is tried).
        object_classes: uint8 most probable object class ``(*spatial)`` (``object_class_map``);
            needed with ``foreground``.

    """

    case_id: str
    classes: np.ndarray
    interior: np.ndarray | None
    reference: np.ndarray
    markers: np.ndarray | None
    fully_annotated: bool
    ignore: np.ndarray | None = None
    foreground: np.ndarray | None = None
    object_classes: np.ndarray | None = None

    def class_map(self, foreground_threshold: float | None) -> np.ndarray:
        """The class map ``(*spatial)`` at a foreground threshold (None: the argmax)."""
        if foreground_threshold is None or self.foreground is None or self.object_classes is None:
            return self.classes
        return thresholded_class_map(self.foreground, self.object_classes, foreground_threshold)


@dataclass(frozen=True)
class CandidateScore:
    """One candidate's post-processing values and its validation measures."""

    min_object_size: int
    fill_holes: bool
    seed_threshold: float | None
    keep_largest: bool
    split_level: float | None
    foreground_threshold: float | None
    edge_shift: int
    seed_split_size: int | None
    smoothing: float
    mirror: bool
    score: float
    seg: float
    det: float
    f1: float
    dice: float
    objects_per_case: float

    def as_row(self) -> dict[str, object]:
        """The candidate as a row of the candidates table."""
        row = dict(self.__dict__)
        row["seed_threshold"] = "argmax" if self.seed_threshold is None else self.seed_threshold
        row["split_level"] = "off" if self.split_level is None else self.split_level
        edge = self.foreground_threshold
        row["foreground_threshold"] = "argmax" if edge is None else edge
        row["seed_split_size"] = "off" if self.seed_split_size is None else self.seed_split_size
        return row


@dataclass(frozen=True)
class PostprocessingChoice:
    """The chosen settings, the measure, and every candidate's score (the first is the baseline)."""

    settings: InferenceSettings
    measure: Measure
    chosen: CandidateScore
    candidates: tuple[CandidateScore, ...]

    @property
    def baseline(self) -> CandidateScore:
        """The settings the model was trained with, scored the same way."""
        return self.candidates[0]


def selection_measure(cases: Sequence[ValidationCase], *, instance_labels: bool) -> Measure:
    """The task's measure: OP_CSB with markers, object F1 for instances, else Dice."""
    if any(case.markers is not None for case in cases):
        return "op_csb"
    return "f1" if instance_labels else "dice"


def candidate_sizes(object_sizes: np.ndarray, current: int) -> list[int]:
    """Minimum object sizes to try (voxels): the current one, 0, and fractions of the median size."""
    median = float(np.median(object_sizes)) if object_sizes.size else 0.0
    sizes = [current, 0, *(round(fraction * median) for fraction in SIZE_FRACTIONS)]
    return list(dict.fromkeys(sizes))


def candidate_split_levels(current: float | None) -> list[float | None]:
    """Split levels to try: the current one, none, and ``SPLIT_LEVELS``."""
    return list(dict.fromkeys([current, None, *SPLIT_LEVELS]))


def choose_postprocessing(
    cases: Sequence[ValidationCase],
    current: InferenceSettings,
    *,
    object_sizes: np.ndarray,
    instance_labels: bool,
) -> PostprocessingChoice:
    """Score every candidate post-processing on ``cases`` and return the best.

    Args:
        cases: validation cases (the net already run on them).
        current: the settings the model was trained with (their post-processing is the
            baseline, kept on ties).
        object_sizes: sizes in voxels of the training split's objects.
        instance_labels: whether labels are instances (else one semantic class).

    """
    measure = selection_measure(cases, instance_labels=instance_labels)
    split_sizes = seed_split_sizes(object_sizes) if current.target == "boundary" and object_sizes.size else []
    if split_sizes and current.seed_split_size is None:
        current = replace(current, seed_split_size=split_sizes[0])
    thresholds: list[float | None] = [current.seed_threshold]
    if current.target == "boundary":
        thresholds += [None, *SEED_THRESHOLDS]
    sizes = candidate_sizes(object_sizes, current.min_object_size)
    keeps = list(dict.fromkeys([current.keep_largest] + ([] if instance_labels else [False, True])))
    splits = candidate_split_levels(current.split_level) if instance_labels else [None]
    grid_edge, shift = current.foreground_threshold, current.edge_shift
    fills = list(dict.fromkeys([current.fill_holes, True, False]))
    grid: dict[tuple[bool, float | None], list[CandidateScore]] = {}
    for threshold in dict.fromkeys(thresholds):
        seeds = [_seeds(case, current, threshold, grid_edge) for case in cases]  # the same for every fill
        for fill in fills:
            labelling = (fill, threshold, grid_edge)
            grid[fill, threshold] = _candidates(
                cases, current, measure, labelling, seeds, splits, keeps, sizes, [shift]
            )
    # Fill by fill, the current one first: the order ties are broken in.
    scores = [
        score for fill in fills for threshold in dict.fromkeys(thresholds) for score in grid[fill, threshold]
    ]
    best = best_candidate(scores)
    if all(case.foreground is not None for case in cases):
        for edge in candidate_foreground_thresholds(current.foreground_threshold):
            scores += _refine(cases, current, measure, best, edge, best.seed_threshold, [shift])
        best = best_candidate(scores)
        if best.foreground_threshold != grid_edge:  # the grid scored every seed at its own edge
            best_edge = best.foreground_threshold
            for threshold in dict.fromkeys(thresholds):
                scores += _refine(cases, current, measure, best, best_edge, threshold, [shift])
            best = best_candidate(scores)
    shifts = candidate_edge_shifts(shift)
    scores += _refine(cases, current, measure, best, best.foreground_threshold, best.seed_threshold, shifts)
    best = best_candidate(scores)
    for split_size in split_sizes:
        trial = replace(current, seed_split_size=split_size)
        scores += _refine(
            cases, trial, measure, best, best.foreground_threshold, best.seed_threshold, [best.edge_shift]
        )
    best = best_candidate(scores)
    settings = current.with_postprocessing(
        min_object_size=best.min_object_size,
        fill_holes=best.fill_holes,
        seed_threshold=best.seed_threshold,
        keep_largest=best.keep_largest,
        split_level=best.split_level,
        foreground_threshold=best.foreground_threshold,
        edge_shift=best.edge_shift,
    )
    settings = replace(settings, seed_split_size=best.seed_split_size)
    return PostprocessingChoice(settings, measure, best, tuple(scores))


def seed_split_sizes(object_sizes: np.ndarray) -> list[int]:
    """Smallest pieces (voxels) that split a seed: ``SEED_SPLIT_FRACTIONS`` of the median object."""
    median = float(np.median(object_sizes))
    return list(dict.fromkeys(max(1, round(fraction * median)) for fraction in SEED_SPLIT_FRACTIONS))


def candidate_foreground_thresholds(current: float | None) -> list[float | None]:
    """Foreground thresholds to try: the current one, the argmax, and ``FOREGROUND_THRESHOLDS``."""
    return list(dict.fromkeys([current, None, *FOREGROUND_THRESHOLDS]))


def candidate_edge_shifts(current: int) -> list[int]:
    """Surface shifts to try (voxels): the current one, none, and ``EDGE_SHIFTS``."""
    return list(dict.fromkeys([current, 0, *EDGE_SHIFTS]))


Labelling = tuple[bool, float | None, float | None]
"""How a candidate forms objects before splitting: fill holes, seed threshold, foreground threshold."""


def _candidates(
    cases: Sequence[ValidationCase],
    current: InferenceSettings,
    measure: Measure,
    labelling: Labelling,
    seeds: Sequence[np.ndarray | None],
    splits: Sequence[float | None],
    keeps: Sequence[bool],
    sizes: Sequence[int],
    shifts: Sequence[int],
) -> list[CandidateScore]:
    """Score every (split, keep, size, edge shift) candidate at one labelling of the cases.

    ``seeds`` are each case's seeds at the labelling's seed and foreground thresholds
    (:func:`_seeds`); one labelling serves every edge shift (it moves the final objects).
    """
    whole = [_instances(case, current, labelling, own) for case, own in zip(cases, seeds, strict=True)]
    scores = []
    for split in splits:
        unfiltered = whole if split is None else [split_touching(labels, split) for labels in whole]
        overlaps = (
            [_Overlaps.of(case, labels) for case, labels in zip(cases, unfiltered, strict=True)]
            if 0 in shifts
            else []
        )
        for keep in keeps:
            for size in sizes:
                for shift in shifts:
                    if shift == 0:
                        summary = summarize(
                            [
                                tables.metrics(case, size, keep)
                                for case, tables in zip(cases, overlaps, strict=True)
                            ]
                        )
                    else:
                        predictions = [
                            final_objects(labels, min_size=size, keep_largest=keep, edge_shift=shift)
                            for labels in unfiltered
                        ]
                        summary = _score(cases, predictions)
                    scores.append(_candidate(size, labelling, shift, keep, split, current, summary, measure))
    return scores


def _refine(
    cases: Sequence[ValidationCase],
    current: InferenceSettings,
    measure: Measure,
    best: CandidateScore,
    edge: float | None,
    threshold: float | None,
    shifts: Sequence[int],
) -> list[CandidateScore]:
    """``best`` at another foreground / seed threshold, edge shifts or ``current``'s seed split size.

    Leaves out ``best``'s own values; nothing when no others are left.
    """
    own = (best.foreground_threshold, best.seed_threshold, best.edge_shift, best.seed_split_size)
    others = [shift for shift in shifts if (edge, threshold, shift, current.seed_split_size) != own]
    if not others:
        return []
    return _candidates(
        cases,
        current,
        measure,
        (best.fill_holes, threshold, edge),
        [_seeds(case, current, threshold, edge) for case in cases],
        [best.split_level],
        [best.keep_largest],
        [best.min_object_size],
        others,
    )


def best_candidate(scores: Sequence[CandidateScore]) -> CandidateScore:
    """The highest-scoring candidate; the first (the baseline) on ties; NaN never beats a number."""
    best = scores[0]
    for candidate in scores[1:]:
        if candidate.score > best.score + 1e-9 or (
            math.isnan(best.score) and not math.isnan(candidate.score)
        ):
            best = candidate
    return best


def _settings(
    current: InferenceSettings, fill: bool, threshold: float | None, edge: float | None
) -> InferenceSettings:
    """``current`` forming whole objects: no size filter, split or shift."""
    return current.with_postprocessing(
        min_object_size=0,
        fill_holes=fill,
        seed_threshold=threshold,
        keep_largest=False,
        split_level=None,
        foreground_threshold=edge,
        edge_shift=0,
    )


def _seeds(
    case: ValidationCase, current: InferenceSettings, threshold: float | None, edge: float | None
) -> np.ndarray | None:
    """The case's boundary seeds ``(*spatial)`` at a seed / foreground threshold; None without seeds.

    They do not depend on hole filling, so one computation serves both fills.
    """
    if threshold is None or case.interior is None:
        return None
    return boundary_seeds(case.interior, case.class_map(edge), _settings(current, False, threshold, edge))


def _instances(
    case: ValidationCase, current: InferenceSettings, labelling: Labelling, seeds: np.ndarray | None
) -> np.ndarray:
    """Whole objects int32 ``(*spatial)`` of the case at a labelling, from its ``seeds`` (:func:`_seeds`)."""
    fill, threshold, edge = labelling
    settings = _settings(current, fill, threshold, edge)
    return instances_from_classes(case.class_map(edge), settings, seeds=seeds)


@dataclass(frozen=True)
class _Overlaps:
    """A case's whole objects (before the size filter) as overlap tables.

    Attributes:
        sizes: voxels per label ``(count + 1,)``, what the size filter judges.
        reference: :func:`object_overlaps` of the reference and the objects, unknown voxels
            background in both (as :func:`evaluate_case` scores them).
        markers: :func:`object_overlaps` of the markers and the objects, or None.

    """

    sizes: np.ndarray
    reference: np.ndarray
    markers: np.ndarray | None

    @classmethod
    def of(cls, case: ValidationCase, labels: np.ndarray) -> _Overlaps:
        """The tables of ``labels`` int ``(*spatial)`` (values ``0..count``) on ``case``."""
        count = int(labels.max(initial=0))
        known, reference = labels, case.reference
        if case.ignore is not None:
            known, reference = np.where(case.ignore, 0, labels), np.where(case.ignore, 0, reference)
        return cls(
            sizes=np.bincount(labels.ravel(), minlength=count + 1),
            reference=object_overlaps(reference, known, count),
            markers=None if case.markers is None else object_overlaps(case.markers, labels, count),
        )

    def metrics(self, case: ValidationCase, min_size: int, keep_largest: bool) -> CaseMetrics:
        """What :func:`evaluate_case` gives for ``final_objects(labels, min_size, keep_largest, 0)``."""
        keep = kept_objects(self.sizes, min_size, keep_largest=keep_largest)
        detection = None if self.markers is None else detection_from_table(keep_objects(self.markers, keep))
        return metrics_from_table(
            case.case_id,
            keep_objects(self.reference, keep),
            detection=detection,
            fully_annotated=case.fully_annotated,
        )


def _score(cases: Sequence[ValidationCase], predictions: Sequence[np.ndarray]) -> EvaluationSummary:
    return summarize(
        [
            evaluate_case(
                case.case_id,
                case.reference,
                prediction,
                markers=case.markers,
                fully_annotated=case.fully_annotated,
                ignore=case.ignore,
            )
            for case, prediction in zip(cases, predictions, strict=True)
        ]
    )


def _candidate(
    size: int,
    labelling: Labelling,
    shift: int,
    keep: bool,
    split: float | None,
    current: InferenceSettings,
    summary: EvaluationSummary,
    measure: Measure,
) -> CandidateScore:
    fill, threshold, edge = labelling
    values = {"op_csb": summary.op_csb, "f1": summary.f1, "dice": summary.dice}
    return CandidateScore(
        min_object_size=size,
        fill_holes=fill,
        seed_threshold=threshold,
        keep_largest=keep,
        split_level=split,
        foreground_threshold=edge,
        edge_shift=shift,
        seed_split_size=current.seed_split_size,
        smoothing=current.smoothing,
        mirror=current.mirror,
        score=values[measure],
        seg=summary.seg,
        det=summary.det,
        f1=summary.f1,
        dice=summary.dice,
        objects_per_case=summary.objects_per_case,
    )


def training_object_sizes(labels: Sequence[np.ndarray], *, instance_labels: bool) -> np.ndarray:
    """Sizes in voxels of the objects of training label maps (instances, or components)."""
    from scipy import ndimage

    sizes = []
    for label in labels:
        objects = label if instance_labels else ndimage.label(label > 0)[0]
        counts = np.bincount(objects.ravel().astype(np.int64, copy=False))[1:]
        sizes.append(counts[counts > 0])
    return np.concatenate(sizes) if sizes else np.zeros(0, np.int64)
