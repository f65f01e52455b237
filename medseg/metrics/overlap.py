"""Instance and pixel overlap measures computed from one label overlap table.

Definitions (see DESIGN.md, "Metrics — pin the words"):

- ``seg``: the Cell Tracking Challenge SEG measure. A reference object R is matched to the
  predicted object S with ``|R∩S| > 0.5·|R|`` (unique by construction); its score is the
  Jaccard index ``|R∩S| / |R∪S|``, 0 when unmatched. SEG is the mean over all reference
  objects.
- ``iou``/``dice``: foreground overlap from tp/fp/fn; NaN when both masks are empty.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SegScore:
    """SEG result for one frame/case.

    Attributes:
        jaccard: per reference object Jaccard index (0 when unmatched), shape ``(n_ref,)``.
        matched: number of reference objects with a match.
        false_positives: predicted objects matched by no reference object.

    """

    jaccard: np.ndarray
    matched: int
    false_positives: int

    @property
    def n_reference(self) -> int:
        """Number of reference objects."""
        return int(self.jaccard.size)

    @property
    def seg(self) -> float:
        """Mean Jaccard over reference objects; NaN when there is none."""
        return float(self.jaccard.mean()) if self.jaccard.size else float("nan")


_DIRECT_TABLE_LIMIT = 1 << 24


def _object_voxels(reference: np.ndarray, prediction: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """The labels int64 ``(n,)`` of the voxels that are an object in either image, and how many are not.

    Background-only voxels (most of a cell image) only add to the table's cell (0, 0), so the
    tables count them apart.

    Raises:
        ValueError: the two images differ in shape.

    """
    if reference.shape != prediction.shape:
        raise ValueError(f"shape mismatch: reference {reference.shape} vs prediction {prediction.shape}")
    ref, pred = reference.ravel(), prediction.ravel()
    objects = (ref != 0) | (pred != 0)
    background = ref.size - int(np.count_nonzero(objects))
    return ref[objects].astype(np.int64), pred[objects].astype(np.int64), background


def overlap_table(reference: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """Count voxels per (reference label, predicted label) pair in one pass over the voxels.

    Args:
        reference: non-negative integer instance labels, any shape; 0 is background.
        prediction: non-negative integer instance labels, same shape.

    Returns:
        ``(n_ref + 1, n_pred + 1)`` int64 table over the labels present, in increasing label
        order, row/column 0 being background (present even if absent from the image).

    """
    ref, pred, background = _object_voxels(reference, prediction)
    n_ref, n_pred = int(ref.max(initial=0)) + 1, int(pred.max(initial=0)) + 1
    if n_ref * n_pred <= _DIRECT_TABLE_LIMIT:
        # Small label values (the usual case): a dense table, then drop absent labels.
        table = np.bincount(ref * n_pred + pred, minlength=n_ref * n_pred).reshape(n_ref, n_pred)
        table[0, 0] += background
        rows = np.union1d([0], np.flatnonzero(table.any(axis=1)))
        columns = np.union1d([0], np.flatnonzero(table.any(axis=0)))
        return table[np.ix_(rows, columns)]
    ref_ids, ref_index = np.unique(np.concatenate(([0], ref)), return_inverse=True)
    pred_ids, pred_index = np.unique(np.concatenate(([0], pred)), return_inverse=True)
    flat = ref_index[1:] * pred_ids.size + pred_index[1:]
    table = np.bincount(flat, minlength=ref_ids.size * pred_ids.size).reshape(ref_ids.size, pred_ids.size)
    table[0, 0] += background
    return table


def object_overlaps(reference: np.ndarray, prediction: np.ndarray, count: int) -> np.ndarray:
    """Like :func:`overlap_table`, but with a column for every predicted label ``0..count``.

    A label absent from ``prediction`` keeps its (zero) column, so the table of any subset of
    the predicted objects follows from this one without another pass over the voxels
    (:func:`keep_objects`).

    Args:
        reference: non-negative integer labels, any shape; 0 is background.
        prediction: integer labels ``0..count``, same shape.
        count: the highest predicted label.

    Returns:
        ``(n_ref + 1, count + 1)`` int64: rows as :func:`overlap_table`'s, column ``j`` label ``j``.

    """
    ref, pred, background = _object_voxels(reference, prediction)
    ref_ids, ref_index = np.unique(np.concatenate(([0], ref)), return_inverse=True)
    flat = ref_index[1:] * (count + 1) + pred
    table = np.bincount(flat, minlength=ref_ids.size * (count + 1)).reshape(ref_ids.size, count + 1)
    table[0, 0] += background
    return table


def keep_objects(table: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """The :func:`overlap_table` of the prediction with only the ``keep`` objects, relabelled ``1..n``.

    Args:
        table: :func:`object_overlaps` of the whole prediction ``(n_ref + 1, count + 1)``.
        keep: bool ``(count + 1,)``, which labels stay (``keep[0]`` is ignored); the others
            become background.

    """
    kept = keep.copy()
    kept[0] = False
    kept &= table.any(axis=0)  # overlap_table lists the labels present only
    return np.concatenate((table[:, ~kept].sum(axis=1, keepdims=True), table[:, kept]), axis=1)


def seg_score(reference: np.ndarray, prediction: np.ndarray) -> SegScore:
    """CTC SEG for one frame or volume of instance labels (2D or 3D).

    Args:
        reference: integer instance labels (ground truth), 0 is background.
        prediction: integer instance labels, same shape.

    """
    return seg_from_table(overlap_table(reference, prediction))


def seg_from_table(table: np.ndarray) -> SegScore:
    """CTC SEG from an overlap table (see :func:`overlap_table`)."""
    objects = table[1:, 1:]
    ref_size = table[1:, :].sum(axis=1)
    pred_size = table[:, 1:].sum(axis=0)
    if objects.size == 0:
        return SegScore(np.zeros(ref_size.size), 0, int(pred_size.size))
    match = 2 * objects > ref_size[:, None]
    best = objects.argmax(axis=1)
    rows = np.arange(objects.shape[0])
    has_match = match[rows, best]
    intersection = objects[rows, best]
    union = ref_size + pred_size[best] - intersection
    jaccard = np.where(has_match, intersection / np.maximum(union, 1), 0.0)
    matched_pred = np.zeros(pred_size.size, dtype=bool)
    matched_pred[best[has_match]] = True
    return SegScore(jaccard.astype(np.float64), int(has_match.sum()), int((~matched_pred).sum()))


@dataclass(frozen=True)
class Overlap:
    """Foreground pixel counts of one case: true positives, false positives, false negatives."""

    tp: int
    fp: int
    fn: int

    @property
    def iou(self) -> float:
        """``tp / (tp + fp + fn)``; NaN when both masks are empty."""
        denominator = self.tp + self.fp + self.fn
        return self.tp / denominator if denominator else float("nan")

    @property
    def dice(self) -> float:
        """``2 tp / (2 tp + fp + fn)``; NaN when both masks are empty."""
        denominator = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / denominator if denominator else float("nan")


def foreground_from_table(table: np.ndarray) -> Overlap:
    """Foreground (label > 0) overlap from an instance overlap table, without another pass."""
    return Overlap(tp=int(table[1:, 1:].sum()), fp=int(table[0, 1:].sum()), fn=int(table[1:, 0].sum()))
