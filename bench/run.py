"""Run every benchmark, print the table and write ``bench/RESULTS.md``.

Usage: ``python -m bench.run`` (from the repository root, in the project's environment).
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
from pathlib import Path

from bench import bench_pipeline, bench_seg

BENCHMARKS = {"pipeline": bench_pipeline.run, "seg": bench_seg.run}


def machine() -> str:
    """One line describing this machine and the library versions."""
    import torch

    cpu = platform.processor() or platform.machine()
    return (
        f"{platform.system()} {platform.machine()} ({cpu}), {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, torch {torch.__version__}, CUDA "
        f"{'yes: ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no'}"
    )


def markdown(rows: list[dict[str, object]]) -> str:
    """Rows as a Markdown table (columns from the first row)."""
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    """Run the benchmarks named on the command line (default: all) and write RESULTS.md."""
    names = sys.argv[1:] or list(BENCHMARKS)
    sections = [f"# Benchmark results\n\n{datetime.date.today()}: {machine()}\n"]
    for name in names:
        rows = BENCHMARKS[name]()
        table = markdown(rows)
        print(f"\n## {name}\n{table}")
        about = (sys.modules[BENCHMARKS[name].__module__].__doc__ or "").strip()
        sections.append(f"## {name}\n\n{about}\n\n{table}\n")
    Path(__file__).with_name("RESULTS.md").write_text("\n".join(sections))


if __name__ == "__main__":
    main()
