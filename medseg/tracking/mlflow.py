"""MLflow implementation of the ``Tracker`` protocol (with ``flavor.py``, the only modules importing mlflow).

Runs are addressed by id through ``MlflowClient``; nesting uses the ``mlflow.parentRunId``
tag, so the MLflow UI shows one parent run per workflow run with a child per stage.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import numpy as np

from medseg.errors import TrackingError
from medseg.tracking import flavor
from medseg.tracking.base import DatasetInfo, ModelInfo, RunStatus

if TYPE_CHECKING:
    from medseg.inference.card import ModelCard

# MLflow 3 sends usage telemetry by default; a hospital's tracking never leaves the hospital.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
_P = ParamSpec("_P")
_R = TypeVar("_R")
_MAX_PARAM_LENGTH = 6000
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
"""A model-training experiment (MLflow 3's UIs otherwise open a new experiment on the GenAI overview)."""
REVIEW_VIEW = "medseg"
"""The runs-table view medseg stores in each experiment (``mlflow.sharedViewState.<this>``)."""
REVIEW_COLUMNS = (
    "attributes.`Dataset`",
    "attributes.`Models`",
    *(f"metrics.`eval/{name}`" for name in ("seg", "det", "op_csb", "dice", "objects_per_case")),
)
"""Columns of that view: the dataset, the model, and the scores a reviewer compares."""


def review_fragment(experiment_id: str) -> str:
    """The MLflow UI address (after the server URL) of the experiment's runs table in medseg's view.

    ``workflowType=machine_learning`` opens the training runs: MLflow 3.17's UI otherwise
    starts on the GenAI overview whatever the experiment's kind; ``viewStateShareKey`` shows
    the ``eval/*`` columns.
    """
    return f"#/experiments/{experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={REVIEW_VIEW}"


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
        self._artifact_uris: dict[str, str] = {}

    @_wrap_errors
    def experiment_id(self, name: str) -> str:
        """Return the id of experiment ``name``, creating it when missing."""
        if name not in self._experiments:
            experiment = self._client.get_experiment_by_name(name)
            if experiment is not None:
                self._experiments[name] = experiment.experiment_id
                tags = dict(experiment.tags)
            else:
                location = None
                if self._artifact_root is not None:
                    location = (self._artifact_root / _safe_folder(name)).resolve().as_uri()
                self._experiments[name] = self._client.create_experiment(name, artifact_location=location)
                tags = {}
            experiment_id = self._experiments[name]
            for key, value in _experiment_tags(experiment_id).items():
                if key not in tags:  # a reviewer's own description or view is kept
                    self._client.set_experiment_tag(experiment_id, key, value)
        return self._experiments[name]

    def review_link(self, experiment: str) -> str:
        """The UI address fragment of ``experiment``'s runs table in medseg's view (``review_fragment``)."""
        return review_fragment(self.experiment_id(experiment))

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
        self._artifact_uris[run.info.run_id] = run.info.artifact_uri
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

    def _artifact_repository(self, run_id: str) -> Any:
        """The artifact store of ``run_id``, addressed by the location ``create_run`` returned.

        ``MlflowClient.log_artifact`` fetches the run to learn that location (one request per
        run, about a second on a password-checking server); only a run this tracker did not
        open (a resumed one) is fetched, once.
        """
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        if run_id not in self._artifact_uris:
            self._artifact_uris[run_id] = self._client.get_run(run_id).info.artifact_uri
        return get_artifact_repository(self._artifact_uris[run_id], tracking_uri=self.tracking_uri)

    @_wrap_errors
    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file, or a directory's contents, under ``artifact_path``."""
        repository = self._artifact_repository(run_id)
        if path.is_dir():
            repository.log_artifacts(str(path), artifact_path)
        else:
            repository.log_artifact(str(path), artifact_path)

    @_wrap_errors
    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        """Upload ``text`` as ``artifact_file`` (a run-relative POSIX path)."""
        folder, _, name = artifact_file.rpartition("/")
        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch) / name
            path.write_text(text, encoding="utf-8")
            self.log_artifact(run_id, path, folder or None)

    @_wrap_errors
    def log_dataset(self, run_id: str, dataset: DatasetInfo, context: str) -> None:
        """Log ``dataset`` as a dataset input (``mlflow.data.context`` = ``context``)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        entity = Dataset(
            name=dataset.name,
            digest=dataset.digest,
            source_type="medseg",
            source=dataset.source,
            profile=json.dumps(dict(dataset.profile)),
        )
        tags = [InputTag("mlflow.data.context", context)]
        self._client.log_inputs(run_id, datasets=[DatasetInput(entity, tags=tags)])

    @_wrap_errors
    def log_model(
        self,
        run_id: str,
        model_dir: Path,
        *,
        registered_name: str | None = None,
        aliases: Sequence[str] = (),
        pip_requirements: list[str] | None = None,
    ) -> ModelInfo:
        """Log ``model_dir`` (an export folder) as an MLflow model; register it if named.

        The model has the ``medseg`` flavor (``tracking/flavor.py``: loads back as a
        ``Segmenter``, card readable without weights) beside a pyfunc defined from code
        (``mlflow_pyfunc.py``: the whole ``Segmenter``, any image size, signature from the
        card), not pickled; its artifacts are the export's ``model.ts``, ``weights.pt`` and
        ``model_card.json``; ``pip_requirements`` default to medseg's pinned dependencies. A registered
        version gets the card's summary as its description, ``medseg.*`` tags (task, labels,
        spacing, metrics) and the ``aliases`` (moved from any older version).
        """
        from medseg.inference.card import ModelCard

        mlflow = self._mlflow
        card = ModelCard.read(model_dir / "model_card.json")
        # Logged by run id: the caller's active run or experiment (mlflow.set_experiment) is
        # neither used nor changed.
        with _fluent_tracking_uri(mlflow, self.tracking_uri):
            info = flavor.log_model(
                model_dir,
                "model",
                run_id=run_id,
                registered_model_name=registered_name,
                pip_requirements=pip_requirements,
            )
        version = info.registered_model_version
        if registered_name is not None and version is not None:
            version = str(version)
            self._client.update_model_version(registered_name, version, description=_card_summary(card))
            for key, value in _card_tags(card).items():
                self._client.set_model_version_tag(registered_name, version, key, value)
            for alias in aliases:
                self._client.set_registered_model_alias(registered_name, alias, version)
        return ModelInfo(
            uri=str(info.model_uri),
            registered_name=registered_name,
            registered_version=str(version) if version is not None else None,
        )

    @_wrap_errors
    def resume_run(self, run_id: str, *, parent_run_id: str) -> None:
        """Mark a run RUNNING again and move it under ``parent_run_id``."""
        self._client.update_run(run_id, status="RUNNING")
        self._client.set_tag(run_id, "mlflow.parentRunId", parent_run_id)

    @_wrap_errors
    def end_run(self, run_id: str, status: RunStatus = "FINISHED") -> None:
        """Close a run with one request to the store.

        ``MlflowClient.set_terminated`` first fetches the run to print a "View run" link on
        stdout when the store is a server: a library prints nothing, and the CLI shows the
        parent run's link itself.
        """
        from mlflow.entities import RunStatus as MlflowRunStatus

        ended = int(time.time() * 1000)
        store = self._client._tracking_client.store
        store.update_run_info(
            run_id, run_status=MlflowRunStatus.from_string(status), end_time=ended, run_name=None
        )


def download_model(source: str, tracking_uri: str, destination: Path) -> Path:
    """Download a logged medseg model and return the folder holding its export files.

    Args:
        source: ``models:/name/version``, ``models:/name@alias``, ``runs:/<run id>/model``, or
            a run id: the export stage's run, or a workflow's parent run (its export child).
        tracking_uri: the MLflow tracking (and registry) URI.
        destination: an empty folder to download into.

    Raises:
        TrackingError: the model, version, alias or run does not exist, or the store fails.

    """
    import mlflow
    from mlflow.tracking import MlflowClient

    where = redact_uri(tracking_uri)
    try:
        uri = source
        if not source.startswith(("models:/", "runs:/")):
            client = MlflowClient(tracking_uri=tracking_uri)
            run = client.get_run(source)
            if run.data.tags.get("medseg.stage_type") != "export":
                children = client.search_runs(
                    [run.info.experiment_id],
                    filter_string=(
                        f"tags.mlflow.parentRunId = '{source}' and tags.`medseg.stage_type` = 'export'"
                    ),
                )
                if not children:
                    raise TrackingError(
                        f"run {source} at {where} is neither an export stage run nor the parent of one; "
                        "pass the run of a workflow that exported a model"
                    )
                source = children[0].info.run_id
            uri = f"runs:/{source}/model"
        with _fluent_tracking_uri(mlflow, tracking_uri):
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(destination)))
    except TrackingError:
        raise
    except Exception as exc:
        reason = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise TrackingError(
            f"cannot fetch model '{source}' from MLflow at {where}: {reason}; check the name, version "
            "or alias (mlflow UI → Models) and that the server is reachable"
        ) from exc
    return local / "artifacts"


def _card_summary(card: ModelCard) -> str:
    """The registered version's description: what the model does and how it scored."""
    scores = ", ".join(
        f"{name} {float(value):.3f}"
        for name, value in (card.evaluation or {}).items()
        if isinstance(value, int | float)
    )
    return (
        f"{card.task}; {card.spatial_dims}D, labels {card.labels}; "
        f"intensity {card.preprocessing.normalize.method}; spacing {list(card.spacing)} mm; "
        f"test-set {scores or 'not evaluated'}. Intended use: {card.intended_use or 'research'}. "
        "Full card: artifacts/model_card.json"
    )


def _card_tags(card: ModelCard) -> dict[str, str]:
    """Searchable ``medseg.*`` tags of a registered version."""
    return {
        "medseg.task": card.task,
        "medseg.spatial_dims": str(card.spatial_dims),
        "medseg.labels": json.dumps(card.labels),
        "medseg.spacing_mm": json.dumps(list(card.spacing)),
        "medseg.training_data_digest": card.training.dataset_digest,
        "medseg.version": card.medseg_version or "",
    }


def _experiment_tags(experiment_id: str) -> dict[str, str]:
    """Tags that make an experiment open, for a reviewer, as the model-training runs it holds."""
    view = {"selectedColumns": list(REVIEW_COLUMNS)}
    return {
        EXPERIMENT_KIND_TAG: EXPERIMENT_KIND,
        f"mlflow.sharedViewState.{REVIEW_VIEW}": json.dumps(view),
        "mlflow.note.content": (
            "medseg segmentation training runs: one parent run per `medseg run` (named after what ran), "
            "one child per stage. [Open the runs table with the eval scores]"
            f"({review_fragment(experiment_id)}); select runs → Compare to set `eval/*` side by side."
        ),
    }


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
