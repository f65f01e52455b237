"""Cohort inference on Ray vs in this process: throughput with 1 and 2 workers, overhead on one case.

A private Ray instance with this machine's CPUs runs the same ``predict_cohort`` as the
in-process baseline, on GOWT1 ``01`` frames (1024², real data) with a seeded, untrained 2D U-Net
of the demo's size (5 levels, 16–256 channels, 256² windows). Rows: wall seconds of the whole
cohort (starting the workers, importing torch there and loading the model included), the
in-process run with all CPUs as the reference (``ratio`` = its time / this one's), and the
steady throughput once cases flow (cases after the first / seconds from the first result to the
last); the single-case row is the executor's fixed cost. ``pixels_differing`` counts mask pixels
unlike the in-process run's: 0 when each worker runs as many torch threads as the in-process run
(PyTorch's CPU kernels sum in another order with fewer threads; logits differ by ~1e-6).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

GOWT1 = Path(__file__).resolve().parents[2] / "shared" / "data" / "ctc" / "Fluo-N2DH-GOWT1" / "01"


def write_export(folder: Path) -> Path:
    """A demo-sized 2D U-Net export (seeded, untrained: the compute is what is measured)."""
    import torch

    from medseg.nets.unet import NetParams, build_net

    folder.mkdir(parents=True)
    params = NetParams(channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2)
    torch.manual_seed(0)
    net = build_net(params, spatial_dims=2, in_channels=1, out_channels=2)
    torch.save(net.state_dict(), folder / "weights.pt")
    card = {
        "name": "bench",
        "spatial_dims": 2,
        "in_channels": 1,
        "out_channels": 2,
        "net": params.model_dump(mode="json"),
        "preprocessing": {"spatial_dims": 2, "channels": 1, "normalize": {"method": "percentile"}},
        "inference": {"roi_size": [256, 256], "overlap": 0.25, "min_object_size": 0, "fill_holes": False},
    }
    (folder / "model_card.json").write_text(json.dumps(card))
    return folder


def run(*, cases: int = 12) -> list[dict[str, object]]:
    """Rows: in-process, Ray with 1 worker (all CPUs), Ray with one worker per CPU, and one case each way."""
    import ray

    from medseg.inference.cohort import predict_cohort
    from medseg.inference.executors import ExecutorParams
    from medseg.io.readers import read_image
    from medseg.threads import available_cpus

    cpus = available_cpus()
    frames = sorted(GOWT1.glob("t*.tif"))[:cases]
    cohort = [(path.stem, path) for path in frames]
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as name:
            root = Path(name)
            model = write_export(root / "model")
            one_worker = ExecutorParams(kind="ray", workers=1, cpus_per_worker=cpus)
            configurations = [
                ("in-process", cohort, None),
                ("ray, 1 worker", cohort, one_worker),
                (f"ray, {cpus} workers", cohort, ExecutorParams(kind="ray", workers=cpus, cpus_per_worker=1)),
                ("in-process, 1 case", cohort[:1], None),
                ("ray, 1 worker, 1 case", cohort[:1], one_worker),
            ]
            reference: dict[int, float] = {}
            masks: dict[str, np.ndarray] = {}
            for label, chosen, executor in configurations:
                finished: list[float] = []
                start = time.perf_counter()
                results = predict_cohort(
                    model,
                    chosen,
                    root / label.replace(" ", "_").replace(",", ""),
                    "nifti",
                    executor=executor,
                    progress=lambda *_, times=finished: times.append(time.perf_counter()),
                )
                seconds = time.perf_counter() - start
                reference.setdefault(len(chosen), seconds)
                differing = 0
                for item in results:
                    labels = read_image(item.path).array
                    differing += int(np.count_nonzero(masks.setdefault(item.name, labels) != labels))
                steady = (len(finished) - 1) / (finished[-1] - finished[0]) if len(finished) > 1 else None
                rows.append(
                    {
                        "run": label,
                        "cases": len(chosen),
                        "seconds": round(seconds, 2),
                        "ratio_vs_in_process": round(reference[len(chosen)] / seconds, 2),
                        "steady_cases_per_s": round(steady, 2) if steady else "-",
                        "pixels_differing": differing,
                    }
                )
    finally:
        ray.shutdown()
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
