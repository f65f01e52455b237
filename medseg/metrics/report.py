"""Evaluation report files: per-case CSV, summary JSON and overlay PNGs."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
from scipy import ndimage

from medseg.metrics.evaluate import CaseMetrics, EvaluationSummary


def write_case_table(path: Path, cases: Sequence[CaseMetrics]) -> None:
    """Write one CSV row per case (columns of ``CaseMetrics``)."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(cases[0].as_row()))
        writer.writeheader()
        for case in cases:
            writer.writerow(case.as_row())


def write_summary(path: Path, summary: EvaluationSummary) -> None:
    """Write the summary as JSON (NaN written as ``null``)."""
    document = {
        k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(summary).items()
    }
    path.write_text(json.dumps(document, indent=2))


def pick_review_cases(cases: Sequence[CaseMetrics]) -> dict[str, CaseMetrics]:
    """The best, median and worst cases by SEG (cases without reference objects skipped)."""
    scored = sorted((c for c in cases if c.n_reference), key=lambda c: (c.seg, c.case_id))
    if not scored:
        return {}
    return {"worst": scored[0], "median": scored[len(scored) // 2], "best": scored[-1]}


def outline(labels: np.ndarray) -> np.ndarray:
    """Boolean mask of object borders of a 2D label image ``(H, W)``."""
    eroded = ndimage.grey_erosion(labels, size=3)
    dilated = ndimage.grey_dilation(labels, size=3)
    return (labels > 0) & ((eroded != labels) | (dilated != labels))


def write_overlay(
    path: Path, image: np.ndarray, reference: np.ndarray, prediction: np.ndarray, title: str
) -> None:
    """Write a PNG: grey image, reference outlines green, predicted outlines magenta.

    Args:
        image: 2D image ``(H, W)`` (for 3D, pass the slice to show).
        reference: 2D reference labels of the same shape.
        prediction: 2D predicted labels of the same shape.
        title: text drawn at the top left (case id and SEG).

    """
    from PIL import Image, ImageDraw

    low, high = np.percentile(image, [1, 99.5])
    grey = np.clip((image - low) / max(high - low, 1e-6), 0, 1)
    rgb = np.repeat((grey * 255).astype(np.uint8)[..., None], 3, axis=2)
    rgb[outline(reference)] = (0, 230, 0)
    rgb[outline(prediction)] = (255, 0, 255)
    picture = Image.fromarray(rgb)
    ImageDraw.Draw(picture).text((4, 4), title, fill=(255, 255, 0))
    picture.save(path)
