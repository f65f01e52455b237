"""Segmentation metrics: CTC SEG and pixel IoU/Dice."""

from medseg.metrics.evaluate import CaseMetrics, ClassMetrics, EvaluationSummary, evaluate_case, summarize
from medseg.metrics.overlap import Overlap, SegScore, foreground_from_table, overlap_table, seg_score

__all__ = [
    "CaseMetrics",
    "ClassMetrics",
    "EvaluationSummary",
    "Overlap",
    "SegScore",
    "evaluate_case",
    "foreground_from_table",
    "overlap_table",
    "seg_score",
    "summarize",
]
