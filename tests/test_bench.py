"""Each benchmark runs at tiny size, so that none of them rots (no timing is asserted)."""

import pytest

from bench import bench_pipeline

pytestmark = pytest.mark.integration


def test_pipeline_benchmark_smoke():
    rows = bench_pipeline.run(repetitions=1, frames=6, size=32)
    assert [row["benchmark"] for row in rows] == ["rerun, 0 stages executed", "medseg --help"]
    assert all(row["medseg_s"] > row["baseline_s"] > 0 for row in rows)
