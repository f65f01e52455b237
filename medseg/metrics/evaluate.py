"""Per-case metrics (SEG, per-class IoU/Dice, surface distances) and their dataset summary."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from medseg.metrics.overlap import foreground_from_table, overlap_table, seg_from_table
from medseg.metrics.surface import surface_distances

FOREGROUND = "foreground"


@dataclass(frozen=True)
class ClassMetrics:
    """Overlap and surface distances of one class in one case (NaN where undefined).

    ``hd95`` and ``assd`` are in mm (the image spacing); NaN when either mask is empty.
    """

    iou: float
    dice: float
    hd95: float = math.nan
    assd: float = math.nan


@dataclass(frozen=True)
class CaseMetrics:
    """Metrics of one case.

    Pixel metrics are NaN when the case is not fully annotated (overlap with a sparse
    reference is meaningless) or when both masks of a class are empty. ``jaccard_sum`` and
    ``n_reference`` let SEG be pooled over all reference objects of a dataset.
    """

    case_id: str
    seg: float
    n_reference: int
    matched: int
    false_positives: int
    jaccard_sum: float
    fully_annotated: bool
    classes: Mapping[str, ClassMetrics]

    @property
    def missed(self) -> int:
        """Reference objects without a match."""
        return self.n_reference - self.matched

    @property
    def iou(self) -> float:
        """Mean IoU over the classes where it is defined."""
        return _nanmean([c.iou for c in self.classes.values()])

    @property
    def dice(self) -> float:
        """Mean Dice over the classes where it is defined."""
        return _nanmean([c.dice for c in self.classes.values()])

    def as_row(self) -> dict[str, object]:
        """The case as one flat row of the per-case table."""
        row: dict[str, object] = {
            "case_id": self.case_id,
            "seg": self.seg,
            "n_reference": self.n_reference,
            "matched": self.matched,
            "missed": self.missed,
            "false_positives": self.false_positives,
            "fully_annotated": self.fully_annotated,
            "iou": self.iou,
            "dice": self.dice,
        }
        for name, values in self.classes.items():
            row.update({f"{key}_{name}": getattr(values, key) for key in ("iou", "dice", "hd95", "assd")})
        return row


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def evaluate_case(
    case_id: str,
    reference: np.ndarray,
    prediction: np.ndarray,
    *,
    fully_annotated: bool = True,
    spacing: Sequence[float] | None = None,
    surface: bool = False,
) -> CaseMetrics:
    """SEG, foreground IoU/Dice and (optionally) HD95/ASSD for one case of instance labels.

    Args:
        case_id: pseudonymous case id.
        reference: integer instance labels (ground truth), shape ``(*spatial)``; 0 background.
        prediction: integer instance labels, same shape.
        fully_annotated: whether every object of the case is annotated in ``reference``.
        spacing: voxel spacing in mm per array axis (default 1).
        surface: also compute HD95 and average symmetric surface distance (mm).

    """
    table = overlap_table(reference, prediction)
    score = seg_from_table(table)
    foreground = ClassMetrics(math.nan, math.nan)
    if fully_annotated:
        overlap = foreground_from_table(table)
        hd95, assd = (
            surface_distances(reference > 0, prediction > 0, spacing) if surface else (math.nan, math.nan)
        )
        foreground = ClassMetrics(overlap.iou, overlap.dice, hd95, assd)
    return CaseMetrics(
        case_id=case_id,
        seg=score.seg,
        n_reference=score.n_reference,
        matched=score.matched,
        false_positives=score.false_positives,
        jaccard_sum=float(score.jaccard.sum()),
        fully_annotated=fully_annotated,
        classes={FOREGROUND: foreground},
    )


@dataclass(frozen=True)
class EvaluationSummary:
    """Dataset-level metrics.

    Attributes:
        seg: mean Jaccard over all reference objects of all cases (CTC SEG).
        iou: mean over classes of the per-class mean IoU.
        dice: mean over classes of the per-class mean Dice.
        classes: per class, the means over cases where each value is defined.
        n_cases: cases evaluated.
        n_reference: reference objects over all cases.
        matched: reference objects matched.
        missed: reference objects not matched.
        false_positives: predicted objects matched by no reference object.
        n_overlap_undefined: cases excluded from the IoU/Dice means (NaN).

    """

    seg: float
    iou: float
    dice: float
    classes: Mapping[str, ClassMetrics]
    n_cases: int
    n_reference: int
    matched: int
    missed: int
    false_positives: int
    n_overlap_undefined: int

    def as_metrics(self, prefix: str) -> dict[str, float]:
        """The summary as MLflow-style metrics ``<prefix>/<name>`` (per class ``iou_<label>``)."""
        metrics = {
            f"{prefix}/{key}": float(getattr(self, key))
            for key in (
                "seg",
                "iou",
                "dice",
                "n_cases",
                "n_reference",
                "matched",
                "missed",
                "false_positives",
                "n_overlap_undefined",
            )
        }
        for name, values in self.classes.items():
            for key in ("iou", "dice", "hd95", "assd"):
                metrics[f"{prefix}/{key}_{name}"] = float(getattr(values, key))
        return metrics


def summarize(cases: Sequence[CaseMetrics]) -> EvaluationSummary:
    """Pool per-case metrics into dataset-level values."""
    n_reference = sum(case.n_reference for case in cases)
    jaccard_sum = sum(case.jaccard_sum for case in cases)
    names = list(cases[0].classes) if cases else []
    classes = {
        name: ClassMetrics(
            *(
                _nanmean([getattr(case.classes[name], key) for case in cases])
                for key in ("iou", "dice", "hd95", "assd")
            )
        )
        for name in names
    }
    matched = sum(case.matched for case in cases)
    return EvaluationSummary(
        seg=jaccard_sum / n_reference if n_reference else math.nan,
        iou=_nanmean([c.iou for c in classes.values()]),
        dice=_nanmean([c.dice for c in classes.values()]),
        classes=classes,
        n_cases=len(cases),
        n_reference=n_reference,
        matched=matched,
        missed=n_reference - matched,
        false_positives=sum(case.false_positives for case in cases),
        n_overlap_undefined=sum(math.isnan(case.iou) for case in cases),
    )
