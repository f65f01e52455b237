"""Pipeline overheads: rerun of an unchanged workflow and CLI start-up, against bare Python.

Each figure is the median of several repetitions, measured side by side in this run:

- rerun: ``medseg run`` of a fully cached workflow (0 stages executed; MLflow parent and 4
  cache-hit child runs recorded) minus ``python -c pass`` — target < 2 s.
- help: ``medseg --help`` minus ``python -c pass`` — target < 0.5 s.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from medseg.demo import write_phantom_ctc
from medseg.resources import shipped_dir

# The figures are for the embedded default: workspace and SQLite store under the working folder.
_ENV = {k: v for k, v in os.environ.items() if k not in {"MLFLOW_TRACKING_URI", "MEDSEG_WORKSPACE"}}


def _wall(command: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    completed = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=_ENV, check=False)
    elapsed = time.perf_counter() - start
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {completed.stderr[-2000:]}")
    return elapsed


def run(*, repetitions: int = 5, frames: int = 24, size: int = 128) -> list[dict[str, object]]:
    """Return rows ``{benchmark, medseg_s, baseline_s, difference_s, target}``."""
    cli = [sys.executable, "-m", "medseg.cli"]
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        write_phantom_ctc(root / "phantom", frames=frames, size=size)
        shutil.copyfile(shipped_dir("workflows") / "demo.yaml", root / "demo.yaml")
        first = subprocess.run(
            [*cli, "run", "demo.yaml"], cwd=root, capture_output=True, text=True, env=_ENV, check=False
        )
        if first.returncode != 0:
            raise RuntimeError(f"demo workflow failed: {first.stderr[-2000:]}")
        bare, rerun, helps = [], [], []
        for _ in range(repetitions):
            bare.append(_wall([sys.executable, "-c", "pass"], root))
            rerun.append(_wall([*cli, "run", "demo.yaml"], root))
            helps.append(_wall([*cli, "--help"], root))
    baseline = statistics.median(bare)
    rows = []
    for name, samples, target in (("rerun, 0 stages executed", rerun, 2.0), ("medseg --help", helps, 0.5)):
        value = statistics.median(samples)
        rows.append(
            {
                "benchmark": name,
                "medseg_s": round(value, 3),
                "baseline_s": round(baseline, 3),
                "difference_s": round(value - baseline, 3),
                "target": f"< {target} s beyond interpreter start",
            }
        )
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
