"""A tracker that survives a tracking server going away: calls are journalled and replayed.

When a call that needs no answer (params, metrics, tags, artifacts, closing a run) fails
with ``TrackingError``, it is appended to a journal in the workspace (artifact files are
copied there, since stage outputs move) and every later call first replays the journal in
order, so nothing is reordered or lost. Calls that need an answer — opening a run, logging
a model — cannot wait and raise. At the end of a workflow ``flush`` replays what is left; if
the server is still away it raises, naming the journal, which ``replay_journal`` (``medseg
tracking sync``) sends once the server is back.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medseg.errors import TrackingError
from medseg.tracking.base import DatasetInfo, ModelInfo, RunStatus, Tracker

JOURNAL_FILE = "journal.jsonl"
URI_FILE = "tracking_uri.txt"
_RETRY_AFTER_S = 5.0


class ResilientTracker:
    """Wrap ``inner``, journalling failed fire-and-forget calls under ``journal_dir``.

    Args:
        inner: the real tracker (MLflow).
        journal_dir: a folder of its own for this workflow run (created on first failure).
        retry_after_s: while degraded, wait this long after a failed replay before the next.

    """

    def __init__(
        self,
        inner: Tracker,
        journal_dir: Path,
        *,
        tracking_uri: str = "",
        retry_after_s: float = _RETRY_AFTER_S,
    ) -> None:
        self.inner = inner
        self.journal_dir = journal_dir
        self.tracking_uri = tracking_uri
        self.retry_after_s = retry_after_s
        self._pending = 0
        self._last_failure = 0.0

    @property
    def pending(self) -> int:
        """Calls waiting in the journal."""
        return self._pending

    def start_run(
        self,
        *,
        experiment: str,
        name: str,
        parent_run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> str:
        """Open a run; replays the journal first. Raises ``TrackingError`` if the server is away."""
        self._replay(force=True)
        return self.inner.start_run(experiment=experiment, name=name, parent_run_id=parent_run_id, tags=tags)

    def log_params(self, run_id: str, params: Mapping[str, object]) -> None:
        """Log params (journalled if the server is away)."""
        self._call("log_params", run_id, params=dict(params))

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log metrics at ``step`` (journalled if the server is away)."""
        self._call("log_metrics", run_id, metrics={k: float(v) for k, v in metrics.items()}, step=step)

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        """Set tags (journalled if the server is away)."""
        self._call("set_tags", run_id, tags=dict(tags))

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file or folder (a copy is journalled if the server is away)."""
        self._call("log_artifact", run_id, path=path, artifact_path=artifact_path)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        """Upload text (journalled if the server is away)."""
        self._call("log_text", run_id, text=text, artifact_file=artifact_file)

    def log_dataset(self, run_id: str, dataset: DatasetInfo, context: str) -> None:
        """Record a dataset input (journalled if the server is away)."""
        self._call("log_dataset", run_id, dataset=dataset, context=context)

    def log_model(
        self,
        run_id: str,
        model_dir: Path,
        *,
        registered_name: str | None = None,
        aliases: Sequence[str] = (),
        pip_requirements: list[str] | None = None,
    ) -> ModelInfo:
        """Log a model; replays the journal first. Raises ``TrackingError`` if the server is away."""
        self._replay(force=True)
        return self.inner.log_model(
            run_id,
            model_dir,
            registered_name=registered_name,
            aliases=aliases,
            pip_requirements=pip_requirements,
        )

    def resume_run(self, run_id: str, *, parent_run_id: str) -> None:
        """Reopen a run under ``parent_run_id`` (journalled if the server is away)."""
        self._call("resume_run", run_id, parent_run_id=parent_run_id)

    def end_run(self, run_id: str, status: RunStatus = "FINISHED") -> None:
        """Close a run (journalled if the server is away)."""
        self._call("end_run", run_id, status=status)

    def flush(self) -> None:
        """Replay the journal now.

        Raises:
            TrackingError: calls are still unsent; they stay in the journal for ``medseg tracking sync``.

        """
        self._replay(force=True)
        if self._pending:
            raise TrackingError(
                f"the tracking server did not come back: {self._pending} tracking call(s) (metrics, tags, "
                f"run ends) are kept in {self.journal_dir}; run `medseg tracking sync` when it is reachable "
                "(stage outputs are cached, nothing is recomputed)"
            )

    def review_link(self, experiment: str) -> str | None:
        """The UI address fragment of ``experiment``'s runs table, when the inner tracker knows it."""
        link = getattr(self.inner, "review_link", None)
        try:
            return str(link(experiment)) if callable(link) else None
        except TrackingError:
            return None

    def close(self) -> None:
        """Release the inner tracker's connection, if it holds one (the tracking daemon's)."""
        close = getattr(self.inner, "close", None)
        if callable(close):
            close()

    def _call(self, method: str, run_id: str, **kwargs: Any) -> None:
        if self._pending:
            self._replay()
        if not self._pending:
            try:
                getattr(self.inner, method)(run_id, **kwargs)
                return
            except TrackingError:
                self._last_failure = time.monotonic()
        self._append(method, run_id, kwargs)

    def _append(self, method: str, run_id: str, kwargs: dict[str, Any]) -> None:
        if not self.journal_dir.is_dir():
            self.journal_dir.mkdir(parents=True)
            (self.journal_dir / URI_FILE).write_text(self.tracking_uri)
        if method == "log_artifact":  # stage outputs move on commit: keep a copy
            source = Path(kwargs["path"])
            copy = self.journal_dir / "files" / uuid.uuid4().hex[:12] / source.name
            if source.is_dir():
                shutil.copytree(source, copy)
            else:
                copy.parent.mkdir(parents=True)
                shutil.copy2(source, copy)
            kwargs = {**kwargs, "path": str(copy)}
        if method == "log_dataset":
            kwargs = {**kwargs, "dataset": dataclasses.asdict(kwargs["dataset"])}
        with (self.journal_dir / JOURNAL_FILE).open("a") as journal:
            journal.write(json.dumps({"method": method, "run_id": run_id, "kwargs": kwargs}) + "\n")
        self._pending += 1

    def _replay(self, *, force: bool = False) -> None:
        if not self._pending or (not force and time.monotonic() - self._last_failure < self.retry_after_s):
            return
        try:
            self._pending = replay_journal(self.journal_dir, self.inner)
        except TrackingError:
            self._last_failure = time.monotonic()
            self._pending = _count(self.journal_dir)


def replay_journal(journal_dir: Path, tracker: Tracker) -> int:
    """Send the journalled calls in order, dropping each once sent; return how many remain (0).

    Raises:
        TrackingError: the server failed again; the unsent calls stay in the journal.

    """
    path = journal_dir / JOURNAL_FILE
    if not path.is_file():
        return 0
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for sent, entry in enumerate(entries):
        kwargs = dict(entry["kwargs"])
        if entry["method"] == "log_artifact":
            kwargs["path"] = Path(kwargs["path"])
        if entry["method"] == "log_dataset":
            kwargs["dataset"] = DatasetInfo(**kwargs["dataset"])
        try:
            getattr(tracker, entry["method"])(entry["run_id"], **kwargs)
        except TrackingError:
            _rewrite(path, entries[sent:])
            raise
    shutil.rmtree(journal_dir)
    return 0


def _rewrite(path: Path, entries: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(entry) + "\n" for entry in entries))


def _count(journal_dir: Path) -> int:
    path = journal_dir / JOURNAL_FILE
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.is_file() else 0
