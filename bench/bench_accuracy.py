"""Accuracy at equal CPU budget on real data: medseg's default 2D workflow vs a plain MONAI script.

medseg runs the shipped GOWT1 example (``workflows/examples/gowt1_unet2d.yaml``, Fluo-N2DH-GOWT1
sequence 01 from ../shared/data, the default boundary-aware 2D pipeline). The baseline is the
script a researcher writes from the MONAI tutorials: the same U-Net, foreground Dice+CE,
random 256² crops with flips and 90° rotations, Adam, trained for the same wall-clock seconds as
medseg's train stage on the fully annotated frames among medseg's train and validation frames
(what the data's README says a naive loss needs: on the sparse frames it learns that cells are
background), then Gaussian sliding-window inference, argmax and connected components. Both are
scored by the same code on the same held-out test split (SEG over every annotated cell of the
test frames; IoU/Dice on its fully annotated frames). With ``NNUNET_PYTHON`` naming an
interpreter that has ``nnunetv2`` installed, nnU-Net v2's 2d configuration (its defaults, CPU)
joins the table with the same budget and data (``bench/nnunet_baseline.py``); its foreground
becomes instances by connected components.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

import medseg
from bench.examples import example_workflow
from medseg.tracking.base import NullTracker

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ctc" / "Fluo-N2DH-GOWT1"
MSC = DATA.parent / "Fluo-C2DL-MSC"


def plain_monai(
    images: list[np.ndarray], labels: list[np.ndarray], *, seconds: float, patch: int, seed: int = 0
) -> torch.nn.Module:
    """Train a MONAI UNet on foreground for ``seconds`` of wall clock; return it in eval mode."""
    from monai.data import DataLoader, Dataset
    from monai.losses import DiceCELoss
    from monai.networks.nets import UNet
    from monai.transforms import Compose, RandFlipd, RandRotate90d, RandSpatialCropSamplesd

    torch.manual_seed(seed)
    net = UNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=2,
        channels=(16, 32, 64, 128),
        strides=(2, 2, 2),
        num_res_units=2,
    )
    transform = Compose(
        [
            RandSpatialCropSamplesd(
                ["image", "label"], roi_size=(patch, patch), num_samples=4, random_size=False
            ),
            RandFlipd(["image", "label"], prob=0.5, spatial_axis=0),
            RandFlipd(["image", "label"], prob=0.5, spatial_axis=1),
            RandRotate90d(["image", "label"], prob=0.5),
        ]
    )
    samples = [
        {"image": image[None].astype(np.float32), "label": (label > 0)[None].astype(np.float32)}
        for image, label in zip(images, labels, strict=True)
    ]
    loader = DataLoader(Dataset(samples, transform), batch_size=1, shuffle=True)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    deadline = time.perf_counter() + seconds
    net.train()
    while time.perf_counter() < deadline:
        for batch in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(net(batch["image"]), batch["label"])
            loss.backward()
            optimizer.step()
            if time.perf_counter() >= deadline:
                break
    return net.eval()


def plain_predict(net: torch.nn.Module, image: np.ndarray, patch: int) -> np.ndarray:
    """Sliding-window argmax and connected components: instance labels ``(H, W)``."""
    from monai.inferers import sliding_window_inference
    from scipy import ndimage

    with torch.inference_mode():
        logits = sliding_window_inference(
            torch.as_tensor(image, dtype=torch.float32)[None, None],
            (patch, patch),
            4,
            net,
            overlap=0.25,
            mode="gaussian",
        )
    return ndimage.label(logits.argmax(dim=1)[0].numpy() > 0)[0]


def nnunet(python: str, dataset: Path, index: Any, budget: float, work: Path) -> tuple[str, dict[str, float]]:
    """nnU-Net v2 2d trained for ``budget`` seconds in its own venv, scored like the others."""
    from PIL import Image
    from scipy import ndimage

    from medseg.io.dataset import load_case, load_markers
    from medseg.metrics.evaluate import evaluate_case, summarize

    script = Path(__file__).with_name("nnunet_baseline.py")
    subprocess.run(
        [python, str(script), str(dataset), str(work), str(budget)], check=True, capture_output=True
    )
    info = json.loads((work / "nnunet.json").read_text())
    cases = []
    for record in index.split("test"):
        _, label = load_case(dataset, record)
        foreground = np.asarray(Image.open(work / "pred" / f"{record.case_id}.png")) > 0
        markers = load_markers(dataset, record)
        cases.append(
            evaluate_case(
                record.case_id,
                label.array[0],
                ndimage.label(foreground)[0],
                markers=None if markers is None else markers.array[0],
                surface=False,
                fully_annotated=record.fully_annotated,
            )
        )
    name = (
        f"nnU-Net v2 2d, CPU ({info['iterations']} iterations of batch {info['batch_size']} × "
        f"{'×'.join(map(str, info['patch_size']))}; predict {info['predict_s']} s)"
    )
    return name, summarize(cases).as_metrics("eval")


def run(*, data: Path = DATA, train: dict[str, object] | None = None) -> list[dict[str, object]]:
    """Two rows, medseg and the plain script; ``data``/``train`` shrink the run for the smoke test."""
    from medseg.io.dataset import load_case, load_markers, read_index
    from medseg.metrics.evaluate import evaluate_case, summarize

    with tempfile.TemporaryDirectory() as folder:
        document = example_workflow("gowt1_unet2d.yaml", data, train)
        path = Path(folder) / "study.yaml"
        path.write_text(yaml.safe_dump(document))
        result = medseg.run_workflow(path, workspace=Path(folder) / "ws", tracker=NullTracker())
        budget = result.seconds["train"]
        dataset = result.outputs["ingest"]["dataset"]
        index = read_index(dataset)
        plan = json.loads((result.outputs["train"]["model"] / "plan.json").read_text())
        patch = int(plan["values"]["patch_size"][0])  # the plan's patch, for the same window
        fully = [record for record in index.split("train") + index.split("val") if record.fully_annotated]
        training = [load_case(dataset, record) for record in fully or index.split("train")]
        net = plain_monai(
            [image.array[0] for image, _ in training],
            [label.array[0] for _, label in training],
            seconds=budget,
            patch=patch,
        )
        cases = []
        for record in index.split("test"):
            image, label = load_case(dataset, record)
            predicted = plain_predict(net, image.array[0], patch)
            markers = load_markers(dataset, record)
            cases.append(
                evaluate_case(
                    record.case_id,
                    label.array[0],
                    predicted,
                    markers=None if markers is None else markers.array[0],
                    surface=False,
                    fully_annotated=record.fully_annotated,
                )
            )
        plain = summarize(cases).as_metrics("eval")
        baseline = "plain MONAI script" + (f" ({len(training)} fully annotated frames)" if fully else "")
        compared = [("medseg default 2D workflow", result.metrics), (baseline, plain)]
        if os.environ.get("NNUNET_PYTHON"):
            compared.append(
                nnunet(os.environ["NNUNET_PYTHON"], dataset, index, budget, Path(folder) / "nnunet")
            )
    rows = []
    for name, metrics in compared:
        rows.append(
            {
                "method": name,
                "train_s": round(budget, 1),
                "seg": round(metrics["eval/seg"], 4),
                "det": round(metrics.get("eval/det", float("nan")), 4),
                "op_csb": round(metrics.get("eval/op_csb", float("nan")), 4),
                "objects/frame": round(metrics["eval/objects_per_case"], 1),
                "iou": round(metrics["eval/iou"], 4),
                "dice": round(metrics["eval/dice"], 4),
                "matched": int(metrics["eval/matched"]),
                "n_reference": int(metrics["eval/n_reference"]),
            }
        )
    return rows


def msc() -> list[dict[str, object]]:
    """The same three on Fluo-C2DL-MSC sequence 01, the GOWT1 example untouched but for its data."""
    return run(data=MSC)
