"""What a run reports: each stage's plan before running and its outcome after."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

StageState = Literal["cached", "will run", "blocked"]

StageEvent = Callable[[str, str], None]
"""``on_event(stage, message)``: a stage started, was reused, or finished."""


@dataclass(frozen=True)
class PlannedStage:
    """A stage's status before running: its key when computable, and whether it is cached."""

    name: str
    key: str | None
    state: StageState


@dataclass
class StageOutcome:
    """What happened to one stage in a run."""

    name: str
    key: str
    cache_hit: bool
    run_id: str
    producer_run_id: str
    metrics: dict[str, float]
    seconds: float
    outputs: dict[str, Path]
    warnings: tuple[str, ...] = ()


@dataclass
class RunOutcome:
    """The result of one workflow run."""

    workflow: str
    parent_run_id: str
    stages: list[StageOutcome] = field(default_factory=list)

    @property
    def executed(self) -> list[str]:
        """Names of stages that ran (not cache hits)."""
        return [stage.name for stage in self.stages if not stage.cache_hit]

    @property
    def metrics(self) -> dict[str, float]:
        """All stages' summary metrics, merged."""
        merged: dict[str, float] = {}
        for stage in self.stages:
            merged.update(stage.metrics)
        return merged

    @property
    def warnings(self) -> list[str]:
        """Every stage's warnings, each as ``<stage>: <warning>``."""
        return [f"{stage.name}: {warning}" for stage in self.stages for warning in stage.warnings]
