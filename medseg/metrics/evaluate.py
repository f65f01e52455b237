"""Per-case metrics (SEG, DET, object F1/PQ, IoU/Dice, surface distances) and their dataset summary."""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from medseg.metrics.detection import (
    IOU_THRESHOLDS,
    DetectionCounts,
    ObjectMatch,
    detection_counts,
    match_objects,
    op_csb,
    pool_detection,
)
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

    Pixel and object-matching metrics are NaN / absent when the case is not fully annotated
    (overlap with a sparse reference is meaningless: unannotated cells would count as false
    positives) or when both masks of a class are empty. ``jaccard_sum`` and ``n_reference``
    let SEG be pooled over all reference objects of a dataset; ``detection`` (from ``TRA``
    markers, valid on sparse frames too) pools into DET. A case without a segmentation
    reference (a CTC frame with markers only) has ``n_reference == 0`` and counts for DET only.

    Attributes:
        n_predicted: predicted objects.
        has_reference: whether the case has a segmentation reference (False: markers only).
        detection: AOGM-D counts against the case's markers, None without markers.
        objects: one-to-one matches at each IoU threshold of the sweep (full cases only).
        predicted_sizes, reference_sizes: object sizes in voxels, for the size histogram
            (reference sizes empty unless fully annotated).

    """

    case_id: str
    seg: float
    n_reference: int
    matched: int
    false_positives: int
    jaccard_sum: float
    fully_annotated: bool
    classes: Mapping[str, ClassMetrics]
    n_predicted: int = 0
    has_reference: bool = True
    detection: DetectionCounts | None = None
    objects: tuple[ObjectMatch, ...] = ()
    predicted_sizes: tuple[int, ...] = ()
    reference_sizes: tuple[int, ...] = ()

    @property
    def missed(self) -> int:
        """Reference objects without a match."""
        return self.n_reference - self.matched

    @property
    def det(self) -> float:
        """CTC DET of this case alone; NaN without markers."""
        return self.detection.det if self.detection is not None else math.nan

    @property
    def f1(self) -> float:
        """Object F1 at IoU ≥ 0.5; NaN unless fully annotated."""
        return self.objects[0].f1 if self.objects else math.nan

    @property
    def pq(self) -> float:
        """Panoptic quality at IoU ≥ 0.5; NaN unless fully annotated."""
        return self.objects[0].pq if self.objects else math.nan

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
            "n_predicted": self.n_predicted,
            "det": self.det,
            "markers": self.detection.markers if self.detection else 0,
            "det_false_negatives": self.detection.false_negatives if self.detection else 0,
            "det_false_positives": self.detection.false_positives if self.detection else 0,
            "det_splits": self.detection.splits if self.detection else 0,
            "precision": self.objects[0].precision if self.objects else math.nan,
            "recall": self.objects[0].recall if self.objects else math.nan,
            "f1": self.f1,
            "pq": self.pq,
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
    reference: np.ndarray | None,
    prediction: np.ndarray,
    *,
    markers: np.ndarray | None = None,
    fully_annotated: bool = True,
    spacing: Sequence[float] | None = None,
    surface: bool = False,
    ignore: np.ndarray | None = None,
) -> CaseMetrics:
    """SEG, DET, object matching, foreground IoU/Dice and (optionally) HD95/ASSD for one case.

    Args:
        case_id: pseudonymous case id (or a CTC frame id such as ``t021``).
        reference: integer instance labels (ground truth), shape ``(*spatial)``; 0 background.
            None for a frame that has markers only (scored for DET alone).
        prediction: integer instance labels, same shape.
        markers: CTC ``TRA`` marker labels of the same shape (one per cell), or None.
        fully_annotated: whether every object of the case is annotated in ``reference``.
        spacing: voxel spacing in mm per array axis (default 1).
        surface: also compute HD95 and average symmetric surface distance (mm).
        ignore: bool ``(*spatial)``, voxels whose label is unknown (``ingest.ignore_label``):
            prediction and reference count as background there for SEG, object matching and
            overlap (DET, from the markers, sees the whole prediction).

    """
    detection = detection_counts(markers, prediction) if markers is not None else None
    if ignore is not None:
        prediction = np.where(ignore, 0, prediction)
        reference = np.where(ignore, 0, reference) if reference is not None else None
    if reference is None:
        predicted_sizes = np.bincount(prediction.ravel().astype(np.int64, copy=False))[1:]
        predicted_sizes = predicted_sizes[predicted_sizes > 0]
        return CaseMetrics(
            case_id=case_id,
            seg=math.nan,
            n_reference=0,
            matched=0,
            false_positives=0,
            jaccard_sum=0.0,
            fully_annotated=False,
            classes={FOREGROUND: ClassMetrics(math.nan, math.nan)},
            n_predicted=int(predicted_sizes.size),
            has_reference=False,
            detection=detection,
            predicted_sizes=tuple(predicted_sizes.tolist()),
        )
    surfaces = (
        surface_distances(reference > 0, prediction > 0, spacing)
        if surface and fully_annotated
        else (math.nan, math.nan)
    )
    return metrics_from_table(
        case_id,
        overlap_table(reference, prediction),
        detection=detection,
        fully_annotated=fully_annotated,
        surfaces=surfaces,
    )


def metrics_from_table(
    case_id: str,
    table: np.ndarray,
    *,
    detection: DetectionCounts | None = None,
    fully_annotated: bool = True,
    surfaces: tuple[float, float] = (math.nan, math.nan),
) -> CaseMetrics:
    """The metrics of one case with a segmentation reference, from its overlap table.

    Every metric but the surface distances is a function of the table, so a caller that has
    the table (the post-processing choice, scoring one labelling under many size filters)
    skips the pass over the voxels.

    Args:
        case_id: pseudonymous case id.
        table: ``overlap_table(reference, prediction)`` (unknown voxels already background).
        detection: AOGM-D counts against the case's markers, or None.
        fully_annotated: whether every object of the case is annotated in the reference.
        surfaces: HD95 and ASSD in mm (kept only for a fully annotated case).

    """
    predicted_sizes = table[:, 1:].sum(axis=0)
    score = seg_from_table(table)
    foreground = ClassMetrics(math.nan, math.nan)
    objects: tuple[ObjectMatch, ...] = ()
    reference_sizes: tuple[int, ...] = ()
    if fully_annotated:
        overlap = foreground_from_table(table)
        foreground = ClassMetrics(overlap.iou, overlap.dice, *surfaces)
        objects = tuple(match_objects(table))
        reference_sizes = tuple(table[1:, :].sum(axis=1).tolist())
    return CaseMetrics(
        case_id=case_id,
        seg=score.seg,
        n_reference=score.n_reference,
        matched=score.matched,
        false_positives=score.false_positives,
        jaccard_sum=float(score.jaccard.sum()),
        fully_annotated=fully_annotated,
        classes={FOREGROUND: foreground},
        n_predicted=int(predicted_sizes.size),
        detection=detection,
        objects=objects,
        predicted_sizes=tuple(predicted_sizes.tolist()),
        reference_sizes=reference_sizes,
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
        detection: AOGM-D counts pooled over the cases with markers (DET of the dataset).
        n_det_cases: cases with markers.
        objects: object matches pooled over the fully annotated cases, one per threshold.
        objects_per_case: mean predicted objects per case.
        reference_objects_per_case: mean reference objects per fully annotated case.

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
    detection: DetectionCounts = field(default_factory=DetectionCounts)
    n_det_cases: int = 0
    objects: tuple[ObjectMatch, ...] = ()
    objects_per_case: float = math.nan
    reference_objects_per_case: float = math.nan

    @property
    def det(self) -> float:
        """CTC DET over all marker frames; NaN without markers."""
        return self.detection.det

    @property
    def op_csb(self) -> float:
        """(SEG + DET) / 2; NaN without markers."""
        return op_csb(self.seg, self.det)

    @property
    def f1(self) -> float:
        """Object F1 at IoU ≥ 0.5 pooled over the fully annotated cases; NaN without any."""
        return self.objects[0].f1 if self.objects else math.nan

    def as_metrics(self, prefix: str) -> dict[str, float]:
        """The summary as MLflow-style metrics ``<prefix>/<name>`` (per class ``iou_<label>``).

        DET keys appear only when some case had markers, object keys only when some case was
        fully annotated; the F1 sweep is ``f1_iou0.75`` etc. (τ = 0.5 is plain ``f1``).
        """
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
                "objects_per_case",
            )
        }
        if self.n_det_cases:
            metrics.update(
                {
                    f"{prefix}/det": self.det,
                    f"{prefix}/op_csb": self.op_csb,
                    f"{prefix}/det_markers": float(self.detection.markers),
                    f"{prefix}/det_false_negatives": float(self.detection.false_negatives),
                    f"{prefix}/det_false_positives": float(self.detection.false_positives),
                    f"{prefix}/det_splits": float(self.detection.splits),
                    f"{prefix}/n_det_cases": float(self.n_det_cases),
                }
            )
        if self.objects:
            headline = self.objects[0]
            metrics.update(
                {
                    f"{prefix}/precision": headline.precision,
                    f"{prefix}/recall": headline.recall,
                    f"{prefix}/f1": headline.f1,
                    f"{prefix}/pq": headline.pq,
                    f"{prefix}/reference_objects_per_case": self.reference_objects_per_case,
                }
            )
            for match in self.objects[1:]:
                metrics[f"{prefix}/f1_iou{match.threshold:g}"] = match.f1
        for name, values in self.classes.items():
            for key in ("iou", "dice", "hd95", "assd"):
                metrics[f"{prefix}/{key}_{name}"] = float(getattr(values, key))
        return metrics


def summarize(cases: Sequence[CaseMetrics]) -> EvaluationSummary:
    """Pool per-case metrics into dataset-level values (DET and object counts pooled, then taken)."""
    segmented = [case for case in cases if case.has_reference]
    n_reference = sum(case.n_reference for case in cases)
    jaccard_sum = sum(case.jaccard_sum for case in cases)
    names = list(cases[0].classes) if cases else []
    classes = {
        name: ClassMetrics(
            *(
                _nanmean([getattr(case.classes[name], key) for case in segmented])
                for key in ("iou", "dice", "hd95", "assd")
            )
        )
        for name in names
    }
    matched = sum(case.matched for case in cases)
    with_markers = [case.detection for case in cases if case.detection is not None]
    full = [case for case in cases if case.objects]
    objects = tuple(
        functools.reduce(operator.add, (case.objects[index] for case in full))
        for index in range(len(IOU_THRESHOLDS) if full else 0)
    )
    return EvaluationSummary(
        seg=jaccard_sum / n_reference if n_reference else math.nan,
        iou=_nanmean([c.iou for c in classes.values()]),
        dice=_nanmean([c.dice for c in classes.values()]),
        classes=classes,
        n_cases=len(segmented),
        n_reference=n_reference,
        matched=matched,
        missed=n_reference - matched,
        false_positives=sum(case.false_positives for case in cases),
        n_overlap_undefined=sum(math.isnan(case.iou) for case in segmented),
        detection=pool_detection(with_markers),
        n_det_cases=len(with_markers),
        objects=objects,
        objects_per_case=_nanmean([float(case.n_predicted) for case in segmented]),
        reference_objects_per_case=_nanmean([float(case.n_reference) for case in full]),
    )
