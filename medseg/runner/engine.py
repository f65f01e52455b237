"""Execute a resolved workflow: plan cache keys, run or reuse each stage, track everything.

``Runner.run`` opens the parent run and walks the stages; each stage is either reused
(``_reuse``: a tracked cache hit) or executed (``_execute``: its tracked run around
``_produce``, the cache part that calls ``Stage.execute`` and commits the outputs).
Rank > 0 of a ``torchrun`` launch follows rank 0 (``runner.distributed.follow``).
"""

from __future__ import annotations

import json
import platform
import shutil
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medseg._version import __version__
from medseg.collective import Collective
from medseg.errors import MedsegError, StageError
from medseg.registry import plugin_versions
from medseg.runner.cache import DigestMemo, Manifest, cache_key, library_versions
from medseg.runner.contract import Kind, ProgressCallback, StageContext
from medseg.runner.distributed import follow
from medseg.runner.lifecycle import Lease, open_lease, reclaim
from medseg.runner.outcome import PlannedStage, RunOutcome, StageEvent, StageOutcome
from medseg.runner.spec import ResolvedStage, ResolvedWorkflow
from medseg.runner.workspace import Workspace
from medseg.tracking.base import DatasetInfo, RunStatus, Tracker, flatten_params
from medseg.tracking.redact import RedactingTracker, Redactor

Produced = dict[str, StageOutcome | PlannedStage]
"""Stages handled so far in a run or plan, by name."""

Resolved = tuple[dict[str, str], dict[str, Path]]
"""A stage's input digests and input folders, by input name."""

DATASET_CONTEXTS = {"train": "training", "postprocess": "validation", "evaluate": "testing"}
"""How a stage type uses the dataset it reads, as MLflow's ``mlflow.data.context`` says it."""


@dataclass
class _Job:
    """One workflow run on rank 0: what every stage execution in it shares."""

    workflow: ResolvedWorkflow
    tracker: RedactingTracker
    name: str
    parent: str
    memo: DigestMemo
    lease: Lease
    resumable: dict[str, str]
    notify: StageEvent
    progress: ProgressCallback | None


class Runner:
    """Runs resolved workflows in one workspace."""

    def __init__(self, workspace: Workspace, collective: Collective | None = None) -> None:
        self.workspace = workspace
        self.cache = workspace.cache()
        self.versions = library_versions()
        self.collective = collective or Collective()

    def resolve_inputs(
        self, stage: ResolvedStage, workflow: ResolvedWorkflow, memo: DigestMemo, produced: Produced
    ) -> Resolved | None:
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

    def key(self, stage: ResolvedStage, seed: int, digests: dict[str, str]) -> str:
        """The cache key of ``stage`` with these input digests."""
        return cache_key(
            stage=stage.spec.name,
            version=stage.spec.version,
            params=stage.params.keyed(),
            input_digests=digests,
            seed=seed,
            versions=self.versions_for(stage),
        )

    def versions_for(self, stage: ResolvedStage) -> dict[str, str]:
        """Library versions, plus those of the plugins ``stage`` is or names in its params."""
        names = {stage.spec.name, *_strings(stage.params.model_dump(mode="json"))}
        return {**self.versions, **plugin_versions(names)}

    def outputs(self, key: str, stage: ResolvedStage) -> dict[str, Path]:
        """The committed output folders of execution ``key``."""
        return {name: self.cache.entry(key) / name for name in stage.spec.outputs}

    def context(
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
            seed=workflow.seed_of(stage),
            tracker=tracker,
            run_id=run_id,
            private_dir=self.workspace.private_dir,
            scratch_dir=self.workspace.scratch(key),
            on_private=tracker.redactor.add_sources if isinstance(tracker, RedactingTracker) else None,
            **({"progress": progress} if progress else {}),
        )

    def plan(self, workflow: ResolvedWorkflow) -> list[PlannedStage]:
        """Which stages are cached and which will run, without running anything."""
        memo = DigestMemo(self.workspace.digest_memo)
        produced: Produced = {}
        try:
            for stage in workflow.stages:
                resolved = self.resolve_inputs(stage, workflow, memo, produced)
                if resolved is None:
                    produced[stage.name] = PlannedStage(stage.name, None, "will run")
                    continue
                key = self.key(stage, workflow.seed_of(stage), resolved[0])
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
        parent_run_id: str | None = None,
    ) -> RunOutcome:
        """Run every stage in order, reusing committed cache entries.

        The workflow's run is nested under ``parent_run_id`` when given (one repeat of a
        multi-seed workflow, named ``seed <n>``).

        A failing stage removes its partial outputs, marks its run and the parent run
        FAILED and raises; stages committed before it stay cached, so a rerun resumes there.
        Runs left open by a killed process of this workspace and tracking ``store`` are closed
        as KILLED, and a stage that resumes from its checkpoint keeps logging into its run.
        """
        if self.collective.rank > 0:
            return follow(self, workflow, progress)
        job = self._open(
            workflow, tracker, on_event or (lambda stage, message: None), progress, store, parent_run_id
        )
        try:
            outcome = self._run_stages(job)
        except BaseException as exc:
            status: RunStatus = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
            job.tracker.set_tags(
                job.parent,
                {"medseg.error": _one_line(exc), "mlflow.runName": f"{job.name} · {status.lower()}"},
            )
            job.tracker.end_run(job.parent, status)
            raise
        else:
            job.tracker.end_run(job.parent, "FINISHED")
        finally:
            job.memo.close()
            job.lease.close()
        return outcome

    def _open(
        self,
        workflow: ResolvedWorkflow,
        tracker: Tracker,
        notify: StageEvent,
        progress: ProgressCallback | None,
        store: str,
        parent_run_id: str | None,
    ) -> _Job:
        """Start the parent run (behind the redaction boundary), reclaim killed runs, take a lease."""
        redactor = Redactor()
        for name, path in workflow.input_paths.items():
            redactor.add_input(name, path)
        redacting = RedactingTracker(tracker, redactor)
        repeat = {} if workflow.run_seed is None else {"medseg.seed": str(workflow.run_seed)}
        name = workflow.name if workflow.run_seed is None else f"seed {workflow.run_seed}"
        parent = redacting.start_run(
            experiment=workflow.experiment,
            name=f"{name} · running",
            parent_run_id=parent_run_id,
            tags={
                "medseg.workflow": workflow.name,
                "medseg.pipeline": workflow.pipeline.name,
                "medseg.workflow_digest": workflow.digest,
                "medseg.version": __version__,
                **repeat,
            },
        )
        leases = self.workspace.leases_dir
        resumable = reclaim(leases, redacting, parent, store)
        lease = open_lease(leases, parent, store)
        memo = DigestMemo(self.workspace.digest_memo)
        return _Job(workflow, redacting, name, parent, memo, lease, resumable, notify, progress)

    def _run_stages(self, job: _Job) -> RunOutcome:
        """Run or reuse each stage in order; rank 0 tells the other ranks how each ended."""
        self._log_parent(job)
        outcome = RunOutcome(workflow=job.workflow.name, parent_run_id=job.parent)
        produced: Produced = {}
        datasets: dict[str, DatasetInfo] = {}
        for stage in job.workflow.stages:
            resolved = self.resolve_inputs(stage, job.workflow, job.memo, produced)
            if resolved is None:
                raise StageError(f"stage {stage.name}: an upstream stage left no committed output")
            try:
                result = self._run_stage(job, stage, resolved)
            except BaseException:
                if not stage.spec.distributed:  # the other ranks wait for word from rank 0
                    self.collective.agree(False)
                raise
            self.collective.agree(True)
            produced[stage.name] = result
            outcome.stages.append(result)
            self._log_datasets(job, stage, result, datasets)
        job.tracker.log_metrics(job.parent, outcome.metrics)
        executed = outcome.executed
        job.tracker.set_tags(
            job.parent,
            {
                "medseg.stages_executed": ",".join(executed) or "none",
                "medseg.cache_hits": str(len(outcome.stages) - len(executed)),
                "mlflow.runName": f"{job.name} · {_what_ran(outcome)}",
                **warning_tag(outcome.warnings),
            },
        )
        return outcome

    def _log_datasets(
        self, job: _Job, stage: ResolvedStage, result: StageOutcome, datasets: dict[str, DatasetInfo]
    ) -> None:
        """Record datasets as MLflow dataset inputs of the parent run and of the runs that read them.

        The parent run gets each dataset a stage writes; train, postprocess and evaluate runs
        the dataset they read (context ``training``, ``validation``, ``testing``).

        ``datasets`` collects the dataset outputs seen so far (``"<stage>.<output>"`` → info).
        The digest is the output's content digest; the profile is the writing stage's metrics
        (case counts per split); nothing names a source path.
        """
        context = DATASET_CONTEXTS.get(stage.spec.name)
        for source in stage.inputs.values():
            if source in datasets and context is not None:
                job.tracker.log_dataset(result.run_id, datasets[source], context)
        for output, kind in stage.spec.outputs.items():
            manifest = self.cache.manifest(result.key) if kind is Kind.DATASET else None
            if manifest is None:
                continue
            info = DatasetInfo(
                name=f"{job.workflow.name}/{stage.name}.{output}",
                digest=manifest.output_digests[output][:32],
                source=json.dumps({"stage": stage.name, "cache_key": result.key[:12]}),
                profile={name.split("/", 1)[-1]: value for name, value in result.metrics.items()},
            )
            datasets[f"{stage.name}.{output}"] = info
            job.tracker.log_dataset(job.parent, info, "input")

    def _log_parent(self, job: _Job) -> None:
        workflow, tracker = job.workflow, job.tracker
        params: dict[str, object] = {"seed": workflow.seed, "pipeline": workflow.pipeline.name}
        if workflow.run_seed is not None:
            params["run_seed"] = workflow.run_seed
        for stage in workflow.stages:
            params.update(flatten_params(stage.params.loggable(), stage.name))
        tracker.log_params(job.parent, params)
        tracker.log_text(
            job.parent, json.dumps(workflow.resolved_document(), indent=2), "workflow/resolved.json"
        )
        tracker.log_text(job.parent, workflow.redacted_text(), "workflow/workflow.yaml")
        tracker.log_text(job.parent, json.dumps(environment(), indent=2), "environment.json")

    def _run_stage(self, job: _Job, stage: ResolvedStage, resolved: Resolved) -> StageOutcome:
        """Reuse the committed outputs of this stage's key, or execute it."""
        key = self.key(stage, job.workflow.seed_of(stage), resolved[0])
        private_map = self.workspace.private_map(key)
        if private_map.is_file():  # names this execution kept private: redact them in its run too
            job.tracker.redactor.add_sources(json.loads(private_map.read_text()))
        manifest = self.cache.manifest(key) if stage.spec.pure else None
        if manifest is not None:
            return self._reuse(job, stage, manifest)
        return self._execute(job, stage, key, resolved)

    def _reuse(self, job: _Job, stage: ResolvedStage, manifest: Manifest) -> StageOutcome:
        """Track a cache hit: a FINISHED child run pointing at the run that produced the outputs."""
        run_id = job.tracker.start_run(
            experiment=job.workflow.experiment,
            name=f"{stage.name} (cached)",
            parent_run_id=job.parent,
            tags={
                **_stage_tags(stage, manifest.key),
                "medseg.cache_hit": "true",
                "medseg.producer_run_id": manifest.run_id,
            },
        )
        job.tracker.log_metrics(run_id, manifest.metrics)
        warnings = _warn(job, stage, run_id, manifest.metrics)
        job.tracker.end_run(run_id, "FINISHED")
        job.notify(stage.name, "cached")
        outputs = self.outputs(manifest.key, stage)
        return StageOutcome(
            stage.name, manifest.key, True, run_id, manifest.run_id, manifest.metrics, 0.0, outputs, warnings
        )

    def _execute(self, job: _Job, stage: ResolvedStage, key: str, resolved: Resolved) -> StageOutcome:
        """Execute a stage inside its tracked run; a failure marks the run and says which stage."""
        run_id = self._open_stage_run(job, stage, key)
        job.lease.add_stage(key, run_id)
        job.notify(stage.name, "running")
        started = time.perf_counter()
        try:
            job.tracker.log_params(run_id, flatten_params(stage.params.loggable()))
            manifest = self._produce(job, stage, key, resolved, run_id)
        except BaseException as exc:
            job.tracker.set_tags(run_id, {"medseg.error": _one_line(exc)})
            job.tracker.end_run(run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            job.notify(stage.name, "failed")
            if isinstance(exc, MedsegError) or not isinstance(exc, Exception):
                raise
            raise StageError(
                f"stage {stage.name} failed: {type(exc).__name__}: {_one_line(exc)}; "
                "rerun with --debug for the traceback"
            ) from exc
        seconds = time.perf_counter() - started
        job.tracker.log_metrics(run_id, {**manifest.metrics, f"{stage.name}/seconds": seconds})
        warnings = _warn(job, stage, run_id, manifest.metrics)
        job.tracker.end_run(run_id, "FINISHED")
        job.lease.end_stage(key)
        job.notify(stage.name, f"done in {seconds:.1f} s")
        outputs = self.outputs(key, stage)
        return StageOutcome(
            stage.name, key, False, run_id, run_id, manifest.metrics, seconds, outputs, warnings
        )

    def _open_stage_run(self, job: _Job, stage: ResolvedStage, key: str) -> str:
        """The stage's run: a killed run's, when its checkpoint is still there to resume, else a new one."""
        if key in job.resumable and self.workspace.scratch(key).is_dir():
            run_id = job.resumable.pop(key)
            job.tracker.resume_run(run_id, parent_run_id=job.parent)
            return run_id
        return job.tracker.start_run(
            experiment=job.workflow.experiment,
            name=stage.name,
            parent_run_id=job.parent,
            tags={**_stage_tags(stage, key), "medseg.cache_hit": "false"},
        )

    def _produce(
        self, job: _Job, stage: ResolvedStage, key: str, resolved: Resolved, run_id: str
    ) -> Manifest:
        """The cache part: execute into staging folders, digest the outputs, commit atomically."""
        digests, inputs = resolved
        scratch = self.workspace.scratch(key)
        scratch.mkdir(parents=True, exist_ok=True)
        with self.cache.staging(key, stage.spec.outputs) as staged:
            context = self.context(job.workflow, stage, key, digests, job.tracker, run_id, job.progress)
            metrics = stage.spec.execute(context, stage.params, inputs, staged)
            manifest = Manifest(
                key=key,
                stage=stage.spec.name,
                version=stage.spec.version,
                params=stage.params.model_dump(mode="json"),
                input_digests=digests,
                output_digests={name: job.memo.tree_digest(path) for name, path in staged.items()},
                metrics={name: float(value) for name, value in metrics.items()},
                run_id=run_id,
                versions=self.versions_for(stage),
            )
            self.cache.commit(staged, manifest)
        shutil.rmtree(scratch, ignore_errors=True)
        return manifest


def _warn(job: _Job, stage: ResolvedStage, run_id: str, metrics: Mapping[str, float]) -> tuple[str, ...]:
    """The stage's warnings on these metrics, tagged on its run."""
    warnings = tuple(stage.spec.warnings(metrics))
    if warnings:
        job.tracker.set_tags(run_id, warning_tag(warnings))
    return warnings


def warning_tag(warnings: Sequence[str]) -> dict[str, str]:
    """The ``medseg.warning`` tag of a run: its warnings, one per line (no tag without any)."""
    return {"medseg.warning": "\n".join(warnings)[:5000]} if warnings else {}


def _what_ran(outcome: RunOutcome) -> str:
    """What a run did, for its name: ``all cached``, ``ran train, evaluate (2 cached)``."""
    executed = outcome.executed
    cached = len(outcome.stages) - len(executed)
    if not executed:
        return "all cached"
    return f"ran {', '.join(executed)}" + (f" ({cached} cached)" if cached else "")


def _stage_tags(stage: ResolvedStage, key: str) -> dict[str, str]:
    return {
        "medseg.stage": stage.name,
        "medseg.stage_type": stage.spec.name,
        "medseg.stage_version": str(stage.spec.version),
        "medseg.cache_key": key,
    }


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


def _strings(value: Any) -> Iterator[str]:
    """Every string inside a JSON value (dict values, list items, the value itself)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
