"""Self-configuring training on real data: planned vs hand-set, another dataset untouched, seeds, folds.

Every run uses a shipped example workflow as committed (training values planned from the data's
fingerprint) unless the row says otherwise, the embedded pipeline end to end (ingest, plan and
train, post-processing chosen on validation or out of fold, evaluate on the test split), and is
scored like the Cell Tracking Challenge (SEG over every annotated cell, DET over every TRA
marker, OP_CSB, predicted objects per frame against TRA markers per frame) or by Dice (3D).

- ``planning_3d``: the BraTS 2015 sample (6 MR volumes, FLAIR at 2 mm): the planned example vs
  the hand-set values it had before planning (4-level net 8→64, 48³ patches, batch 2 × 2,
  30 epochs × 4 repeats), each with workflow seeds 0, 1, 2 (each seed deals its own split).
  Dice on each seed's held-out test volume, and the means.
- ``msc``: the GOWT1 example, unchanged but for its data path, on Fluo-C2DL-MSC sequence 01.
- ``seeds``: the GOWT1 example repeated over seeds 0, 1, 2 (one data split) at a smaller steps
  budget: mean ± sd of SEG / DET / OP_CSB.
- ``folds``: the GOWT1 example as a 3-fold ensemble (each fold the same steps budget, trained
  on two thirds of the train+val frames, post-processing chosen out of fold) vs the single
  model, on the same test frames.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import yaml

import medseg
from bench.examples import example_workflow
from medseg.io.dataset import read_index
from medseg.tracking.base import NullTracker

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
GOWT1 = SHARED / "ctc" / "Fluo-N2DH-GOWT1"
MSC = SHARED / "ctc" / "Fluo-C2DL-MSC"
BRATS = SHARED / "nifti" / "brats2015-sample" / "examples" / "dataForExamples" / "brats2015TrainingData"
HAND_SET_3D = {
    "spatial_dims": 3,
    "net": {"channels": [8, 16, 32, 64], "strides": [2, 2, 2], "num_res_units": 1},
    "target": "foreground",
    "select_on": "dice",
    "epochs": 30,
    "epoch_repeats": 4,
    "batch_size": 2,
    "patch_size": [48, 48, 48],
    "samples_per_image": 2,
    "val_every": 5,
}


def _run(example: str, root: Path, *, data: Path, name: str, **changes: Any) -> medseg.WorkflowResult:
    """Run a shipped example with its data path, train params and top-level keys changed."""
    document = example_workflow(example, data, changes.pop("train", {}), **changes, name=name)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document))
    return medseg.run_workflow(path, workspace=root / "ws", tracker=NullTracker())


def _cells(label: str, metrics: dict[str, float], seconds: float, suffix: str = "") -> dict[str, object]:
    return {
        "run": label,
        "train_s": round(seconds, 1),
        "SEG": round(metrics[f"eval/seg{suffix}"], 3),
        "DET": round(metrics[f"eval/det{suffix}"], 3),
        "OP_CSB": round(metrics[f"eval/op_csb{suffix}"], 3),
        "objects/frame": round(metrics[f"eval/objects_per_case{suffix}"], 1),
    }


def planning_3d(
    *, data: Path = BRATS, steps: int | None = None, seeds: tuple[int, ...] = (0, 1, 2)
) -> list[dict[str, object]]:
    """BraTS: the planned example vs its former hand-set values, once per seed (``steps`` shrinks both).

    The workflow seed deals the split too, so each seed holds out its own test volume (one of
    six); the last rows are the means over seeds.
    """
    rows: list[dict[str, object]] = []
    labels = {"planned": "planned (example as committed)", "hand": "hand-set (the example before planning)"}
    with tempfile.TemporaryDirectory() as tmp:
        budget = {} if steps is None else {"budget": {"steps": steps}}
        hand = {**HAND_SET_3D, **({"epochs": 1, "epoch_repeats": 1} if steps is not None else {})}
        for seed in seeds:
            root = Path(tmp) / f"seed{seed}"
            root.mkdir()
            for name, train in (("planned", budget), ("hand", hand)):
                result = _run("brats_unet3d.yaml", root, data=data, name=name, seed=seed, train=train)
                test = read_index(result.outputs["ingest"]["dataset"]).split("test")
                rows.append(
                    {
                        "run": f"{labels[name]}, seed {seed}",
                        "train_s": round(result.seconds["train"], 1),
                        "dice": round(result.metrics["eval/dice"], 3),
                        "iou": round(result.metrics["eval/iou"], 3),
                        "test volume": ", ".join(case.case_id for case in test),
                    }
                )
    for label in labels.values():
        own = [row for row in rows if str(row["run"]).startswith(label)]
        rows.append(
            {
                "run": f"{label}, mean of {len(own)} seeds",
                "train_s": round(sum(float(row["train_s"]) for row in own) / len(own), 1),
                "dice": round(sum(float(row["dice"]) for row in own) / len(own), 3),
                "iou": round(sum(float(row["iou"]) for row in own) / len(own), 3),
                "test volume": "",
            }
        )
    return rows


def msc(*, data: Path = MSC, steps: int | None = None) -> list[dict[str, object]]:
    """The GOWT1 example untouched on MSC (``steps`` shrinks it for the smoke test)."""
    with tempfile.TemporaryDirectory() as tmp:
        train = {} if steps is None else {"budget": {"steps": steps}}
        result = _run("gowt1_unet2d.yaml", Path(tmp), data=data, name="msc", train=train)
        return [_cells("GOWT1 example on MSC 01", result.metrics, result.seconds["train"])]


def seeds(*, data: Path = GOWT1, steps: int = 200) -> list[dict[str, object]]:
    """The GOWT1 example over seeds 0, 1, 2 at ``steps`` optimiser steps each."""
    with tempfile.TemporaryDirectory() as tmp:
        result = _run(
            "gowt1_unet2d.yaml",
            Path(tmp),
            data=data,
            name="seeds",
            seeds=[0, 1, 2],
            train={"budget": {"steps": steps}},
        )
        rows = [
            _cells(f"seed {seed} ({steps} steps)", repeat.metrics, repeat.seconds["train"])
            for seed, repeat in result.repeats.items()
        ]
        seconds = sum(repeat.seconds["train"] for repeat in result.repeats.values()) / len(result.repeats)
        spread = {
            key: f"{result.metrics[f'eval/{name}_mean']:.3f} ± {result.metrics[f'eval/{name}_sd']:.3f}"
            for key, name in (
                ("SEG", "seg"),
                ("DET", "det"),
                ("OP_CSB", "op_csb"),
                ("objects/frame", "objects_per_case"),
            )
        }
        rows.append({"run": "mean ± sd over 3 seeds", "train_s": round(seconds, 1), **spread})
    return rows


def folds(*, data: Path = GOWT1, steps: int = 200, k: int = 3) -> list[dict[str, object]]:
    """A ``k``-fold ensemble vs the single model, ``steps`` per model, same test frames."""
    with tempfile.TemporaryDirectory() as tmp:
        budget = {"budget": {"steps": steps}}
        single = _run("gowt1_unet2d.yaml", Path(tmp), data=data, name="single", train=budget)
        ensemble = _run("gowt1_unet2d.yaml", Path(tmp), data=data, name="folds", train={**budget, "folds": k})
        return [
            _cells(f"single model ({steps} steps)", single.metrics, single.seconds["train"]),
            _cells(
                f"{k}-fold ensemble ({steps} steps per fold)", ensemble.metrics, ensemble.seconds["train"]
            ),
        ]
