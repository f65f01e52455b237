"""Inference: medseg's Segmenter vs MONAI sliding_window_inference with the same net and overlap.

The baseline is what a hand-written script does: normalise, Gaussian-blended sliding windows,
argmax. The Segmenter does that and also what it owes its callers: the model card's geometry
(RAS+ check), the task's post-processing into instances and the label Volume in the input's
geometry. Inputs: a large 2D image (a real GOWT1 frame tiled to 2048², or a phantom where the
data is absent) and a CT-like 3D volume; median seconds over repetitions run alternately,
ratio medseg / baseline. Peak RSS: each side segments a 512×512×300 float32 volume in a fresh process
(``ru_maxrss``, target < 4 GiB for medseg).
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from medseg.inference.card import ModelCard
from medseg.inference.segmenter import Segmenter
from medseg.inference.settings import InferenceSettings
from medseg.io.preprocessing import NormalizeParams, Preprocessing
from medseg.io.volume import Volume, affine_from_spacing
from medseg.nets.unet import NetParams, build_net

GOWT1_FRAME = Path(__file__).resolve().parents[2] / "shared/data/ctc/Fluo-N2DH-GOWT1/01/t000.tif"


def make_segmenter(spatial_dims: int, roi: tuple[int, ...], channels: tuple[int, ...]) -> Segmenter:
    """A seeded, untrained U-Net with a foreground card (time does not depend on the weights)."""
    params = NetParams(channels=channels, strides=(2,) * (len(channels) - 1), num_res_units=1)
    torch.manual_seed(0)
    net = build_net(params, spatial_dims=spatial_dims, in_channels=1, out_channels=2)
    card = ModelCard(
        spatial_dims=spatial_dims,
        in_channels=1,
        out_channels=2,
        net=params,
        preprocessing=Preprocessing(
            spatial_dims=spatial_dims, channels=1, normalize=NormalizeParams(method="zscore")
        ),
        inference=InferenceSettings(roi_size=roi, overlap=0.25, min_object_size=10, fill_holes=True),
    )
    return Segmenter(net, card)


def baseline(segmenter: Segmenter, image: np.ndarray) -> np.ndarray:
    """The hand-written MONAI script: z-score, sliding_window_inference (Gaussian), argmax."""
    from monai.inferers import sliding_window_inference

    data = (image - image.mean()) / max(float(image.std()), 1e-6)
    batch = torch.as_tensor(data, dtype=torch.float32)[None, None]
    roi = segmenter.card.inference.roi_size
    with torch.inference_mode():
        logits = sliding_window_inference(batch, roi, 4, segmenter.module, overlap=0.25, mode="gaussian")
    return logits.argmax(dim=1)[0].numpy()


def paired(first, second, repetitions: int) -> tuple[float, float]:
    """Median seconds of ``first()`` and ``second()``, run alternately after one warm-up each.

    Alternating keeps slow drifts of the machine (other processes, frequency) out of the ratio.
    """
    first(), second()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repetitions):
        for function, seconds in ((first, times[0]), (second, times[1])):
            start = time.perf_counter()
            function()
            seconds.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def image_2d(size: int) -> np.ndarray:
    """A real GOWT1 frame tiled to ``size``² (a phantom frame where the data is absent)."""
    if GOWT1_FRAME.is_file():
        import tifffile

        frame = tifffile.imread(GOWT1_FRAME).astype(np.float32)
    else:
        from medseg.demo import phantom_frame

        frame = phantom_frame(np.random.default_rng(0), 256, 20)[0].astype(np.float32)
    reps = (-(-size // frame.shape[0]), -(-size // frame.shape[1]))
    return np.tile(frame, reps)[:size, :size]


def volume_3d(shape: tuple[int, int, int]) -> np.ndarray:
    """A CT-like volume: air around a body ellipsoid with soft-tissue noise (HU)."""
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape], indexing="ij"))
    body = (grid[0] ** 2 / 0.8 + grid[1] ** 2 / 0.6 + grid[2] ** 2) < 0.9
    volume = np.where(body, 40.0, -1000.0).astype(np.float32)
    volume += rng.normal(0, 20, shape).astype(np.float32)
    return volume


def peak_rss(side: str, shape: tuple[int, int, int]) -> float:
    """Peak resident memory (GiB) of a fresh process segmenting a ``shape`` volume."""
    code = (
        "import json, resource, sys; sys.path.insert(0, '.');"
        "from bench.bench_inference import rss_child; rss_child(sys.argv[1], json.loads(sys.argv[2]))"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", code, side, json.dumps(list(shape))],
        capture_output=True,
        text=True,
        check=True,
        cwd=root,
    )
    return float(done.stdout.strip().splitlines()[-1])


def rss_child(side: str, shape: list[int]) -> None:
    """Body of the ``peak_rss`` process: segment, then print peak RSS in GiB."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    segmenter = make_segmenter(3, (96, 96, 64), (8, 16, 32))
    image = volume_3d(tuple(shape))
    if side == "medseg":
        segmenter.predict(Volume(image[None], affine_from_spacing((0.8, 0.8, 1.0))))
    else:
        baseline(segmenter, image)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)


def run(
    repetitions: int = 5,
    size_2d: int = 2048,
    shape_3d: tuple[int, int, int] = (256, 256, 128),
    rss_shape: tuple[int, int, int] | None = (512, 512, 300),
) -> list[dict[str, object]]:
    """Rows: 2D and 3D speed ratios, and peak RSS of both sides on ``rss_shape``."""
    rows: list[dict[str, object]] = []
    cases = [
        ("2D image", image_2d(size_2d), make_segmenter(2, (256, 256), (16, 32, 64, 128)), (1.0, 1.0)),
        ("3D volume", volume_3d(shape_3d), make_segmenter(3, (96, 96, 64), (8, 16, 32)), (0.8, 0.8, 1.0)),
    ]
    for name, image, segmenter, spacing in cases:
        volume = Volume(image[None], affine_from_spacing(spacing))
        medseg_s, base_s = paired(
            lambda volume=volume, s=segmenter: s.predict(volume),
            lambda image=image, s=segmenter: baseline(s, image),
            repetitions,
        )
        rows.append(
            {
                "benchmark": f"{name} {'×'.join(map(str, image.shape))}",
                "medseg": round(medseg_s, 3),
                "monai_sliding_window": round(base_s, 3),
                "unit": "s",
                "ratio": round(medseg_s / base_s, 3),
            }
        )
    if rss_shape is not None:
        medseg_gib, base_gib = peak_rss("medseg", rss_shape), peak_rss("monai", rss_shape)
        rows.append(
            {
                "benchmark": f"peak RSS, 3D {'×'.join(map(str, rss_shape))} float32",
                "medseg": round(medseg_gib, 2),
                "monai_sliding_window": round(base_gib, 2),
                "unit": "GiB",
                "ratio": round(medseg_gib / base_gib, 3),
            }
        )
    return rows
