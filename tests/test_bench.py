"""Each benchmark runs at tiny size, so that none of them rots (no timing is asserted)."""

import pytest

from bench import bench_pipeline, bench_seg
from tests.conftest import GOWT1, require

pytestmark = pytest.mark.integration


def test_pipeline_benchmark_smoke():
    rows = bench_pipeline.run(repetitions=1, frames=6, size=32)
    assert [row["benchmark"] for row in rows] == ["rerun, 0 stages executed", "medseg --help"]
    assert all(row["medseg_s"] > row["baseline_s"] > 0 for row in rows)


def test_seg_benchmark_smoke():
    require(GOWT1)
    rows = bench_seg.run(repetitions=1, frames=2)
    assert len(rows) == 3
    assert all(float(row["max_abs_difference"]) < 1e-9 for row in rows[:2])
