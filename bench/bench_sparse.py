"""Sparse-aware training on real CTC data: every annotated frame vs the fully annotated ones.

Fluo-N2DH-GOWT1 sequence 01 (../shared/data) has SEG masks for 30 frames, but only 4 outline
every cell; the other 26 outline 2 of about 23 cells each. Two runs of the shipped 2D pipeline
with every training value planned from the run's own data (as the GOWT1 example does), each with
the same wall-clock training budget (``train.budget.minutes``; ``epochs`` only as a high cap):

- ``fully_annotated``: only the 4 fully annotated frames (train 2, val 1);
- ``annotated``: every annotated frame trains (``ingest.train_on: annotated``, what the GOWT1
  example ships); around each TRA marker no outline covers, a region of the typical cell size is
  left out of the loss.

Both exported models (with the post-processing each chose on its validation frames) segment
the same held-out frames — the ``annotated`` run's test split minus the frames the other run
trained or validated on — scored like the Cell Tracking Challenge: SEG (every annotated cell),
DET (every TRA marker), OP_CSB, and predicted objects per frame against the markers per frame.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import yaml

import medseg
from bench.examples import WEIGHTS_EXPORT
from medseg.io.dataset import read_index
from medseg.io.readers import read_image, write_image
from medseg.io.volume import Volume
from medseg.tracking.base import NullTracker

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ctc" / "Fluo-N2DH-GOWT1"
TRAIN = {"epochs": 1000}  # a cap: the budget decides; everything else is planned


def _run(
    mode: str, minutes: float, root: Path, data: Path, overrides: dict[str, object]
) -> tuple[Path, set[int], set[int], dict[str, float]]:
    """Run the pipeline; the export folder, frames trained/validated on, test frames, metrics."""
    split = (
        {"val_fraction": 0.25, "test_fraction": 0.25}
        if mode == "fully_annotated"
        else {
            "val_fraction": 0.15,
            "test_fraction": 0.3,
        }
    )
    train: dict[str, object] = {**TRAIN, "budget": {"minutes": minutes}, **overrides}
    workflow = {
        "pipeline": "unet2d",
        "name": f"gowt1-{mode}",
        "seed": 0,
        "inputs": {"data": str(data)},
        "params": {
            "ingest": {"sequence": "01", "train_on": mode, "split": split},
            "train": train,
            "evaluate": {"split": "test"},
            "export": WEIGHTS_EXPORT,
        },
    }
    path = root / f"{mode}.yaml"
    path.write_text(yaml.safe_dump(workflow))
    result = medseg.run_workflow(path, workspace=root / mode, tracker=NullTracker())
    index = read_index(result.outputs["ingest"]["dataset"])
    frames = {split: {int(case.frame) for case in index.split(split)} for split in ("train", "val", "test")}
    return result.outputs["export"]["export"], frames["train"] | frames["val"], frames["test"], result.metrics


def _score(export: Path, frames: list[int], root: Path, data: Path) -> Any:
    """Segment ``frames`` with ``export`` and score them against the CTC ground truth."""
    segmenter = medseg.Segmenter.from_export(export)
    results, gt = root / "RES", root / "GT"
    for folder in (results, gt / "SEG", gt / "TRA"):
        folder.mkdir(parents=True)
    for frame in frames:
        labels = segmenter.predict(read_image(data / "01" / f"t{frame:03d}.tif"))
        write_image(
            Volume(labels.array.astype(np.uint16), labels.affine, kind="label"),
            results / f"mask{frame:03d}.tif",
        )
        for kind, prefix in (("SEG", "man_seg"), ("TRA", "man_track")):
            name = f"{prefix}{frame:03d}.tif"
            (gt / kind / name).symlink_to(data / "01_GT" / kind / name)
    summary, _ = medseg.evaluate_masks(results, gt, surface=False)
    return summary


def run(
    *, minutes: float = 6.0, data: Path = DATA, train: dict[str, object] | None = None
) -> list[dict[str, object]]:
    """Both runs at ``minutes`` of training each, scored on the same held-out frames.

    ``data`` (a CTC dataset with sequence 01) and ``train`` (train param overrides) shrink it
    for the smoke test.
    """
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        runs = {
            mode: _run(mode, minutes, root, data, train or {}) for mode in ("fully_annotated", "annotated")
        }
        common = sorted(runs["annotated"][2] - runs["fully_annotated"][1])
        markers = [
            len(np.unique(read_image(data / "01_GT" / "TRA" / f"man_track{f:03d}.tif", kind="label").array))
            - 1
            for f in common
        ]
        for mode, (export, used, _test, metrics) in runs.items():
            summary = _score(export, common, root / f"score-{mode}", data)
            rows.append(
                {
                    "training frames (train+val)": f"{mode}: {len(used)}",
                    "budget (min)": minutes,
                    "epochs run": int(metrics.get("train/epochs_run", 0)),
                    "steps/s": round(metrics.get("train/steps_per_s", 0.0), 2),
                    "held-out frames": len(common),
                    "SEG": round(summary.seg, 3),
                    "DET": round(summary.det, 3),
                    "OP_CSB": round(summary.op_csb, 3),
                    "objects/frame": round(summary.objects_per_case, 1),
                    "cells/frame (TRA)": round(float(np.mean(markers)), 1),
                }
            )
    return rows
