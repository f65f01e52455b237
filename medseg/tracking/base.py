"""The ``Tracker`` protocol through which stages and the runner record runs.

Only ``medseg.tracking.mlflow`` imports mlflow; everything else talks to this protocol with
explicit run ids (no global "active run"), so several runs can be open at once.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

RunStatus = Literal["FINISHED", "FAILED", "KILLED"]


@dataclass(frozen=True)
class ModelInfo:
    """Where a logged model lives: its URI and, when registered, name and version."""

    uri: str
    registered_name: str | None = None
    registered_version: str | None = None


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset as a run's input: what the MLflow UI's Dataset column and lineage show.

    Attributes:
        name: a display name (the workflow and the stage output, never a source path).
        digest: a content digest of the dataset artifact (hex).
        source: where it lives, without paths (the cache key of the stage that wrote it).
        profile: counts a reviewer reads (cases per split, dimensionality, labels).

    """

    name: str
    digest: str
    source: str
    profile: Mapping[str, object]


class Tracker(Protocol):
    """Records runs, params, metrics, tags, artifacts and models."""

    def start_run(
        self,
        *,
        experiment: str,
        name: str,
        parent_run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> str:
        """Open a run (nested under ``parent_run_id`` when given) and return its id."""
        ...

    def log_params(self, run_id: str, params: Mapping[str, object]) -> None:
        """Log params under dotted keys."""
        ...

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log metrics; ``step`` is the epoch for curves."""
        ...

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        """Set tags on a run."""
        ...

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file or a directory's contents."""
        ...

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        """Upload ``text`` as the artifact ``artifact_file``."""
        ...

    def log_dataset(self, run_id: str, dataset: DatasetInfo, context: str) -> None:
        """Record ``dataset`` as an input of the run; ``context`` says its use (``training``...)."""
        ...

    def log_model(
        self,
        run_id: str,
        model_dir: Path,
        *,
        registered_name: str | None = None,
        aliases: Sequence[str] = (),
        pip_requirements: list[str] | None = None,
    ) -> ModelInfo:
        """Log an exported model folder as a model (the whole segmenter, signature from its card).

        With ``registered_name`` the model is registered as a new version of that model,
        described by its card and given ``aliases``.
        """
        ...

    def resume_run(self, run_id: str, *, parent_run_id: str) -> None:
        """Reopen a run (of a killed process) under ``parent_run_id`` to keep logging into it."""
        ...

    def end_run(self, run_id: str, status: RunStatus = "FINISHED") -> None:
        """Close a run with its final status."""
        ...


class NullTracker:
    """A tracker that records nothing, for API calls made with tracking switched off."""

    def start_run(
        self,
        *,
        experiment: str,
        name: str,
        parent_run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> str:
        """Return a fresh local run id."""
        del experiment, name, parent_run_id, tags
        return uuid.uuid4().hex

    def log_params(self, run_id: str, params: Mapping[str, object]) -> None:
        """Record nothing."""

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Record nothing."""

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        """Record nothing."""

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        """Record nothing."""

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        """Record nothing."""

    def log_dataset(self, run_id: str, dataset: DatasetInfo, context: str) -> None:
        """Record nothing."""

    def log_model(
        self,
        run_id: str,
        model_dir: Path,
        *,
        registered_name: str | None = None,
        aliases: Sequence[str] = (),
        pip_requirements: list[str] | None = None,
    ) -> ModelInfo:
        """Return the local folder as the model's URI."""
        del run_id, registered_name, aliases, pip_requirements
        return ModelInfo(uri=model_dir.as_uri())

    def resume_run(self, run_id: str, *, parent_run_id: str) -> None:
        """Record nothing."""

    def end_run(self, run_id: str, status: RunStatus = "FINISHED") -> None:
        """Record nothing."""


def flatten_params(params: Mapping[str, object], prefix: str = "") -> dict[str, object]:
    """Flatten nested mappings into dotted keys: ``{"optim": {"lr": 1}}`` → ``{"optim.lr": 1}``."""
    flat: dict[str, object] = {}
    for key, value in params.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, dotted))
        else:
            flat[dotted] = value
    return flat
