"""Evaluation report files: per-case CSV, summary JSON and overlay PNGs."""

from __future__ import annotations

import base64
import csv
import html
import json
import math
from collections.abc import Mapping, Sequence
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
    """Write the summary as JSON: its fields and the headline metrics (NaN written as ``null``)."""
    document = {**asdict(summary), "metrics": summary.as_metrics("eval")}
    path.write_text(json.dumps(_null_nan(document), indent=2))


def _null_nan(value: object) -> object:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _null_nan(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_null_nan(item) for item in value]
    return value


def pick_review_cases(cases: Sequence[CaseMetrics]) -> dict[str, CaseMetrics]:
    """The best, median and worst cases by SEG, and the worst by DET where markers exist.

    Cases without reference objects are skipped for SEG, cases without markers for DET.
    """
    scored = sorted((c for c in cases if c.n_reference), key=lambda c: (c.seg, c.case_id))
    picked = {"worst": scored[0], "median": scored[len(scored) // 2], "best": scored[-1]} if scored else {}
    detected = sorted(
        (c for c in cases if c.detection is not None and c.has_reference), key=lambda c: (c.det, c.case_id)
    )
    if detected:
        picked["worst_det"] = detected[0]
    return picked


def _svg_size_histogram(cases: Sequence[CaseMetrics]) -> str:
    """Inline SVG: predicted vs reference object sizes (log₂ bins; reference from full cases).

    Fragments show up as a predicted mass far left of the reference sizes.
    """
    predicted = [size for case in cases for size in case.predicted_sizes]
    reference = [size for case in cases for size in case.reference_sizes]
    if not predicted and not reference:
        return "<p>no objects</p>"
    top = int(np.ceil(np.log2(max(predicted + reference)))) + 1
    edges = 2.0 ** np.arange(0, top + 1)
    series = {
        "predicted": (np.histogram(predicted, edges)[0], "#d62728"),
        "reference (fully annotated cases)": (np.histogram(reference, edges)[0], "#2ca02c"),
    }
    width, height, pad = 640, 220, 30
    highest = max(1, *(int(counts.max()) for counts, _ in series.values()))
    bar = (width - 2 * pad) / (len(edges) - 1) / 2
    parts = [f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">']
    parts.append(f'<rect width="{width}" height="{height}" fill="white" stroke="#ccc"/>')
    for offset, (name, (counts, colour)) in enumerate(series.items()):
        for index, count in enumerate(counts):
            h = count / highest * (height - 2 * pad)
            x = pad + (2 * index + offset) * bar
            parts.append(
                f'<rect x="{x:.1f}" y="{height - pad - h:.1f}" width="{bar:.1f}" '
                f'height="{h:.1f}" fill="{colour}"/>'
            )
        parts.append(
            f'<text x="{pad + offset * 260}" y="18" fill="{colour}" font-size="12">'
            f"{html.escape(name)}: {int(counts.sum())} objects</text>"
        )
    for index in range(0, len(edges) - 1, 2):
        parts.append(
            f'<text x="{pad + 2 * index * bar:.1f}" y="{height - 10}" font-size="10">'
            f"{int(edges[index])}</text>"
        )
    parts.append(
        f'<text x="{width - 150}" y="{height - 10}" font-size="11">object size (voxels)</text></svg>'
    )
    return "".join(parts)


def _objects_per_case(cases: Sequence[CaseMetrics]) -> str:
    """HTML table: predicted objects per case beside reference objects (where fully annotated)."""
    rows = "".join(
        f"<tr><td>{html.escape(case.case_id)}</td><td>{case.n_predicted}</td>"
        f"<td>{case.n_reference if case.fully_annotated else '–'}</td>"
        f"<td>{case.detection.markers if case.detection else '–'}</td></tr>"
        for case in cases
        if case.has_reference
    )
    return (
        "<table><tr><th>case</th><th>predicted objects</th><th>reference objects (full cases)</th>"
        f"<th>markers (cells)</th></tr>{rows}</table>"
    )


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
    zoom = max(1, -(-256 // max(rgb.shape[:2])))  # small images (2 mm volumes) shown at ≥ 256 px
    if zoom > 1:
        picture = picture.resize((rgb.shape[1] * zoom, rgb.shape[0] * zoom), Image.Resampling.NEAREST)
    ImageDraw.Draw(picture).text((4, 4), title, fill=(255, 255, 0))
    picture.save(path)


def _svg_curves(history: Sequence[Mapping[str, float]], keys: Sequence[str]) -> str:
    """Inline SVG line chart of per-epoch metrics (each series scaled to its own range)."""
    width, height, pad = 640, 220, 30
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    epochs = [row["epoch"] for row in history]
    parts = [
        f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">',
        f'<rect width="{width}" height="{height}" fill="white" stroke="#ccc"/>',
    ]
    for index, key in enumerate(k for k in keys if any(k in row for row in history)):
        points = [(row["epoch"], row[key]) for row in history if key in row and not math.isnan(row[key])]
        if not points:
            continue
        low, high = min(v for _, v in points), max(v for _, v in points)
        span, first, last = (high - low) or 1.0, min(epochs), max(epochs)
        coords = " ".join(
            f"{pad + (e - first) / max(last - first, 1) * (width - 2 * pad):.1f},"
            f"{height - pad - (v - low) / span * (height - 2 * pad):.1f}"
            for e, v in points
        )
        colour = colours[index % len(colours)]
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{coords}"/>')
        parts.append(
            f'<text x="{pad + index * 150}" y="18" fill="{colour}" font-size="12">'
            f"{html.escape(key)} {points[-1][1]:.3f} (range {low:.3f}–{high:.3f})</text>"
        )
    parts.append(
        f'<text x="{width - 80}" y="{height - 8}" font-size="11">epoch {min(epochs)}–{max(epochs)}</text>'
    )
    parts.append("</svg>")
    return "".join(parts)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.4f}"
    return html.escape(str(value))


def write_html_report(
    path: Path,
    *,
    title: str,
    summary: EvaluationSummary,
    cases: Sequence[CaseMetrics],
    history: Sequence[Mapping[str, float]],
    overlays: Mapping[str, Path],
    postprocessing: Mapping[str, object] | None = None,
) -> None:
    """Write a self-contained one-page HTML report: headline metrics, curves, overlays, table."""
    headline = "".join(
        f"<tr><th>{html.escape(key)}</th><td>{_cell(value)}</td></tr>"
        for key, value in summary.as_metrics("eval").items()
    )
    images = "".join(
        f'<figure><img src="data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}" '
        f'width="320"/><figcaption>{html.escape(rank)}: {html.escape(png.stem)}</figcaption></figure>'
        for rank, png in overlays.items()
    )
    rows = [case.as_row() for case in cases]
    header = "".join(f"<th>{html.escape(k)}</th>" for k in rows[0]) if rows else ""
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row.values()) + "</tr>" for row in rows)
    chosen = html.escape(", ".join(f"{k}: {v}" for k, v in (postprocessing or {}).items()) or "as trained")
    curves = _svg_curves(history, ["train/loss", "val/dice", "val/seg"]) if history else "<p>no history</p>"
    path.write_text(
        f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:2px 6px;text-align:right}}
figure{{display:inline-block;margin:4px}}</style>
</head><body><h1>{html.escape(title)}</h1>
<p>SEG: Cell Tracking Challenge measure (reference object matched when |R∩S| &gt; 0.5|R|, Jaccard,
0 if unmatched, mean over all reference objects). DET: the challenge's detection measure,
1 − AOGM-D/AOGM-D₀ against the TRA markers (5 per split, 10 per missed cell, 1 per spurious
object); OP_CSB = (SEG + DET)/2. Precision, recall, F1, PQ: one-to-one object matching at
IoU ≥ 0.5 on fully annotated cases. IoU/Dice: foreground overlap, mean over fully annotated
cases. HD95/ASSD in mm. Overlays: reference outlines green, prediction magenta.</p>
<h2>Summary</h2><table>{headline}</table>
<h2>Post-processing</h2><p>{chosen}</p>
<h2>Objects</h2>{_svg_size_histogram(cases)}
<details><summary>objects per case</summary>{_objects_per_case(cases)}</details>
<h2>Training curves</h2>{curves}
<h2>Best, median and worst cases (by SEG), worst by DET</h2>{images}
<h2>Per case</h2><table><tr>{header}</tr>{body}</table></body></html>"""
    )
