"""Execute a resolved workflow: plan cache keys, run or reuse each stage, track everything."""

from __future__ import annotations

import json
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from medseg._version import __version__
from medseg.errors import MedsegError, StageError
from medseg.runner.cache import DigestMemo, Manifest, StageCache, cache_key, library_versions
from medseg.runner.contract import ProgressCallback, StageContext
from medseg.runner.distributed import Collective
from medseg.runner.lifecycle import Lease, open_lease, reclaim
from medseg.runner.spec import ResolvedStage, ResolvedWorkflow
from medseg.tracking.base import NullTracker, Tracker, flatten_params
from medseg.tracking.redact import RedactingTracker, Redactor

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
    def leases_dir(self) -> Path:
        """Leases of live workflow runs (see ``runner.lifecycle``)."""
        return self.root / "leases"

    @property
    def digest_memo(self) -> Path:
        """The memo of file digests: it holds source paths, so it lives in ``private/``."""
        return self.private_dir / "digests.sqlite"

    @property
    def scratch_dir(self) -> Path:
        """Per-execution state that outlives a failed run (training checkpoints)."""
        return self.root / "scratch"

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

    def __init__(self, workspace: Workspace, collective: Collective | None = None) -> None:
        self.workspace = workspace
        self.cache = StageCache(workspace.cache_dir)
        self.versions = library_versions()
        self.collective = collective or Collective()

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
        memo = DigestMemo(self.workspace.digest_memo)
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
        store: str = "",
    ) -> RunOutcome:
        """Run every stage in order, reusing committed cache entries.

        A failing stage removes its partial outputs, marks its run and the parent run
        FAILED and raises; stages committed before it stay cached, so a rerun resumes there.
        Runs left open by a killed process of this workspace and tracking ``store`` are closed
        as KILLED, and a stage that resumes from its checkpoint keeps logging into its run.
        """
        if self.collective.rank > 0:
            return self._follow(workflow, progress)
        notify = on_event or (lambda stage, message: None)
        redactor = Redactor()
        for name, path in workflow.input_paths.items():
            redactor.add_input(name, path)
        tracker = RedactingTracker(tracker, redactor)
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
        memo = DigestMemo(self.workspace.digest_memo)
        resumable = reclaim(self.workspace.leases_dir, tracker, parent, store)
        lease = open_lease(self.workspace.leases_dir, parent, store)
        try:
            self._log_parent(workflow, tracker, parent)
            produced: dict[str, StageOutcome | PlannedStage] = {}
            for stage in workflow.stages:
                resolved = self._resolve_inputs(stage, workflow, memo, produced)
                if resolved is None:
                    raise StageError(f"stage {stage.name}: an upstream stage left no committed output")
                try:
                    result = self._run_stage(
                        workflow, stage, resolved, memo, tracker, parent, notify, progress, lease, resumable
                    )
                except BaseException:
                    if not stage.spec.distributed:  # the other ranks wait for word from rank 0
                        self.collective.agree(False)
                    raise
                self.collective.agree(True)
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
            lease.close()
            raise
        finally:
            memo.close()
        tracker.end_run(parent, "FINISHED")
        lease.close()
        return outcome

    def _follow(self, workflow: ResolvedWorkflow, progress: ProgressCallback | None) -> RunOutcome:
        """Rank > 0 of a ``torchrun`` launch: train with rank 0, wait for it on other stages.

        Nothing is tracked or committed here; outputs of distributed stages are discarded
        (rank 0 writes them). Returns the stages as rank 0 committed them.
        """
        outcome = RunOutcome(workflow=workflow.name, parent_run_id="")
        memo = DigestMemo(None)  # rank 0 holds the workspace memo open for writing
        produced: dict[str, StageOutcome | PlannedStage] = {}
        try:
            for stage in workflow.stages:
                if stage.spec.distributed:
                    self._run_discarded(workflow, stage, memo, produced, progress)
                if not self.collective.agree(True):
                    raise StageError(f"stage {stage.name} failed on rank 0; its output says why")
                resolved = self._resolve_inputs(stage, workflow, memo, produced)
                key = self._key(stage, workflow.seed, resolved[0]) if resolved else None
                manifest = self.cache.manifest(key) if key else None
                if manifest is None:
                    raise StageError(f"stage {stage.name}: rank 0 committed no output")
                result = StageOutcome(
                    stage.name,
                    manifest.key,
                    True,
                    "",
                    manifest.run_id,
                    manifest.metrics,
                    0.0,
                    self._outputs(manifest.key, stage),
                )
                produced[stage.name] = result
                outcome.stages.append(result)
        finally:
            memo.close()
        return outcome

    def _run_discarded(
        self,
        workflow: ResolvedWorkflow,
        stage: ResolvedStage,
        memo: DigestMemo,
        produced: dict[str, StageOutcome | PlannedStage],
        progress: ProgressCallback | None,
    ) -> None:
        """Run a distributed stage on a rank > 0 unless it is cached, discarding its outputs."""
        resolved = self._resolve_inputs(stage, workflow, memo, produced)
        if resolved is None:
            raise StageError(f"stage {stage.name}: an upstream stage left no committed output")
        digests, inputs = resolved
        key = self._key(stage, workflow.seed, digests)
        if stage.spec.pure and self.cache.manifest(key) is not None:
            return
        with tempfile.TemporaryDirectory(prefix=f"rank{self.collective.rank}-") as folder:
            outputs = {name: Path(folder) / name for name in stage.spec.outputs}
            for path in outputs.values():
                path.mkdir()
            context = self._context(workflow, stage, key, digests, NullTracker(), "", progress)
            stage.spec.run(context, stage.params, inputs, outputs)

    def _context(
        self,
        workflow: ResolvedWorkflow,
        stage: ResolvedStage,
        key: str,
        digests: dict[str, str],
        tracker: Tracker,
        run_id: str,
        progress: ProgressCallback | None,
    ) -> StageContext:
        """What a stage execution of ``key`` receives besides params, inputs and outputs."""
        return StageContext(
            stage=stage.name,
            key=key,
            input_digests=digests,
            seed=workflow.seed,
            tracker=tracker,
            run_id=run_id,
            private_dir=self.workspace.private_dir,
            scratch_dir=self.workspace.scratch_dir / key,
            on_private=tracker.redactor.add_sources if isinstance(tracker, RedactingTracker) else None,
            **({"progress": progress} if progress else {}),
        )

    def _log_parent(self, workflow: ResolvedWorkflow, tracker: Tracker, parent: str) -> None:
        params: dict[str, object] = {"seed": workflow.seed, "pipeline": workflow.pipeline.name}
        for stage in workflow.stages:
            params.update(flatten_params(stage.params.loggable(), stage.name))
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
        lease: Lease,
        resumable: dict[str, str],
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
        private_map = self.workspace.private_dir / f"{key}.json"
        if isinstance(tracker, RedactingTracker) and private_map.is_file():
            tracker.redactor.add_sources(json.loads(private_map.read_text()))
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

        scratch = self.workspace.scratch_dir / key
        if key in resumable and scratch.is_dir():  # a killed run's checkpoint: continue its run
            run_id = resumable.pop(key)
            tracker.resume_run(run_id, parent_run_id=parent)
        else:
            run_id = tracker.start_run(
                experiment=workflow.experiment,
                name=stage.name,
                parent_run_id=parent,
                tags={**tags, "medseg.cache_hit": "false"},
            )
        lease.add_stage(key, run_id)
        notify(stage.name, "running")
        started = time.perf_counter()
        try:
            tracker.log_params(run_id, flatten_params(stage.params.loggable()))
            scratch.mkdir(parents=True, exist_ok=True)
            with self.cache.staging(key, stage.spec.outputs) as staged:
                context = self._context(workflow, stage, key, digests, tracker, run_id, progress)
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
            shutil.rmtree(scratch, ignore_errors=True)
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
        lease.end_stage(key)
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
