"""Touching-cell separation: boundary-aware training vs plain foreground, same CPU budget.

Runs the shipped GOWT1 example as committed (``workflows/examples/gowt1_unet2d.yaml``: real Cell
Tracking Challenge data, every annotated frame, its steps budget — cut short by its minutes only
on a machine too slow for the steps —, the other training values planned from the data) once per
variant, changing only the target and the loss:

- ``foreground`` + Dice/CE: instances are connected components of the foreground;
- ``foreground`` + Dice + the U-Net paper's border-weighted CE (w0 = 10, σ = 5 px);
- ``boundary`` + Dice/CE (the shipped default): background / interior / border classes,
  instances grown from interior seeds.

Every variant has the same net, steps, patches, seed and validation schedule; the table gives
the test split's SEG (every annotated cell of the test frames), foreground IoU/Dice (the fully
annotated test frames), and the train stage's seconds.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import yaml

import medseg
from bench.examples import example_workflow
from medseg.tracking.base import NullTracker

VARIANTS = {
    "foreground, Dice+CE": {"target": "foreground", "loss": {"name": "dice_ce"}},
    "foreground, Dice + border-weighted CE (paper)": {
        "target": "foreground",
        "loss": {"name": "dice_border_ce"},
    },
    "boundary (interior/border), Dice+CE": {"target": "boundary", "loss": {"name": "dice_ce"}},
}

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ctc" / "Fluo-N2DH-GOWT1"


def run(*, data: Path = DATA, train: dict[str, object] | None = None) -> list[dict[str, object]]:
    """One row per variant; ``data``/``train`` shrink the run for the smoke test."""
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, overrides in VARIANTS.items():
            document = example_workflow("gowt1_unet2d.yaml", data, {**(train or {}), **overrides})
            path = Path(folder) / f"{len(rows)}.yaml"
            path.write_text(yaml.safe_dump(document))
            result = medseg.run_workflow(path, workspace=Path(folder) / "ws", tracker=NullTracker())
            metrics = result.metrics
            rows.append(
                {
                    "variant": name,
                    "seg": round(metrics["eval/seg"], 4),
                    "iou": round(metrics["eval/iou"], 4),
                    "dice": round(metrics["eval/dice"], 4),
                    "matched": int(metrics["eval/matched"]),
                    "n_reference": int(metrics["eval/n_reference"]),
                    "train_s": round(result.seconds["train"], 1),
                }
            )
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
