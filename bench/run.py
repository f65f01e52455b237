"""Run every benchmark, print the table and write ``bench/RESULTS.md``.

Usage: ``python -m bench.run`` (from the repository root, in the project's environment).
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
from pathlib import Path

from bench import (
    bench_accuracy,
    bench_dicom,
    bench_inference,
    bench_pipeline,
    bench_planning,
    bench_ray,
    bench_seg,
    bench_sparse,
    bench_targets,
    bench_train,
)

BENCHMARKS = {
    "train": bench_train.run,
    "targets": bench_targets.run,
    "pipeline": bench_pipeline.run,
    "concurrency": bench_pipeline.concurrency,
    "seg": bench_seg.run,
    "dicom": bench_dicom.run,
    "inference": bench_inference.run,
    "ray": bench_ray.run,
    "accuracy": bench_accuracy.run,
    "accuracy_msc": bench_accuracy.msc,
    "sparse": bench_sparse.run,
    "planning_3d": bench_planning.planning_3d,
    "msc": bench_planning.msc,
    "seeds": bench_planning.seeds,
    "folds": bench_planning.folds,
}


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


def previous_sections(path: Path) -> dict[str, str]:
    """The ``## name`` sections of an existing RESULTS.md (each with its own date line)."""
    if not path.is_file():
        return {}
    sections = {}
    for block in path.read_text().split("\n## ")[1:]:
        name = block.split("\n", 1)[0].strip()
        sections[name] = "## " + block.rstrip() + "\n"
    return sections


def with_earlier_notes(measured: str, previous: str | None) -> str:
    """A re-measured section followed by the notes people wrote under the previous run's table.

    A section is its heading, date line, description and table, then any notes written by hand.
    Those notes name the previous run's figures, so they are kept after the new table together
    with that table and its date; a previous section with no notes is simply replaced.
    """
    if previous is None:
        return measured
    lines = previous.rstrip("\n").split("\n")
    table = [number for number, line in enumerate(lines) if line.startswith("|")]
    if not table:
        return measured
    end = table[0]
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    notes = "\n".join(lines[end:]).strip()
    if not notes:
        return measured
    when = lines[2] if len(lines) > 2 else "an earlier date"
    earlier_table = "\n".join(lines[table[0] : end])
    return f"{measured}\nThe previous run ({when}) and its notes:\n\n{earlier_table}\n\n{notes}\n"


def _about(name: str) -> str:
    """A section's description: its module's docstring, or for the later benchmarks of a module
    that runs several, the function's own docstring and where the setup is described."""
    function = BENCHMARKS[name]
    siblings = [other for other, f in BENCHMARKS.items() if f.__module__ == function.__module__]
    if siblings[0] == name:
        return (sys.modules[function.__module__].__doc__ or "").strip()
    return f"{(function.__doc__ or '').strip()} (setup: section {siblings[0]})"


def main() -> None:
    """Run the benchmarks named on the command line (default: all) and update RESULTS.md.

    Sections of benchmarks not run this time are kept as they were, each with the date and
    machine it was measured on; a section run again keeps the notes written under its previous
    table (:func:`with_earlier_notes`); figures measured on a GPU get their own ``(cuda)`` section.
    """
    names = sys.argv[1:] or list(BENCHMARKS)
    path = Path(__file__).with_name("RESULTS.md")
    import torch

    suffix = " (cuda)" if torch.cuda.is_available() else ""  # GPU figures sit beside the CPU ones
    measured = {}
    for name in names:
        rows = BENCHMARKS[name]()
        table = markdown(rows)
        print(f"\n## {name}{suffix}\n{table}")
        about = _about(name)
        measured[name + suffix] = (
            f"## {name}{suffix}\n\n{datetime.date.today()}: {machine()}\n\n{about}\n\n{table}\n"
        )
    # Read the file only now: a run takes up to an hour, and other sections edited meanwhile stay.
    previous = previous_sections(path)
    sections = {
        **previous,
        **{key: with_earlier_notes(text, previous.get(key)) for key, text in measured.items()},
    }
    keys = [key for name in BENCHMARKS for key in (name, f"{name} (cuda)")]
    ordered = [sections.pop(key) for key in keys if key in sections]
    ordered += list(sections.values())
    path.write_text("\n".join(["# Benchmark results\n", *ordered]))


if __name__ == "__main__":
    main()
