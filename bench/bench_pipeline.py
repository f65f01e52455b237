"""Pipeline overheads: rerun of an unchanged workflow and CLI start-up, as a user times them.

Each figure is the median of several repetitions, wall time of the whole command from a fresh
process, measured side by side in this run:

- rerun: ``medseg run`` of a fully cached workflow (0 stages executed; MLflow parent and 5
  cache-hit child runs recorded, with dataset inputs) through the warm tracking daemon, against
  the same rerun tracking in-process (``MEDSEG_TRACKING_DAEMON=0``: import MLflow, open the
  SQLite store) — target < 2 s wall.
- help: ``medseg --help`` against ``python -c pass`` — target < 0.5 s beyond interpreter start.

``concurrency``: one ``medseg run`` of the demo workflow alone, then two at once in separate
workspaces, with medseg's thread settings (threads = allowed CPUs, ``GOMP_SPINCOUNT=10000``)
against two at once with GNU OpenMP's default spinning (``GOMP_SPINCOUNT=300000``, what a
process got before) — target: two at once ≤ 2.3× one run's wall time.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench.examples import WEIGHTS_EXPORT
from medseg.demo import write_phantom_ctc
from medseg.resources import shipped_dir

# The figures are for the embedded default: workspace and SQLite store under the working folder.
_ENV = {k: v for k, v in os.environ.items() if k not in {"MLFLOW_TRACKING_URI", "MEDSEG_WORKSPACE"}}


def _wall(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    completed = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env or _ENV, check=False)
    elapsed = time.perf_counter() - start
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {completed.stderr[-2000:]}")
    return elapsed


def _demo(root: Path, *, epochs: int, frames: int, size: int, weights_only: bool) -> None:
    """The demo workflow in ``root`` (phantom data beside it), training ``epochs`` epochs.

    ``weights_only`` exports weights and card only (``WEIGHTS_EXPORT``: the smoke test's 14 s of
    ``torch.export``, ONNX conversion and MLflow model per run saved; the figures measure reruns
    and training, not the export).
    """
    write_phantom_ctc(root / "phantom", frames=frames, size=size)
    workflow = yaml.safe_load((shipped_dir("workflows") / "demo.yaml").read_text())
    workflow["params"]["train"]["epochs"] = epochs
    if weights_only:
        workflow["params"]["export"] = WEIGHTS_EXPORT
    (root / "demo.yaml").write_text(yaml.safe_dump(workflow))


def run(
    *, repetitions: int = 5, epochs: int = 60, frames: int = 24, size: int = 128, weights_only: bool = False
) -> list[dict[str, object]]:
    """Return rows ``{benchmark, medseg_s, baseline, baseline_s, ratio, target}``."""
    cli = [sys.executable, "-m", "medseg.cli"]
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        _demo(root, epochs=epochs, frames=frames, size=size, weights_only=weights_only)
        warm_env = {**_ENV, "MEDSEG_TRACKING_DAEMON": "300"}
        cold_env = {**_ENV, "MEDSEG_TRACKING_DAEMON": "0"}
        _wall([*cli, "run", "demo.yaml"], root, warm_env)  # trains; starts the daemon
        _wall([*cli, "run", "demo.yaml"], root, warm_env)  # the daemon is up by now
        bare, warm, cold, helps = [], [], [], []
        for _ in range(repetitions):
            bare.append(_wall([sys.executable, "-c", "pass"], root))
            warm.append(_wall([*cli, "run", "demo.yaml"], root, warm_env))
            cold.append(_wall([*cli, "run", "demo.yaml"], root, cold_env))
            helps.append(_wall([*cli, "--help"], root))
    # The daemon exits by itself once its store file is gone with the folder.
    return [
        _row(
            "rerun, 0 stages executed (tracking daemon warm)",
            statistics.median(warm),
            "same rerun, in-process tracking",
            statistics.median(cold),
            "< 2 s wall",
            digits=3,
        ),
        _row(
            "medseg --help",
            statistics.median(helps),
            "python -c pass",
            statistics.median(bare),
            "< 0.5 s beyond interpreter start",
            digits=3,
        ),
    ]


def _row(
    name: str, seconds: float, baseline: str, baseline_seconds: float, target: str, *, digits: int
) -> dict[str, object]:
    """A table row: medseg's seconds beside the baseline's, and their ratio."""
    return {
        "benchmark": name,
        "medseg_s": round(seconds, digits),
        "baseline": baseline,
        "baseline_s": round(baseline_seconds, digits),
        "ratio": round(seconds / baseline_seconds, 2),
        "target": target,
    }


def concurrency(
    *, epochs: int = 60, frames: int = 24, size: int = 128, baseline: bool = True, weights_only: bool = False
) -> list[dict[str, object]]:
    """Two demo trainings at once against one alone, and against OpenMP's default spinning."""
    cli = [sys.executable, "-m", "medseg.cli"]
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        _demo(root, epochs=epochs, frames=frames, size=size, weights_only=weights_only)
        env = {**_ENV, "MEDSEG_TRACKING_DAEMON": "0"}

        def together(count: int, extra: dict[str, str], tag: str) -> float:
            start = time.perf_counter()
            processes = [
                subprocess.Popen(
                    [*cli, "run", "demo.yaml", "--workspace", f"ws-{tag}-{index}"],
                    cwd=root,
                    env={**env, **extra},
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                for index in range(count)
            ]
            if any([process.wait() != 0 for process in processes]):  # wait for all, then judge
                raise RuntimeError(f"a concurrent demo run failed ({tag})")
            return time.perf_counter() - start

        one = together(1, {}, "one")
        two = together(2, {}, "two")
        spinning = together(2, {"GOMP_SPINCOUNT": "300000"}, "spin") if baseline else float("nan")
    return [
        _row(f"two demo runs at once ({epochs} epochs each)", two, "one run alone", one, "≤ 2.3", digits=1),
        _row(
            "two at once, OpenMP default spinning (before)", spinning, "one run alone", one, "(was)", digits=1
        ),
    ]


if __name__ == "__main__":
    for row in run():
        print(row)
