"""The Python API: run and check workflows, evaluate masks (typed, no printing, no env reading)."""

from __future__ import annotations

import contextlib
import math
import os
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar, cast

import numpy as np

from medseg.collective import Collective
from medseg.errors import ConfigError, TrackingError
from medseg.io.volume import Volume
from medseg.metrics.evaluate import CaseMetrics, EvaluationSummary, evaluate_case, summarize
from medseg.registry import Broken, Origin, registries
from medseg.runner.contract import ProgressCallback
from medseg.runner.engine import Runner, warning_tag
from medseg.runner.outcome import PlannedStage, RunOutcome, StageEvent
from medseg.runner.spec import ResolvedWorkflow, load_workflow
from medseg.runner.workspace import Workspace
from medseg.stages import REGISTRY
from medseg.tracking.base import NullTracker, Tracker
from medseg.tracking.resilient import URI_FILE, ResilientTracker, replay_journal
from medseg.transport import refuse_clear_text_credentials

if TYPE_CHECKING:
    from medseg.inference.segmenter import ModelResolver
    from medseg.io.layouts import MaskPair

T = TypeVar("T")
_MaskItem = tuple[str, Volume | np.ndarray, Volume | np.ndarray | None, Volume | np.ndarray | None, str]
"""(case name, prediction, reference or None, markers or None, where: for messages)."""
DEFAULT_WORKSPACE = Path(".medseg")


@dataclass(frozen=True)
class WorkflowResult:
    """What a workflow run produced.

    Attributes:
        workflow: the workflow's name.
        parent_run_id: the MLflow parent run.
        tracking_uri: where the runs were recorded.
        metrics: summary metrics of all stages (``eval/seg``, ``eval/iou``, ``eval/dice``...).
        executed: stages that ran; the others were cache hits.
        cached: stages reused from the cache.
        outputs: each stage's output directories in the workspace cache.
        seconds: wall time of each stage in this run (0 for cache hits).
        repeats: for a workflow with ``seeds``, each seed's own result (its outputs, metrics
            and nested run); ``metrics`` then holds the spread (``seed_spread``), ``executed``
            the stages that ran for any seed.
        review_link: the MLflow UI address fragment (after the server URL) of the experiment's
            runs table with the ``eval/*`` columns; ``None`` without MLflow tracking.
        warnings: what a reviewer must know about the outcome, ``<stage>: <warning>`` each
            (``seed <n>: <stage>: ...`` for a workflow with ``seeds``), as the runs' tag
            ``medseg.warning`` holds them: a training the budget's minutes cut short of its steps.

    """

    workflow: str
    parent_run_id: str
    tracking_uri: str
    metrics: dict[str, float]
    executed: list[str]
    cached: list[str]
    outputs: dict[str, dict[str, Path]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    repeats: dict[int, WorkflowResult] = field(default_factory=dict)
    review_link: str | None = None
    warnings: list[str] = field(default_factory=list)


def model_registry(tracking_uri: str) -> ModelResolver:
    """The MLflow registry (and runs) at ``tracking_uri``, as a ``Segmenter.load`` resolver.

    ``Segmenter.load("models:/liver@champion", resolver=model_registry(uri))``.
    """
    from medseg.tracking.mlflow import download_model

    def resolve(source: str, destination: Path) -> Path:
        return download_model(source, tracking_uri, destination)

    return resolve


@dataclass(frozen=True)
class InstalledPlugins:
    """What installed packages add to medseg's registries.

    Attributes:
        entries: one ``Origin`` (group, name, package, version) per entry that loaded.
        broken: the entries that failed to load, each with a one-line reason.

    """

    entries: list[Origin]
    broken: list[Broken]


def installed_plugins() -> InstalledPlugins:
    """Load and list every plugin entry of medseg's entry-point groups (stages, nets, losses, ...)."""
    import medseg.io.layouts
    import medseg.nets
    import medseg.training.losses
    import medseg.training.optim  # noqa: F401 - each module creates its registry

    entries: list[Origin] = []
    broken: list[Broken] = []
    for registry in registries():
        if registry.group is None:
            continue
        entries.extend(origin for name in registry if (origin := registry.origin(name)) is not None)
        broken.extend(registry.broken())
    return InstalledPlugins(entries, broken)


def validate_workflow(path: str | Path) -> ResolvedWorkflow:
    """Load and check a workflow and its pipeline without running anything.

    Raises:
        ConfigError: naming the dotted path of the first problem and the closest valid key.

    """
    return load_workflow(path, REGISTRY)


def workflow_status(path: str | Path, *, workspace: str | Path = DEFAULT_WORKSPACE) -> list[PlannedStage]:
    """For each stage of a workflow: ``cached`` or ``will run`` in ``workspace``.

    A workflow with ``seeds`` lists each seed's stages as ``<stage> (seed <n>)``; stages the
    seeds share (ingest) once.
    """
    resolved = validate_workflow(path)
    runner = Runner(Workspace(Path(workspace)))
    if not resolved.seeds:
        return runner.plan(resolved)
    listed: dict[str, PlannedStage] = {}
    for repeat in resolved.repeats():
        for stage, planned in zip(repeat.stages, runner.plan(repeat), strict=True):
            name = planned.name if stage.spec.data_seeded else f"{planned.name} (seed {repeat.run_seed})"
            listed.setdefault(name, replace(planned, name=name))
    return list(listed.values())


def make_tracker(
    tracking_uri: str | None, workspace: Workspace, *, daemon_idle_s: float = 0.0
) -> tuple[ResilientTracker, str]:
    """An MLflow tracker for ``tracking_uri`` (else the workspace's embedded SQLite store).

    It is wrapped so that metrics, tags and artifacts logged while the server is away are
    journalled in ``<workspace>/tracking-journal/`` and replayed when it is back. With
    ``daemon_idle_s`` > 0 the embedded store is reached through the tracking daemon
    (``tracking/daemon.py``) when one is running, else tracked in-process while one starts
    for the next run, staying up ``daemon_idle_s`` seconds after its last client.
    """
    from medseg.tracking.mlflow import MlflowTracker, redact_uri

    journal = workspace.journal_dir / uuid.uuid4().hex
    inner: Tracker
    if tracking_uri:
        if any(os.environ.get(name) for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_TOKEN")):
            refuse_clear_text_credentials(tracking_uri, "MLflow tracking", os.environ)
        inner = MlflowTracker(tracking_uri)
    else:
        workspace.root.mkdir(parents=True, exist_ok=True)
        tracking_uri = workspace.default_tracking_uri
        inner = _embedded_tracker(workspace, daemon_idle_s)
    return ResilientTracker(inner, journal, tracking_uri=redact_uri(tracking_uri)), tracking_uri


def _embedded_tracker(workspace: Workspace, daemon_idle_s: float) -> Tracker:
    """The workspace store's tracker: the warm daemon's when there is one, else an in-process one."""
    from medseg.tracking.daemon import DaemonTracker, start_daemon
    from medseg.tracking.mlflow import MlflowTracker

    uri, store = workspace.default_tracking_uri, workspace.mlflow_db
    if daemon_idle_s > 0 and (warm := DaemonTracker.connect(uri, store)) is not None:
        return warm
    tracker = MlflowTracker(uri, artifact_root=workspace.artifact_root)
    if daemon_idle_s > 0:
        start_daemon(uri, store, workspace.artifact_root, daemon_idle_s)
    return tracker


def sync_tracking(*, workspace: str | Path = DEFAULT_WORKSPACE, tracking_uri: str | None = None) -> int:
    """Send tracking calls journalled while a server was away; return how many journals were sent.

    Each journal goes to ``tracking_uri`` if given, else to the URI it recorded.

    Raises:
        TrackingError: a server is still unreachable (its journal stays for the next try).

    """
    from medseg.tracking.mlflow import MlflowTracker

    root = Workspace(Path(workspace)).journal_dir
    journals = sorted(path for path in root.iterdir() if path.is_dir()) if root.is_dir() else []
    for journal in journals:
        uri = tracking_uri or (journal / URI_FILE).read_text()
        replay_journal(journal, MlflowTracker(uri))
    return len(journals)


def run_workflow(
    path: str | Path,
    *,
    workspace: str | Path = DEFAULT_WORKSPACE,
    tracking_uri: str | None = None,
    tracker: Tracker | None = None,
    on_event: StageEvent | None = None,
    progress: ProgressCallback | None = None,
    collective: Collective | None = None,
    upstream_of: Sequence[str] = (),
    tracking_daemon_idle_s: float = 0.0,
) -> WorkflowResult:
    """Run a workflow file, reusing cached stages, and track it.

    Args:
        path: the workflow YAML.
        workspace: folder for the cache, private maps and the embedded MLflow store.
        tracking_uri: MLflow tracking URI; default: the workflow's ``tracking.uri``, else
            ``sqlite:///<workspace>/mlflow.db``.
        tracker: a tracker to use instead of MLflow (``tracking_uri`` is then ignored).
        on_event: called with ``(stage, message)`` as stages start, hit the cache or end.
        progress: called with ``(description, completed, total, status)`` during long steps.
        collective: this process's rank in a ``torchrun`` launch (from
            ``medseg.runner.distributed.collective_from_environment``); ranks > 0 train
            with rank 0 and track nothing.
        upstream_of: run only the stages that produce these outputs (``"ingest.dataset"``)
            and what they read; default: every stage.
        tracking_daemon_idle_s: > 0: track the embedded store through the tracking daemon
            (started for later runs if none is up; it exits after this many idle seconds).
            The CLI uses it to keep MLflow's start-up off a rerun; the default tracks in-process.

    Raises:
        ConfigError, DataError, StageError, TrackingError: with a one-line cause and fix.

    """
    resolved = validate_workflow(path)
    if upstream_of:
        resolved = resolved.upstream_of(upstream_of)
    space = Workspace(Path(workspace).resolve())
    uri = tracking_uri or resolved.tracking_uri
    collective = collective or Collective()
    if collective.rank > 0:
        tracker = NullTracker()
    elif tracker is None:
        tracker, uri = make_tracker(uri, space, daemon_idle_s=tracking_daemon_idle_s)
    from medseg.tracking.mlflow import redact_uri

    runner, store = Runner(space, collective), redact_uri(uri or "")
    try:
        if resolved.seeds:
            result = _run_seeds(runner, resolved, tracker, uri or "", on_event, progress, store)
        else:
            outcome = runner.run(resolved, tracker, on_event=on_event, progress=progress, store=store)
            result = _result(outcome, uri or "")
    except BaseException:
        if isinstance(tracker, ResilientTracker):
            with contextlib.suppress(TrackingError):  # best effort; the original error matters
                tracker.flush()
        raise
    else:
        if isinstance(tracker, ResilientTracker):
            tracker.flush()
            result = replace(result, review_link=tracker.review_link(resolved.experiment))
    finally:
        if isinstance(tracker, ResilientTracker):
            tracker.close()
    return result


def _result(outcome: RunOutcome, tracking_uri: str) -> WorkflowResult:
    return WorkflowResult(
        workflow=outcome.workflow,
        parent_run_id=outcome.parent_run_id,
        tracking_uri=tracking_uri,
        metrics=outcome.metrics,
        executed=outcome.executed,
        cached=[stage.name for stage in outcome.stages if stage.cache_hit],
        outputs={stage.name: stage.outputs for stage in outcome.stages},
        seconds={stage.name: stage.seconds for stage in outcome.stages},
        warnings=outcome.warnings,
    )


def seed_spread(per_seed: Mapping[int, Mapping[str, float]]) -> dict[str, float]:
    """Mean and sample standard deviation over seeds of every ``eval/*`` metric all seeds report.

    Returns ``<metric>_mean``, ``<metric>_sd`` (0 for one seed) and each seed's value as
    ``seed_<n>/<metric>``; NaN values are left out of mean and sd.
    """
    shared = set.intersection(*(set(metrics) for metrics in per_seed.values())) if per_seed else set()
    spread: dict[str, float] = {}
    for key in sorted(name for name in shared if name.startswith("eval/")):
        values = np.array([per_seed[seed][key] for seed in per_seed], dtype=float)
        finite = values[np.isfinite(values)]
        spread[f"{key}_mean"] = float(finite.mean()) if finite.size else math.nan
        spread[f"{key}_sd"] = float(finite.std(ddof=1)) if finite.size > 1 else 0.0
        for seed in per_seed:
            spread[f"seed_{seed}/{key}"] = per_seed[seed][key]
    return spread


def _run_seeds(
    runner: Runner,
    resolved: ResolvedWorkflow,
    tracker: Tracker,
    tracking_uri: str,
    on_event: StageEvent | None,
    progress: ProgressCallback | None,
    store: str,
) -> WorkflowResult:
    """Run each seed's repeat nested under one parent run that reports the spread over seeds."""
    title = f"{resolved.name} ({len(resolved.seeds)} seeds)"
    parent = tracker.start_run(
        experiment=resolved.experiment,
        name=f"{title} · running",
        tags={
            "medseg.workflow": resolved.name,
            "medseg.pipeline": resolved.pipeline.name,
            "medseg.seeds": ",".join(map(str, resolved.seeds)),
            "medseg.workflow_digest": resolved.digest,
        },
    )
    repeats: dict[int, WorkflowResult] = {}
    seed = resolved.seed
    try:
        for repeat in resolved.repeats():
            seed = int(repeat.run_seed or 0)
            notify = None if on_event is None else _tagged(on_event, seed)
            outcome = runner.run(
                repeat, tracker, on_event=notify, progress=progress, store=store, parent_run_id=parent
            )
            repeats[seed] = _result(outcome, tracking_uri)
    except BaseException as exc:  # the cause is on the seed's own run, behind the redactor
        failed = {"medseg.error": f"seed {seed} failed; see its run", "mlflow.runName": f"{title} · failed"}
        tracker.set_tags(parent, failed)
        tracker.end_run(parent, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    spread = seed_spread({seed: result.metrics for seed, result in repeats.items()})
    names = [stage.name for stage in resolved.stages]
    executed = {name for result in repeats.values() for name in result.executed}
    ran = [name for name in names if name in executed]
    tracker.log_params(parent, {"seeds": list(resolved.seeds), "seed": resolved.seed})
    tracker.log_metrics(parent, spread)
    what = f"ran {', '.join(ran)}" if ran else "all cached"
    warnings = [f"seed {seed}: {warning}" for seed, result in repeats.items() for warning in result.warnings]
    tracker.set_tags(parent, {"mlflow.runName": f"{title} · {what}", **warning_tag(warnings)})
    tracker.end_run(parent, "FINISHED")
    return WorkflowResult(
        workflow=resolved.name,
        parent_run_id=parent,
        tracking_uri=tracking_uri,
        metrics=spread,
        executed=ran,
        cached=[name for name in names if name not in executed],
        repeats=repeats,
        warnings=warnings,
    )


def _tagged(on_event: StageEvent, seed: int) -> StageEvent:
    """``on_event`` with the seed in front of each message."""

    def tagged(stage: str, message: str) -> None:
        on_event(stage, f"seed {seed}: {message}")

    return tagged


@dataclass(frozen=True)
class PlannedValue:
    """One planned train param: dotted key (``train.patch_size``), JSON value and origin.

    ``origin`` is ``planned`` (from the dataset's fingerprint), ``workflow`` (set in the
    workflow file) or ``pipeline`` (a default of the pipeline definition).
    """

    key: str
    value: object
    origin: str


@dataclass(frozen=True)
class TrainingPlan:
    """The plan of one train stage: its values and what they were derived from."""

    stage: str
    values: list[PlannedValue]
    facts: dict[str, object]


def plan_workflow(
    path: str | Path,
    *,
    workspace: str | Path = DEFAULT_WORKSPACE,
    tracking_uri: str | None = None,
    on_event: StageEvent | None = None,
    progress: ProgressCallback | None = None,
) -> list[TrainingPlan]:
    """The plan of each train stage of a workflow, as its training would use it.

    Runs (or reuses from the cache) the stages that build the training dataset, reads the
    dataset's fingerprint and plans on this machine's device with a trial step, exactly as
    the train stage does.

    Raises:
        ConfigError: the workflow has no train stage, or the plan cannot fit its memory budget.
        DataError, StageError, TrackingError: from building the dataset.

    """
    import yaml

    from medseg.io.dataset import read_index
    from medseg.stages.train import plan_for
    from medseg.training.params import TrainParams

    resolved = validate_workflow(path)
    trains = [stage for stage in resolved.stages if isinstance(stage.params, TrainParams)]
    if not trains:
        raise ConfigError(
            f"workflow {resolved.name}: pipeline {resolved.pipeline.name} has no train stage; nothing to plan"
        )
    sources = [stage.inputs["dataset"] for stage in trains]
    result = run_workflow(
        path,
        workspace=workspace,
        tracking_uri=tracking_uri,
        on_event=on_event,
        progress=progress,
        upstream_of=sources,
    )
    written = (yaml.safe_load(resolved.text) or {}).get("params") or {}
    plans = []
    for stage, source in zip(trains, sources, strict=True):
        producer, output = source.split(".", 1)
        folder = result.outputs[producer][output]
        plan = plan_for(folder, read_index(folder), cast(TrainParams, stage.params), resolved.seed_of(stage))
        mine = written.get(stage.name) or {}
        values = []
        for key, value in plan.values.items():
            origin = "planned"
            if plan.origins[key] == "set":
                origin = "workflow" if _has_key(mine, key) else "pipeline"
            values.append(PlannedValue(f"{stage.name}.{key}", value, origin))
        plans.append(TrainingPlan(stage.name, values, dict(plan.facts)))
    return plans


def _has_key(document: object, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(document, dict) or part not in document:
            return False
        document = document[part]
    return True


def evaluate_masks(
    predictions: str | Path | Sequence[Volume | np.ndarray],
    references: str | Path | Sequence[Volume | np.ndarray],
    *,
    markers: Sequence[Volume | np.ndarray | None] | None = None,
    surface: bool = True,
) -> tuple[EvaluationSummary, list[CaseMetrics]]:
    """CTC SEG and DET, object F1/PQ, IoU/Dice and HD95/ASSD of predicted vs reference labels.

    Args:
        predictions: a folder (CTC RES ``mask<T>.tif``, or NIfTI/TIFF/PNG files) or one
            label image per case (arrays ``(*spatial)`` or label ``Volume``s).
        references: a folder (CTC ``*_GT`` or ``SEG`` with ``man_seg<T>.tif``, or files with
            the same names as the predictions) or label images in the same order.
        markers: with sequences, CTC ``TRA`` marker images in the same order (None entries
            for cases without); folders find them in the GT folder's ``TRA/``. With markers a
            case is fully annotated only when every marker lies on a reference object
            (pixel and object measures are taken on those only) and DET is computed.
        surface: also compute surface distances (mm, from the reference's spacing).

    Returns:
        The dataset summary and the per-case metrics (CTC: also the frames that have markers
        but no SEG mask, which count for DET only).

    Raises:
        DataError: counts, names or shapes differ, or a file is unreadable or not integer.

    """
    from medseg.errors import DataError
    from medseg.io.layouts import is_fully_annotated, pair_masks
    from medseg.io.readers import read_image

    items: Iterable[_MaskItem]
    if isinstance(predictions, str | Path) and isinstance(references, str | Path):
        files = pair_masks(Path(predictions), Path(references))

        def read_pair(pair: MaskPair) -> _MaskItem:
            def read(path: Path | None) -> Volume | None:
                return None if path is None else read_image(path, kind="label")

            against = pair.reference or pair.markers
            names = f"{pair.prediction.name} vs {against.name}" if against else pair.prediction.name
            return (
                pair.name,
                read_image(pair.prediction, kind="label"),
                read(pair.reference),
                read(pair.markers),
                names,
            )

        items = _read_in_order(read_pair, files)
    elif isinstance(predictions, str | Path) or isinstance(references, str | Path):
        raise DataError("pass two folders or two sequences of label images, not one of each")
    else:
        marker_list = list(markers) if markers is not None else [None] * len(references)
        if not len(predictions) == len(references) == len(marker_list):
            raise DataError(
                f"{len(predictions)} predictions, {len(references)} references and {len(marker_list)} "
                "marker images; pass one per case"
            )
        items = [
            (f"case_{n + 1:04d}", p, r, m, f"case {n + 1}")
            for n, (p, r, m) in enumerate(zip(predictions, references, marker_list, strict=True))
        ]
    cases = []
    for name, prediction, reference, marker, where in items:
        pred = _labels(prediction)
        ref = _labels(reference) if reference is not None else None
        mark = _labels(marker) if marker is not None else None
        for other, role in ((ref, "reference"), (mark, "marker image")):
            if other is not None and other.shape != pred.shape:
                raise DataError(f"{where}: prediction shape {pred.shape} differs from {role} {other.shape}")
        spacing = reference.spacing if isinstance(reference, Volume) else None
        full = ref is not None and is_fully_annotated(ref, mark)
        cases.append(
            evaluate_case(
                name, ref, pred, markers=mark, fully_annotated=full, spacing=spacing, surface=surface
            )
        )
    return summarize(cases), cases


def _read_in_order(read: Callable[[MaskPair], T], pairs: Sequence[MaskPair], window: int = 8) -> Iterator[T]:
    """``read`` each pair on a few threads (TIFF/gzip decoding releases the GIL), in order.

    At most ``window`` pairs are in memory at once (a CTC sequence of 1024² frames would
    otherwise hold every frame three times).
    """
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        for start in range(0, len(pairs), window):
            yield from pool.map(read, pairs[start : start + window])


def _labels(item: Volume | np.ndarray) -> np.ndarray:
    return item.array[0] if isinstance(item, Volume) else np.asarray(item)
