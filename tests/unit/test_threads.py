"""CPU threads: the allowed CPUs (affinity, cgroup quota), the precedence of settings, loader workers."""

from __future__ import annotations

import os

from medseg.threads import (
    available_cpus,
    cgroup_cpu_limit,
    compute_threads,
    loader_threads,
    thread_environment,
)


def test_cgroup_quota_v2_and_v1(tmp_path):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_limit(v2) == 1.5
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(v2) is None
    v1 = tmp_path / "v1" / "cpu"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("50000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(tmp_path / "v1") == 0.5
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_limit(tmp_path / "v1") is None
    assert cgroup_cpu_limit(tmp_path / "none") is None


def test_available_cpus_is_the_affinity_capped_by_the_quota(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    assert available_cpus(tmp_path) == affinity  # no quota files: the affinity mask
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert available_cpus(tmp_path) == 1  # half a CPU rounds up to one thread
    (tmp_path / "cpu.max").write_text(f"{(affinity + 3) * 100000} 100000\n")
    assert available_cpus(tmp_path) == affinity  # a quota above the mask does not add CPUs


def test_threads_option_then_omp_num_threads_then_allowed_cpus(tmp_path):
    (tmp_path / "cpu.max").write_text("100000 100000\n")
    assert compute_threads(3, {"OMP_NUM_THREADS": "5"}, tmp_path) == 3
    assert compute_threads(None, {"OMP_NUM_THREADS": "5"}, tmp_path) == 5
    assert compute_threads(None, {"OMP_NUM_THREADS": "junk"}, tmp_path) == 1
    assert compute_threads(None, {}, tmp_path) == 1
    assert thread_environment(2) == {
        "OMP_NUM_THREADS": "2",
        "MKL_NUM_THREADS": "2",
        "OPENBLAS_NUM_THREADS": "2",
        "GOMP_SPINCOUNT": "10000",
    }
    assert loader_threads(4, 2) == 2 and loader_threads(2, 4) == 1 and loader_threads(2, 0) == 2
