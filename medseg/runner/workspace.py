"""The workspace: one folder holding the stage cache, private maps, scratch and the MLflow store.

Every path inside a workspace is spelled here and nowhere else.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from medseg.runner.cache import StageCache


@dataclass(frozen=True)
class CollectedGarbage:
    """What ``Workspace.collect_garbage`` removed: cache entries and abandoned checkpoint folders."""

    cache_entries: int
    scratch_folders: int


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
    def journal_dir(self) -> Path:
        """Tracking calls journalled while a tracking server was away (``tracking.resilient``)."""
        return self.root / "tracking-journal"

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

    def cache(self) -> StageCache:
        """The stage cache of this workspace."""
        return StageCache(self.cache_dir)

    def private_map(self, key: str) -> Path:
        """The private ``case id → source`` map a stage execution ``key`` kept (never logged)."""
        return self.private_dir / f"{key}.json"

    def scratch(self, key: str) -> Path:
        """The scratch folder of stage execution ``key`` (deleted when it commits)."""
        return self.scratch_dir / key

    def collect_garbage(self, keep: Iterable[str]) -> CollectedGarbage:
        """Delete cache entries and scratch folders whose key is not in ``keep``, and stale temp dirs."""
        kept = set(keep)
        removed = self.cache().gc(kept) if self.cache_dir.is_dir() else 0
        scratch = self.scratch_dir
        abandoned = [path for path in scratch.iterdir() if path.name not in kept] if scratch.is_dir() else []
        for path in abandoned:  # checkpoints of runs that died and that no kept workflow can resume
            shutil.rmtree(path)
        return CollectedGarbage(removed, len(abandoned))
