"""Execute a resolved workflow: plan cache keys, run or reuse each stage, track everything."""

from __future__ import annotations

import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from medseg._version import __version__
from medseg.errors import MedsegError, StageError
from medseg.runner.cache import DigestMemo, Manifest, StageCache, cache_key, library_versions
from medseg.runner.contract import ProgressCallback, StageContext
from medseg.runner.spec import ResolvedStage, ResolvedWorkflow
from medseg.tracking.base import Tracker, flatten_params

StageState = Literal["cached", "will run", "blocked"]


@dataclass(frozen=True)
class Workspace:
    """A folder holding the stage cache, the private case maps and the embedded MLflow store."""

    root: Path

    @property
    def cache_dir(self) -> Path:
        """Committed stage outputs."""
        return self.root / "cache"

    @property
    def private_dir(self) -> Path:
        """Data that must never be logged (maps from case ids to sources)."""
        return self.root / "private"

    @property
    def mlflow_db(self) -> Path:
        """The embedded SQLite tracking store."""
        return self.root / "mlflow.db"

    @property
    def artifact_root(self) -> Path:
        """Artifacts of the embedded tracking store."""
        return self.root / "mlartifacts"

    @property
    def default_tracking_uri(self) -> str:
        """``sqlite:///`` URI of the embedded store."""
        return f"sqlite:///{self.mlflow_db.resolve()}"


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


StageEvent = Callable[[str, str], None]
"""``on_event(stage, message)``: a stage started, was reused, or finished."""


class Runner:
    """Runs resolved workflows in one workspace."""

    def __init__(self, workspace: Workspace) -> None:
        self.workspace = workspace
        self.cache = StageCache(workspace.cache_dir)
        self.versions = library_versions()

    def _resolve_inputs(
        self,
        stage: ResolvedStage,
        workflow: ResolvedWorkflow,
        memo: DigestMemo,
        produced: dict[str, StageOutcome | PlannedStage],
    ) -> tuple[dict[str, str], dict[str, Path]] | None:
        """Digests and directories of a stage's inputs; ``None`` if an upstream is not cached."""
        digests: dict[str, str] = {}
        paths: dict[str, Path] = {}
        for input_name, source in stage.inputs.items():
            origin, _, output = source.partition(".")
            if origin == "inputs":
                paths[input_name] = workflow.input_paths[output]
                digests[input_name] = memo.tree_digest(paths[input_name])
                continue
            upstream = produced.get(origin)
            manifest = self.cache.manifest(upstream.key) if upstream and upstream.key else None
            if manifest is None:
                return None
            digests[input_name] = manifest.output_digests[output]
            paths[input_name] = self.cache.entry(manifest.key) / output
        return digests, paths

    def _key(self, stage: ResolvedStage, seed: int, digests: dict[str, str]) -> str:
        return cache_key(
            stage=stage.spec.name,
            version=stage.spec.version,
            params=stage.params.model_dump(mode="json"),
            input_digests=digests,
            seed=seed,
            versions=self.versions,
        )

    def plan(self, workflow: ResolvedWorkflow) -> list[PlannedStage]:
        """Which stages are cached and which will run, without running anything."""
        memo = DigestMemo(self.workspace.cache_dir / "digests.sqlite")
        produced: dict[str, StageOutcome | PlannedStage] = {}
        try:
            for stage in workflow.stages:
                resolved = self._resolve_inputs(stage, workflow, memo, produced)
                if resolved is None:
                    produced[stage.name] = PlannedStage(stage.name, None, "will run")
                    continue
                key = self._key(stage, workflow.seed, resolved[0])
                cached = stage.spec.pure and self.cache.manifest(key) is not None
                produced[stage.name] = PlannedStage(stage.name, key, "cached" if cached else "will run")
        finally:
            memo.close()
        return [entry for entry in produced.values() if isinstance(entry, PlannedStage)]

    def run(
        self,
        workflow: ResolvedWorkflow,
        tracker: Tracker,
        *,
        on_event: StageEvent | None = None,
        progress: ProgressCallback | None = None,
    ) -> RunOutcome:
        """Run every stage in order, reusing committed cache entries.

        A failing stage removes its partial outputs, marks its run and the parent run
        FAILED and raises; stages committed before it stay cached, so a rerun resumes there.
        """
        notify = on_event or (lambda stage, message: None)
        parent = tracker.start_run(
            experiment=workflow.experiment,
            name=workflow.name,
            tags={
                "medseg.workflow": workflow.name,
                "medseg.pipeline": workflow.pipeline.name,
                "medseg.workflow_digest": workflow.digest,
                "medseg.version": __version__,
            },
        )
        outcome = RunOutcome(workflow=workflow.name, parent_run_id=parent)
        memo = DigestMemo(self.workspace.cache_dir / "digests.sqlite")
        try:
            self._log_parent(workflow, tracker, parent)
            produced: dict[str, StageOutcome | PlannedStage] = {}
            for stage in workflow.stages:
                resolved = self._resolve_inputs(stage, workflow, memo, produced)
                if resolved is None:
                    raise StageError(f"stage {stage.name}: an upstream stage left no committed output")
                result = self._run_stage(workflow, stage, resolved, memo, tracker, parent, notify, progress)
                produced[stage.name] = result
                outcome.stages.append(result)
            tracker.log_metrics(parent, outcome.metrics)
            tracker.set_tags(
                parent,
                {
                    "medseg.stages_executed": ",".join(outcome.executed) or "none",
                    "medseg.cache_hits": str(len(outcome.stages) - len(outcome.executed)),
                },
            )
        except BaseException as exc:
            tracker.set_tags(parent, {"medseg.error": _one_line(exc)})
            tracker.end_run(parent, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            raise
        finally:
            memo.close()
        tracker.end_run(parent, "FINISHED")
        return outcome

    def _log_parent(self, workflow: ResolvedWorkflow, tracker: Tracker, parent: str) -> None:
        params: dict[str, object] = {"seed": workflow.seed, "pipeline": workflow.pipeline.name}
        for stage in workflow.stages:
            params.update(flatten_params(stage.params.model_dump(mode="json"), stage.name))
        tracker.log_params(parent, params)
        tracker.log_text(parent, json.dumps(workflow.resolved_document(), indent=2), "workflow/resolved.json")
        tracker.log_text(parent, workflow.redacted_text(), "workflow/workflow.yaml")
        tracker.log_text(parent, json.dumps(environment(), indent=2), "environment.json")

    def _run_stage(
        self,
        workflow: ResolvedWorkflow,
        stage: ResolvedStage,
        resolved: tuple[dict[str, str], dict[str, Path]],
        memo: DigestMemo,
        tracker: Tracker,
        parent: str,
        notify: StageEvent,
        progress: ProgressCallback | None,
    ) -> StageOutcome:
        digests, inputs = resolved
        key = self._key(stage, workflow.seed, digests)
        tags = {
            "medseg.stage": stage.name,
            "medseg.stage_type": stage.spec.name,
            "medseg.stage_version": str(stage.spec.version),
            "medseg.cache_key": key,
        }
        manifest = self.cache.manifest(key) if stage.spec.pure else None
        if manifest is not None:
            run_id = tracker.start_run(
                experiment=workflow.experiment,
                name=f"{stage.name} (cached)",
                parent_run_id=parent,
                tags={
                    **tags,
                    "medseg.cache_hit": "true",
                    "medseg.producer_run_id": manifest.run_id,
                },
            )
            tracker.log_metrics(run_id, manifest.metrics)
            tracker.end_run(run_id, "FINISHED")
            notify(stage.name, "cached")
            return StageOutcome(
                stage.name,
                key,
                True,
                run_id,
                manifest.run_id,
                manifest.metrics,
                0.0,
                self._outputs(key, stage),
            )

        run_id = tracker.start_run(
            experiment=workflow.experiment,
            name=stage.name,
            parent_run_id=parent,
            tags={**tags, "medseg.cache_hit": "false"},
        )
        notify(stage.name, "running")
        started = time.perf_counter()
        try:
            tracker.log_params(run_id, flatten_params(stage.params.model_dump(mode="json")))
            with self.cache.staging(key, stage.spec.outputs) as staged:
                context = StageContext(
                    stage=stage.name,
                    key=key,
                    input_digests=digests,
                    seed=workflow.seed,
                    tracker=tracker,
                    run_id=run_id,
                    private_dir=self.workspace.private_dir,
                    **({"progress": progress} if progress else {}),
                )
                metrics = stage.spec.run(context, stage.params, inputs, staged)
                output_digests = {name: memo.tree_digest(path) for name, path in staged.items()}
                manifest = Manifest(
                    key=key,
                    stage=stage.spec.name,
                    version=stage.spec.version,
                    params=stage.params.model_dump(mode="json"),
                    input_digests=digests,
                    output_digests=output_digests,
                    metrics={k: float(v) for k, v in metrics.items()},
                    run_id=run_id,
                    versions=self.versions,
                )
                self.cache.commit(staged, manifest)
        except BaseException as exc:
            tracker.set_tags(run_id, {"medseg.error": _one_line(exc)})
            tracker.end_run(run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            notify(stage.name, "failed")
            if isinstance(exc, MedsegError):
                raise
            if isinstance(exc, Exception):
                raise StageError(
                    f"stage {stage.name} failed: {type(exc).__name__}: {_one_line(exc)}; "
                    "rerun with --debug for the traceback"
                ) from exc
            raise
        seconds = time.perf_counter() - started
        tracker.log_metrics(run_id, {**manifest.metrics, f"{stage.name}/seconds": seconds})
        tracker.end_run(run_id, "FINISHED")
        notify(stage.name, f"done in {seconds:.1f} s")
        return StageOutcome(
            stage.name,
            key,
            False,
            run_id,
            run_id,
            manifest.metrics,
            seconds,
            self._outputs(key, stage),
        )

    def _outputs(self, key: str, stage: ResolvedStage) -> dict[str, Path]:
        return {name: self.cache.entry(key) / name for name in stage.spec.outputs}


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:500]


def environment() -> dict[str, object]:
    """The software environment of this run (no host names, users or paths)."""
    from importlib import metadata

    packages = {}
    for name in (
        "medseg",
        "monai",
        "torch",
        "numpy",
        "mlflow",
        "pydantic",
        "nibabel",
        "SimpleITK",
        "pydicom",
    ):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(terse=True),
        "machine": platform.machine(),
        "packages": packages,
    }
