"""Segmentation metrics: CTC SEG and pixel IoU/Dice."""

from medseg.metrics.evaluate import CaseMetrics, EvaluationSummary, evaluate_case, summarize
from medseg.metrics.overlap import Overlap, SegScore, foreground_overlap, overlap_table, seg_score

__all__ = [
    "CaseMetrics",
    "EvaluationSummary",
    "Overlap",
    "SegScore",
    "evaluate_case",
    "foreground_overlap",
    "overlap_table",
    "seg_score",
    "summarize",
]
