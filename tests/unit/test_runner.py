"""The stage runner on small real stages: hits, misses, partial reruns, failure and resume."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from pydantic import Field

from medseg.errors import DataError, StageError
from medseg.params import Params
from medseg.runner.contract import Kind, Stage, ports
from medseg.runner.engine import Runner
from medseg.runner.spec import load_workflow
from medseg.runner.workspace import Workspace
from medseg.tracking.base import NullTracker

CALLS: Counter[str] = Counter()
FAIL: set[str] = set()


class CountParams(Params):
    factor: int = Field(1, ge=1)


def _count(context, params, inputs, outputs):
    CALLS["count"] += 1
    n = sum(1 for path in inputs["source"].rglob("*") if path.is_file())
    (outputs["number"] / "n.txt").write_text(str(n * params.factor))
    return {"count/n": float(n * params.factor)}


def _square(context, params, inputs, outputs):
    CALLS["square"] += 1
    n = int((inputs["number"] / "n.txt").read_text())
    (outputs["number"] / "partial.txt").write_text("half-written")
    if "square" in FAIL:
        raise DataError("square: refusing on purpose")
    (outputs["number"] / "n.txt").write_text(str(n * n * params.factor))
    return {"square/n": float(n * n * params.factor)}


def _crash(context, params, inputs, outputs):
    raise ZeroDivisionError("boom")


def _toy(stage_name: str, function, input_name: str) -> Stage[CountParams]:
    """A toy stage: ``function`` from ``input_name`` (a source or a number) to a number."""

    class Toy(Stage[CountParams]):
        name = stage_name
        version = 1
        params = CountParams
        inputs = ports(**{input_name: Kind.SOURCE if input_name == "source" else Kind.REPORT})
        outputs = ports(number=Kind.REPORT)

        def execute(self, context, params, inputs, outputs):
            return function(context, params, inputs, outputs)

    return Toy()


REGISTRY = {
    "count": _toy("count", _count, "source"),
    "square": _toy("square", _square, "number"),
    "crash": _toy("crash", _crash, "number"),
}

PIPELINE = """
name: toy
inputs: {data: {}}
stages:
  count: {uses: count, inputs: {source: inputs.data}}
  square: {uses: square, inputs: {number: count.number}, params: {factor: 1}}
"""


@pytest.fixture
def toy(tmp_path: Path):
    CALLS.clear()
    FAIL.clear()
    data = tmp_path / "data"
    data.mkdir()
    for name in ("a", "b", "c"):
        (data / name).write_text(name)
    (tmp_path / "toy.yaml").write_text(PIPELINE)

    def workflow(params: str = "{}") -> Path:
        path = tmp_path / "wf.yaml"
        path.write_text(f"pipeline: toy.yaml\ninputs: {{data: data}}\nparams: {params}\n")
        return path

    return tmp_path, workflow


def _run(root: Path, workflow: Path):
    runner = Runner(Workspace(root / "ws"))
    return runner, runner.run(load_workflow(workflow, REGISTRY), NullTracker())


def test_first_run_executes_everything_and_rerun_nothing(toy):
    root, workflow = toy
    _, first = _run(root, workflow())
    assert first.executed == ["count", "square"] and first.metrics["square/n"] == 9.0
    _, second = _run(root, workflow())
    assert second.executed == [] and CALLS == {"count": 1, "square": 1}
    assert second.metrics == first.metrics
    assert [s.producer_run_id for s in second.stages] == [s.run_id for s in first.stages]


def test_param_change_reruns_only_downstream(toy):
    root, workflow = toy
    _run(root, workflow())
    _, changed = _run(root, workflow("{square: {factor: 2}}"))
    assert changed.executed == ["square"] and changed.metrics["square/n"] == 18.0
    assert CALLS == {"count": 1, "square": 2}


def test_input_content_change_reruns_all(toy):
    root, workflow = toy
    _run(root, workflow())
    (root / "data" / "d").write_text("d")
    _, changed = _run(root, workflow())
    assert changed.executed == ["count", "square"] and changed.metrics["square/n"] == 16.0


def test_failure_leaves_no_partial_output_and_rerun_resumes(toy):
    root, workflow = toy
    FAIL.add("square")
    with pytest.raises(DataError, match="refusing on purpose"):
        _run(root, workflow())
    cache = root / "ws" / "cache"
    committed = [p for p in cache.iterdir() if (p / "manifest.json").exists()]
    assert len(committed) == 1  # only count committed
    assert not list((cache / "tmp").iterdir())  # the half-written staging dir is gone
    assert not list(cache.rglob("partial.txt"))
    FAIL.clear()
    _, resumed = _run(root, workflow())
    assert resumed.executed == ["square"] and CALLS == {"count": 1, "square": 2}


def test_unexpected_exception_becomes_stage_error(toy):
    root, workflow = toy
    (root / "toy.yaml").write_text(PIPELINE.replace("uses: square", "uses: crash"))
    with pytest.raises(StageError, match="stage square failed: ZeroDivisionError: boom"):
        _run(root, workflow())


def test_plan_reports_cached_and_will_run(toy):
    root, workflow = toy
    runner = Runner(Workspace(root / "ws"))
    resolved = load_workflow(workflow(), REGISTRY)
    assert [p.state for p in runner.plan(resolved)] == ["will run", "will run"]
    runner.run(resolved, NullTracker())
    assert [p.state for p in runner.plan(resolved)] == ["cached", "cached"]
    changed = load_workflow(workflow("{square: {factor: 3}}"), REGISTRY)
    assert [p.state for p in runner.plan(changed)] == ["cached", "will run"]
    assert CALLS == {"count": 1, "square": 1}
