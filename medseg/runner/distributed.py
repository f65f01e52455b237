"""Rank > 0 of a ``torchrun`` launch: which rank runs what, and how the ranks agree.

Rank 0 runs every stage as in a single-process run (cache, tracking, commits). Stages that
declare ``distributed=True`` (train) run on every rank together; the other ranks write their
outputs nowhere and track nothing. After each stage rank 0 tells the others whether it
succeeded (``Collective.agree``), so a failure on rank 0 stops every rank instead of leaving
them waiting. The process-group helpers live in ``medseg.collective``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from medseg.errors import StageError
from medseg.runner.cache import DigestMemo
from medseg.runner.outcome import RunOutcome, StageOutcome
from medseg.tracking.base import NullTracker

if TYPE_CHECKING:
    from medseg.runner.contract import ProgressCallback
    from medseg.runner.engine import Produced, Runner
    from medseg.runner.spec import ResolvedStage, ResolvedWorkflow


def follow(runner: Runner, workflow: ResolvedWorkflow, progress: ProgressCallback | None) -> RunOutcome:
    """Rank > 0: train with rank 0, wait for it on the other stages.

    Nothing is tracked or committed here; outputs of distributed stages are discarded
    (rank 0 writes them). Returns the stages as rank 0 committed them.
    """
    outcome = RunOutcome(workflow=workflow.name, parent_run_id="")
    memo = DigestMemo(None)  # rank 0 holds the workspace memo open for writing
    produced: Produced = {}
    try:
        for stage in workflow.stages:
            if stage.spec.distributed:
                _run_discarded(runner, workflow, stage, memo, produced, progress)
            if not runner.collective.agree(True):
                raise StageError(f"stage {stage.name} failed on rank 0; its output says why")
            resolved = runner.resolve_inputs(stage, workflow, memo, produced)
            key = runner.key(stage, workflow.seed_of(stage), resolved[0]) if resolved else None
            manifest = runner.cache.manifest(key) if key else None
            if manifest is None:
                raise StageError(f"stage {stage.name}: rank 0 committed no output")
            outputs = runner.outputs(manifest.key, stage)
            result = StageOutcome(
                stage.name, manifest.key, True, "", manifest.run_id, manifest.metrics, 0.0, outputs
            )
            produced[stage.name] = result
            outcome.stages.append(result)
    finally:
        memo.close()
    return outcome


def _run_discarded(
    runner: Runner,
    workflow: ResolvedWorkflow,
    stage: ResolvedStage,
    memo: DigestMemo,
    produced: Produced,
    progress: ProgressCallback | None,
) -> None:
    """Run a distributed stage on a rank > 0 unless it is cached, discarding its outputs."""
    resolved = runner.resolve_inputs(stage, workflow, memo, produced)
    if resolved is None:
        raise StageError(f"stage {stage.name}: an upstream stage left no committed output")
    digests, inputs = resolved
    key = runner.key(stage, workflow.seed_of(stage), digests)
    if stage.spec.pure and runner.cache.manifest(key) is not None:
        return
    with tempfile.TemporaryDirectory(prefix=f"rank{runner.collective.rank}-") as folder:
        outputs = {name: Path(folder) / name for name in stage.spec.outputs}
        for path in outputs.values():
            path.mkdir()
        context = runner.context(workflow, stage, key, digests, NullTracker(), "", progress)
        stage.spec.execute(context, stage.params, inputs, outputs)
