"""Detection measures: the Cell Tracking Challenge DET (AOGM-D) and object matching (F1, PQ).

Definitions (see DESIGN.md, "Metrics — pin the words"):

- ``det``: 1 − min(AOGM-D, AOGM-D₀) / AOGM-D₀ (Matula et al. 2015, the CTC's DET). The
  reference is the ``TRA`` marker image: a marker R is detected by the predicted object S
  with ``|R∩S| > 0.5·|R|``. AOGM-D = 5·NS + 10·FN + 1·FP with NS the splits needed (a
  predicted object detecting k > 1 markers costs k − 1), FN the undetected markers and FP the
  predicted objects detecting none; AOGM-D₀ = 10 · number of markers (the organisers'
  weights). Counts are pooled over the frames of a sequence before DET is taken.
- ``op_csb``: (DET + SEG) / 2, the Cell Segmentation Benchmark's ranking score.
- Object matching (any instance labels, no markers): a prediction matches a reference at
  IoU ≥ τ, one-to-one (an assignment maximising the matches, as StarDist's ``matching``);
  precision, recall, F1 and panoptic quality PQ = Σ IoU(matches) / (TP + FP/2 + FN/2).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from medseg.metrics.overlap import overlap_table

W_SPLIT, W_FALSE_NEGATIVE, W_FALSE_POSITIVE = 5, 10, 1
"""The CTC organisers' AOGM-D weights (vertex split, false negative, false positive)."""

IOU_THRESHOLDS = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9)
"""The object-matching sweep; τ = 0.5 is the headline."""


@dataclass(frozen=True)
class DetectionCounts:
    """AOGM-D vertex operations of one or more frames.

    Attributes:
        markers: reference markers (vertices of the reference graph).
        false_negatives: markers detected by no predicted object.
        false_positives: predicted objects detecting no marker.
        splits: vertex splits (a predicted object detecting k > 1 markers counts k − 1).

    """

    markers: int = 0
    false_negatives: int = 0
    false_positives: int = 0
    splits: int = 0

    def __add__(self, other: DetectionCounts) -> DetectionCounts:
        """Pool the counts of two sets of frames."""
        return DetectionCounts(
            self.markers + other.markers,
            self.false_negatives + other.false_negatives,
            self.false_positives + other.false_positives,
            self.splits + other.splits,
        )

    @property
    def aogm_d(self) -> int:
        """Weighted cost of correcting the detections: 5·NS + 10·FN + 1·FP."""
        return (
            W_SPLIT * self.splits
            + W_FALSE_NEGATIVE * self.false_negatives
            + W_FALSE_POSITIVE * (self.false_positives)
        )

    @property
    def det(self) -> float:
        """CTC DET in [0, 1]; NaN without markers."""
        if self.markers == 0:
            return math.nan
        from_scratch = W_FALSE_NEGATIVE * self.markers
        return 1.0 - min(self.aogm_d, from_scratch) / from_scratch


def detection_counts(markers: np.ndarray, prediction: np.ndarray) -> DetectionCounts:
    """AOGM-D counts of one frame or volume.

    Args:
        markers: ``TRA`` marker labels ``(*spatial)``, 0 background, one label per cell.
        prediction: predicted instance labels, same shape.

    """
    return detection_from_table(overlap_table(markers, prediction))


def detection_from_table(table: np.ndarray) -> DetectionCounts:
    """AOGM-D counts from a (markers × prediction) overlap table (see ``overlap_table``)."""
    marker_size = table[1:, :].sum(axis=1)
    detects = 2 * table[1:, 1:] > marker_size[:, None]  # unique per marker by construction
    per_object = detects.sum(axis=0)
    return DetectionCounts(
        markers=int(marker_size.size),
        false_negatives=int((~detects.any(axis=1)).sum()),
        false_positives=int((per_object == 0).sum()),
        splits=int(np.maximum(per_object - 1, 0).sum()),
    )


def pool_detection(counts: Iterable[DetectionCounts]) -> DetectionCounts:
    """Sum detection counts over frames/cases."""
    return sum(counts, DetectionCounts())


def op_csb(seg: float, det: float) -> float:
    """The Cell Segmentation Benchmark's OP_CSB = (SEG + DET) / 2 (NaN when either is)."""
    return 0.5 * (seg + det)


@dataclass(frozen=True)
class ObjectMatch:
    """One-to-one object matching at one IoU threshold.

    Attributes:
        threshold: τ; a pair matches when IoU ≥ τ.
        true_positives: matched pairs.
        false_positives: predicted objects without a match.
        false_negatives: reference objects without a match.
        iou_sum: sum of the matched pairs' IoU (for PQ).

    """

    threshold: float
    true_positives: int
    false_positives: int
    false_negatives: int
    iou_sum: float

    def __add__(self, other: ObjectMatch) -> ObjectMatch:
        """Pool two cases matched at the same threshold."""
        return ObjectMatch(
            self.threshold,
            self.true_positives + other.true_positives,
            self.false_positives + other.false_positives,
            self.false_negatives + other.false_negatives,
            self.iou_sum + other.iou_sum,
        )

    @property
    def precision(self) -> float:
        """TP / (TP + FP); NaN without predicted objects."""
        return _ratio(self.true_positives, self.true_positives + self.false_positives)

    @property
    def recall(self) -> float:
        """TP / (TP + FN); NaN without reference objects."""
        return _ratio(self.true_positives, self.true_positives + self.false_negatives)

    @property
    def f1(self) -> float:
        """2 TP / (2 TP + FP + FN); NaN when both are empty."""
        errors = self.false_positives + self.false_negatives
        return _ratio(2 * self.true_positives, 2 * self.true_positives + errors)

    @property
    def pq(self) -> float:
        """Panoptic quality Σ IoU / (TP + FP/2 + FN/2); NaN when both are empty."""
        return _ratio(self.iou_sum, self.true_positives + 0.5 * (self.false_positives + self.false_negatives))


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else math.nan


def match_objects(table: np.ndarray, thresholds: Sequence[float] = IOU_THRESHOLDS) -> list[ObjectMatch]:
    """One-to-one matches of reference and predicted objects at each IoU threshold.

    Args:
        table: (reference × prediction) overlap table (see ``overlap_table``).
        thresholds: IoU thresholds τ in (0, 1].

    Returns:
        One :class:`ObjectMatch` per threshold, in the given order.

    """
    from scipy.optimize import linear_sum_assignment

    objects = table[1:, 1:].astype(np.float64)
    ref_size = table[1:, :].sum(axis=1)
    pred_size = table[:, 1:].sum(axis=0)
    n_ref, n_pred = objects.shape
    iou = objects / np.maximum(ref_size[:, None] + pred_size[None, :] - objects, 1)
    results = []
    for threshold in thresholds:
        candidate = iou >= threshold
        if threshold > 0.5 or not candidate.any():
            rows, columns = np.nonzero(candidate)  # IoU > 0.5 pairs are unique on both sides
        else:
            cost = -candidate.astype(np.float64) - iou / (2 * max(n_ref, n_pred, 1))
            rows, columns = linear_sum_assignment(cost)
            keep = candidate[rows, columns]
            rows, columns = rows[keep], columns[keep]
        tp = int(rows.size)
        results.append(ObjectMatch(threshold, tp, n_pred - tp, n_ref - tp, float(iou[rows, columns].sum())))
    return results
