"""How many CPU threads medseg's compute may use, and how to tell the compute libraries.

A process should use the CPUs it is *allowed*, not the machine's: a container's CPU quota
(cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``) or a ``taskset`` affinity mask can grant
fewer than ``os.cpu_count()``. torch's OpenMP pool otherwise starts one thread per machine core,
and two jobs on one small machine then spin against each other (measured: two BraTS runs at
once on 2 cores took 14 minutes instead of 2 × 100 s).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
"""Read by OpenMP, MKL and OpenBLAS when they load (before ``import torch``)."""


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (``1.5`` = 150 ms per 100 ms), ``None`` if unlimited."""
    v2 = root / "cpu.max"
    try:
        if v2.is_file():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        quota_file, period_file = root / "cpu" / "cpu.cfs_quota_us", root / "cpu" / "cpu.cfs_period_us"
        if quota_file.is_file() and period_file.is_file():
            quota_us = int(quota_file.read_text())
            return None if quota_us <= 0 else quota_us / int(period_file.read_text())
    except (OSError, ValueError):
        return None
    return None


def available_cpus(root: Path = CGROUP_ROOT) -> int:
    """CPUs this process may use: its affinity mask, capped by its cgroup quota (rounded up), ≥ 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        cpus = min(cpus, math.ceil(limit))
    return max(1, cpus)


def compute_threads(requested: int | None, environ: Mapping[str, str], root: Path = CGROUP_ROOT) -> int:
    """Threads for compute: ``requested`` (``--threads``), else ``OMP_NUM_THREADS``, else the allowed CPUs."""
    if requested is not None:
        return max(1, requested)
    text = environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if text.isdigit() and int(text) > 0:
        return int(text)
    return available_cpus(root)


def thread_environment(threads: int) -> dict[str, str]:
    """Variables that make the compute libraries start ``threads`` threads that soon sleep when idle.

    ``GOMP_SPINCOUNT=10000``: an idle OpenMP thread spins about a hundredth of GNU OpenMP's
    default before it waits on the kernel, so two jobs on the same cores stop burning each
    other's time (measured on the demo, 2 cores: two at once 1.6× one run's wall time, was
    5.5×), while one job alone keeps its speed (``OMP_WAIT_POLICY=PASSIVE`` cost it 35 %).
    """
    return {**dict.fromkeys(THREAD_VARIABLES, str(threads)), "GOMP_SPINCOUNT": "10000"}


def loader_threads(threads: int, loader_workers: int) -> int:
    """Compute threads left to the main process beside ``loader_workers`` data-loader processes (≥ 1)."""
    return max(1, threads - loader_workers)
