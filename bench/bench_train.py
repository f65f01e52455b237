"""Training step: medseg's train loop vs a plain MONAI/PyTorch loop, same net, data and transforms.

Both loops train the same MONAI U-Net on the same phantom cases (in memory), with the same
patch sampling and augmentation (medseg's transform preset), batch, Dice+CE loss and AdamW;
medseg's loop adds what it does in a real run: per-epoch reseeding, the LR schedule, the
per-epoch checkpoint (written to a temp folder) and the metric callback. Validation is off in
both. The figure is the median seconds per optimiser step over repetitions (after one warm-up
run), and the ratio medseg / plain (target ≤ 1.05). On CUDA, both use AMP (float16 autocast
with a gradient scaler). On a CPU a second row runs medseg's loop with ``train.compile`` (its
one-off compile falls in the warm-up run) against the same plain eager loop: its ratio is the
speed-up a compiled step buys (target < 1).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from medseg.demo import phantom_frame
from medseg.nets.unet import build_net
from medseg.training.augment import train_transforms
from medseg.training.checkpoint import CHECKPOINT_FILE
from medseg.training.loop import TrainingCase, prepare_sample, resolve_device, train_segmentation
from medseg.training.params import TrainParams


def phantom_cases(count: int, size: int) -> list[TrainingCase]:
    """``count`` phantom frames ``(1, size, size)`` with instance labels."""
    cases = []
    for index in range(count):
        image, labels, _ = phantom_frame(np.random.default_rng(index), size, max(4, size // 12))
        image = (image / image.max()).astype(np.float32)[None]
        cases.append(TrainingCase.in_memory(f"case_{index:04d}", image, labels.astype(np.int32)))
    return cases


def plain_loop(cases: list[TrainingCase], params: TrainParams, device: torch.device) -> int:
    """A hand-written MONAI loop: Dataset + DataLoader + UNet + DiceCELoss + AdamW; returns steps."""
    from monai.data import DataLoader, Dataset
    from monai.losses import DiceCELoss

    torch.manual_seed(0)
    net = build_net(params.net, spatial_dims=2, in_channels=1, out_channels=2).to(device)
    optimizer = torch.optim.AdamW(
        net.parameters(), lr=params.optim.lr, weight_decay=params.optim.weight_decay
    )
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    amp = device.type == "cuda" and params.amp
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    samples = [prepare_sample(case, params) for case in cases] * params.epoch_repeats
    loader = DataLoader(
        Dataset(samples, train_transforms(params)), batch_size=params.batch_size, shuffle=True
    )
    steps = 0
    for _ in range(params.epochs):
        net.train()
        for batch in loader:
            images, labels = batch["image"].to(device), batch["label"].to(device)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, enabled=amp):
                logits = net(images)
            loss = loss_fn(logits.float(), labels)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            steps += 1
    return steps


def medseg_loop(cases: list[TrainingCase], params: TrainParams, folder: Path) -> int:
    """medseg's ``train_segmentation`` with a checkpoint per epoch; returns steps."""
    result = train_segmentation(
        cases,
        [],
        params,
        seed=0,
        on_epoch=lambda epoch, metrics: None,
        progress=lambda *args: None,
        checkpoint=folder / CHECKPOINT_FILE,
    )
    (folder / CHECKPOINT_FILE).unlink()
    return result.steps_run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(
    *, repetitions: int = 3, epochs: int = 3, cases: int = 8, size: int = 256, compiled: bool = True
) -> list[dict[str, object]]:
    """One row per configuration: seconds per step of both loops and their ratio.

    ``compiled`` adds the CPU row of medseg's loop with ``train.compile`` (a minute of compiling).
    """
    device = resolve_device("auto")
    configurations: dict[str, dict[str, object]] = {"UNet 16-128, 4×4 patches 128²": {}}
    if device.type == "cuda":  # the paper's 31 M-parameter net takes seconds per step on a CPU
        configurations["Ronneberger 64-1024, 4×4 patches 128²"] = {"net": {"architecture": "ronneberger"}}
    elif compiled:
        configurations["UNet 16-128, 4×4 patches 128², medseg compiled"] = {"compile": True}
    data = phantom_cases(cases, size)
    rows = []
    for name, overrides in configurations.items():
        params = TrainParams.model_validate(
            {
                "epochs": epochs,
                "batch_size": 4,
                "samples_per_image": 4,
                "patch_size": [min(128, size)] * 2,
                "epoch_repeats": 5,
                "schedule": "constant",
                **overrides,
            }
        )
        timings: dict[str, list[float]] = {"medseg": [], "plain": []}
        with tempfile.TemporaryDirectory() as folder:
            medseg_loop(data, params.model_copy(update={"epochs": 1}), Path(folder))  # warm-up
            loops = {
                "plain": lambda params=params: plain_loop(data, params, device),
                "medseg": lambda params=params, folder=folder: medseg_loop(data, params, Path(folder)),
            }
            for _ in range(repetitions):
                for loop_name, loop in loops.items():
                    _sync(device)
                    start = time.perf_counter()
                    steps = loop()
                    _sync(device)
                    timings[loop_name].append((time.perf_counter() - start) / steps)
        medseg_s, plain_s = statistics.median(timings["medseg"]), statistics.median(timings["plain"])
        rows.append(
            {
                "benchmark": f"train step, {name}, {device.type}",
                "medseg_s_per_step": round(medseg_s, 4),
                "plain_monai_s_per_step": round(plain_s, 4),
                "ratio": round(medseg_s / plain_s, 3),
                "target": "ratio < 1" if overrides.get("compile") else "ratio <= 1.05",
            }
        )
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
