"""The metrics table ``medseg run`` prints: one value per metric, or a seeds workflow's spread."""

from __future__ import annotations

from medseg.api import WorkflowResult, seed_spread
from medseg.cli import metrics_table


def _columns(table) -> dict[str, list[str]]:
    return {str(column.header): [str(cell) for cell in column.cells] for column in table.columns}


def test_one_run_shows_a_value_per_metric():
    result = WorkflowResult("w", "r", "", {"eval/seg": 0.5, "eval/det": 0.75}, [], [])
    columns = _columns(metrics_table(result))
    assert columns == {"metric": ["eval/seg", "eval/det"], "value": ["0.5000", "0.7500"]}


def test_a_seeds_run_shows_mean_and_sd_then_each_seed_under_its_own_heading():
    per_seed = {0: {"eval/seg": 0.9}, 1: {"eval/seg": 0.8}, 2: {"eval/seg": 0.7}}
    repeats = {seed: WorkflowResult("w", "r", "", metrics, [], []) for seed, metrics in per_seed.items()}
    result = WorkflowResult("w", "r", "", seed_spread(per_seed), [], [], repeats=repeats)
    assert _columns(metrics_table(result)) == {
        "metric": ["eval/seg"],
        "mean ± sd": ["0.8000 ± 0.1000"],
        "seed 0": ["0.9000"],
        "seed 1": ["0.8000"],
        "seed 2": ["0.7000"],
    }
