"""MLflow implementation of the ``Tracker`` protocol (the only module importing mlflow).

Runs are addressed by id through ``MlflowClient``; nesting uses the ``mlflow.parentRunId``
tag, so the MLflow UI shows one parent run per workflow run with a child per stage.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import numpy as np

from medseg.errors import TrackingError
from medseg.tracking.base import ModelInfo, RunStatus

_P = ParamSpec("_P")
_R = TypeVar("_R")
_PYFUNC_SOURCE = Path(__file__).with_name("mlflow_pyfunc.py")
_MAX_PARAM_LENGTH = 6000


def redact_uri(uri: str) -> str:
    """Return ``uri`` without user credentials (``https://user:pw@host`` → ``https://host``)."""
    return re.sub(r"//[^/@]*@", "//", uri)


def _wrap_errors(method: Callable[_P, _R]) -> Callable[_P, _R]:
    """Turn MLflow and connection errors into a one-line ``TrackingError`` naming the store."""

    @functools.wraps(method)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(*args, **kwargs)
        except TrackingError:
            raise
        except Exception as exc:
            tracker = args[0]
            uri = redact_uri(getattr(tracker, "tracking_uri", "?"))
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise TrackingError(
                f"MLflow tracking at {uri} failed in {method.__name__}: {reason[:300]}; "
                "check that the tracking server is running and reachable"
            ) from exc

    return wrapper


class MlflowTracker:
    """Track runs in MLflow.

    Args:
        tracking_uri: ``sqlite:///...`` for the embedded store, or a server URL.
        artifact_root: folder for the artifacts of experiments this tracker creates
            (used with the embedded store); ``None`` lets the server decide.

    """

    def __init__(self, tracking_uri: str, artifact_root: Path | None = None) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self._artifact_root = artifact_root
        self._mlflow = mlflow
        self._client = MlflowClient(tracking_uri=tracking_uri)
        self._experiments: dict[str, str] = {}

    @_wrap_errors
    def experiment_id(self, name: str) -> str:
        """Return the id of experiment ``name``, creating it when missing."""
        if name not in self._experiments:
            experiment = self._client.get_experiment_by_name(name)
            if experiment is not None:
                self._experiments[name] = experiment.experiment_id
            else:
                location = None
                if self._artifact_root is not None:
                    location = (self._artifact_root / _safe_folder(name)).resolve().as_uri()
                self._experiments[name] = self._client.create_experiment(name, artifact_location=location)
        return self._experiments[name]

    @_wrap_errors
    def start_run(
        self,
        *,
        experiment: str,
        name: str,
        parent_run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> str:
        """Open a run and return its id."""
        all_tags = dict(tags or {})
        if parent_run_id is not None:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self._client.create_run(self.experiment_id(experiment), tags=all_tags, run_name=name)
        return str(run.info.run_id)

    @_wrap_errors
    def log_params(self, run_id: str, params: Mapping[str, object]) -> None:
        """Log params (values stringified, long values cut to MLflow's limit)."""
        from mlflow.entities import Param

        entries = [Param(key, _param_value(value)) for key, value in params.items()]
        for start in range(0, len(entries), 100):
            self._client.log_batch(run_id, params=entries[start : start + 100])

    @_wrap_errors
    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log finite metrics at ``step``; NaN values are skipped."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        entries = [
            Metric(key, float(value), now, step or 0) for key, value in metrics.items() if np.isfinite(value)
        ]
        if entries:
            self._client.log_batch(run_id, metrics=entries)

    @_wrap_errors
    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        """Set tags."""
        from mlflow.entities import RunTag

        self._client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    @_wrap_errors
    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file, or a directory's contents, under ``artifact_path``."""
        if path.is_dir():
            self._client.log_artifacts(run_id, str(path), artifact_path)
        else:
            self._client.log_artifact(run_id, str(path), artifact_path)

    @_wrap_errors
    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        """Upload ``text`` as ``artifact_file``."""
        self._client.log_text(run_id, text, artifact_file)

    @_wrap_errors
    def log_model(
        self,
        run_id: str,
        model_dir: Path,
        *,
        input_example: np.ndarray,
        output_example: np.ndarray,
        registered_name: str | None = None,
        pip_requirements: list[str] | None = None,
    ) -> ModelInfo:
        """Log ``model_dir`` (``model.ts`` + ``model_card.json``) as an MLflow pyfunc model.

        The model is defined from code (``mlflow_pyfunc.py``), not pickled: loading it runs
        medseg's own module and ``torch.jit.load``, never unpickles a Python object.
        """
        from mlflow.models import infer_signature

        mlflow = self._mlflow
        signature = infer_signature(input_example, output_example)
        with _fluent_tracking_uri(mlflow, self.tracking_uri), mlflow.start_run(run_id=run_id, nested=True):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(_PYFUNC_SOURCE),
                artifacts={
                    "torchscript": str(model_dir / "model.ts"),
                    "card": str(model_dir / "model_card.json"),
                },
                signature=signature,
                input_example=input_example,
                pip_requirements=pip_requirements,
                registered_model_name=registered_name,
            )
        version = info.registered_model_version
        return ModelInfo(
            uri=str(info.model_uri),
            registered_name=registered_name,
            registered_version=str(version) if version is not None else None,
        )

    @_wrap_errors
    def end_run(self, run_id: str, status: RunStatus = "FINISHED") -> None:
        """Close a run."""
        self._client.set_terminated(run_id, status=status)


def _param_value(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text[:_MAX_PARAM_LENGTH]


def _safe_folder(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "experiment"


@contextlib.contextmanager
def _fluent_tracking_uri(mlflow: Any, tracking_uri: str) -> Iterator[None]:
    """Point MLflow's fluent API at ``tracking_uri`` for a block, then restore it.

    ``mlflow.set_tracking_uri`` also writes ``MLFLOW_TRACKING_URI`` into ``os.environ``;
    a library must not leave that behind for the caller's later subprocesses.
    """
    previous_env = os.environ.get("MLFLOW_TRACKING_URI")
    previous_uri = mlflow.get_tracking_uri() if previous_env is not None else None
    mlflow.set_tracking_uri(tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous_uri)
        if previous_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous_env
