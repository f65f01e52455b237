"""Per-case metrics and their dataset-level summary."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from medseg.metrics.overlap import foreground_overlap, seg_score


@dataclass(frozen=True)
class CaseMetrics:
    """Metrics of one case.

    ``iou``/``dice`` are NaN when the case is not fully annotated (pixel overlap is then
    meaningless) or when both masks are empty. ``jaccard_sum`` and ``n_reference`` let SEG be
    pooled over all reference objects of a dataset.
    """

    case_id: str
    seg: float
    n_reference: int
    matched: int
    false_positives: int
    jaccard_sum: float
    iou: float
    dice: float
    fully_annotated: bool

    def as_row(self) -> dict[str, object]:
        """Return the metrics as a flat dict, one row of the per-case table."""
        return asdict(self)


def evaluate_case(
    case_id: str, reference: np.ndarray, prediction: np.ndarray, *, fully_annotated: bool = True
) -> CaseMetrics:
    """Compute SEG and foreground IoU/Dice for one case.

    Args:
        case_id: pseudonymous case id.
        reference: integer instance labels, shape ``(*spatial)``.
        prediction: integer instance labels, same shape.
        fully_annotated: whether every object of the case is annotated in ``reference``.

    """
    score = seg_score(reference, prediction)
    overlap = foreground_overlap(reference, prediction)
    return CaseMetrics(
        case_id=case_id,
        seg=score.seg,
        n_reference=score.n_reference,
        matched=score.matched,
        false_positives=score.false_positives,
        jaccard_sum=float(score.jaccard.sum()),
        iou=overlap.iou if fully_annotated else math.nan,
        dice=overlap.dice if fully_annotated else math.nan,
        fully_annotated=fully_annotated,
    )


@dataclass(frozen=True)
class EvaluationSummary:
    """Dataset-level metrics.

    Attributes:
        seg: mean Jaccard over all reference objects of all cases (CTC SEG).
        iou: mean foreground IoU over cases where it is defined.
        dice: mean foreground Dice over cases where it is defined.
        n_cases: cases evaluated.
        n_reference: reference objects over all cases.
        matched: reference objects matched.
        false_positives: predicted objects matched by no reference object.
        n_overlap_undefined: cases excluded from the IoU/Dice means (NaN).

    """

    seg: float
    iou: float
    dice: float
    n_cases: int
    n_reference: int
    matched: int
    false_positives: int
    n_overlap_undefined: int

    def as_metrics(self, prefix: str) -> dict[str, float]:
        """Return the summary as MLflow-style metrics ``<prefix>/<name>``."""
        return {f"{prefix}/{key}": float(value) for key, value in asdict(self).items()}


def summarize(cases: Sequence[CaseMetrics]) -> EvaluationSummary:
    """Pool per-case metrics into dataset-level values."""
    n_reference = sum(case.n_reference for case in cases)
    jaccard_sum = sum(case.jaccard_sum for case in cases)
    ious = [case.iou for case in cases if not math.isnan(case.iou)]
    dices = [case.dice for case in cases if not math.isnan(case.dice)]
    return EvaluationSummary(
        seg=jaccard_sum / n_reference if n_reference else math.nan,
        iou=float(np.mean(ious)) if ious else math.nan,
        dice=float(np.mean(dices)) if dices else math.nan,
        n_cases=len(cases),
        n_reference=n_reference,
        matched=sum(case.matched for case in cases),
        false_positives=sum(case.false_positives for case in cases),
        n_overlap_undefined=len(cases) - len(ious),
    )
