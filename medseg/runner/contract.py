"""The stage contract: what a stage declares and what it receives when it runs."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from medseg.params import Params
from medseg.tracking.base import ModelInfo, Tracker

P = TypeVar("P", bound=Params)


class ProgressCallback(Protocol):
    """``progress(description, completed, total, status)``: report progress of a long step."""

    def __call__(self, description: str, completed: float, total: float, status: str = "") -> None:
        """Report that ``completed`` of ``total`` units are done; ``status`` is a short note."""


def _no_progress(description: str, completed: float, total: float, status: str = "") -> None:
    del description, completed, total, status


@dataclass
class StageContext:
    """What a running stage may use besides its params, inputs and output directories.

    Attributes:
        stage: the stage's name in the pipeline (``train``).
        key: this execution's cache key.
        input_digests: content digest of each named input.
        seed: the workflow seed; every random choice derives from it.
        tracker: the tracking backend; ``run_id`` is this stage's nested run.
        private_dir: workspace folder for data that must never be logged (case → source map).
        scratch_dir: workspace folder of this execution (its cache key) that survives a failed
            or killed run and is deleted on commit: checkpoints to resume from.
        progress: progress callback.
        on_private: told every private map this stage keeps, so that the tracking boundary
            redacts those source names (``runner``'s redactor).

    """

    stage: str
    key: str
    input_digests: Mapping[str, str]
    seed: int
    tracker: Tracker
    run_id: str
    private_dir: Path
    scratch_dir: Path
    progress: ProgressCallback = field(default=_no_progress)
    on_private: Callable[[Mapping[str, str]], None] | None = None

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log metrics to this stage's run."""
        self.tracker.log_metrics(self.run_id, metrics, step=step)

    def log_params(self, params: Mapping[str, object]) -> None:
        """Log params this stage decided (e.g. chosen values) to its run."""
        self.tracker.log_params(self.run_id, params)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file or directory to this stage's run."""
        self.tracker.log_artifact(self.run_id, path, artifact_path)

    def keep_private(self, source_map: Mapping[str, str]) -> None:
        """Write the map ``case id → source`` to ``<private_dir>/<key>.json`` (never logged)."""
        self.private_dir.mkdir(parents=True, exist_ok=True)
        (self.private_dir / f"{self.key}.json").write_text(json.dumps(dict(source_map), indent=2))
        if self.on_private is not None:
            self.on_private(source_map)

    def log_model(self, model_dir: Path, **kwargs: Any) -> ModelInfo:
        """Log an exported model folder to this stage's run (see ``Tracker.log_model``)."""
        return self.tracker.log_model(self.run_id, model_dir, **kwargs)


class Kind(StrEnum):
    """What a stage input or output holds; wiring is checked by kind before any work.

    Each kind has one reader and one writer:

    - ``source``: files as the user has them (a workflow input, a PACS retrieval); read by the
      layouts of ``io.layouts`` / ``io.cohort.discover_images``.
    - ``dataset``: ``dataset.json`` + ``cases/`` (``io.dataset.read_index`` / ``write_index``).
    - ``model``: ``weights.pt`` + ``model.json`` (``inference.model.load_model`` / ``save_model``).
    - ``export``: ``weights.pt``, ``model_card.json``, ``model.ts``, ``model.onnx``
      (``Segmenter.from_export``; written by the export stage). An export is also a model.
    - ``report``: ``summary.json``, ``cases.csv``, ``report.html`` (``metrics.report``).
    - ``images``: ``images.json`` + ``cases/`` as read for prediction (``stages.predict``).
    - ``labels``: ``predictions.csv`` + ``cases/<id>/label.nii.gz`` (``stages.predict``).
    - ``masks``: mask files, one per case (``io.cohort.write_labels``).
    - ``receipt``: what was stored where (``stages.pacs``).
    """

    SOURCE = "source"
    DATASET = "dataset"
    MODEL = "model"
    EXPORT = "export"
    REPORT = "report"
    IMAGES = "images"
    LABELS = "labels"
    MASKS = "masks"
    RECEIPT = "receipt"

    def satisfies(self, wanted: Kind) -> bool:
        """Whether an artifact of this kind may feed an input that wants ``wanted``."""
        return self is wanted or (self is Kind.EXPORT and wanted is Kind.MODEL)


def ports(**kinds: Kind) -> Mapping[str, Kind]:
    """A stage's inputs or outputs, name → kind, read-only: ``ports(dataset=Kind.DATASET)``."""
    return MappingProxyType(kinds)


class Stage(ABC, Generic[P]):
    """A stage type: name, version, params model, typed inputs/outputs and ``execute``.

    Subclass it, set the class attributes and implement ``execute``; add an instance to
    ``medseg.stages.REGISTRY``. Bump ``version`` on any change of behaviour: it is part of the
    cache key. ``pure`` is False for stages whose result depends on more than their inputs (a
    live PACS query); their outputs are still digested so that downstream caching holds.
    ``distributed`` stages run on every rank of a ``torchrun`` launch (see
    ``runner.distributed``); the others run on rank 0 only. ``data_seeded`` stages (ingest:
    the split) keep the workflow's ``seed`` when a workflow repeats its run over ``seeds``.
    """

    name: ClassVar[str]
    version: ClassVar[int]
    params: ClassVar[type[Params]]
    inputs: ClassVar[Mapping[str, Kind]] = MappingProxyType({})
    outputs: ClassVar[Mapping[str, Kind]]
    pure: ClassVar[bool] = True
    distributed: ClassVar[bool] = False
    data_seeded: ClassVar[bool] = False
    description: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Check that a concrete stage declares at least one output."""
        super().__init_subclass__(**kwargs)
        if "outputs" in cls.__dict__ and not cls.outputs:
            raise ValueError(
                f"stage {cls.__dict__.get('name', cls.__name__)} must declare at least one output"
            )

    @abstractmethod
    def execute(
        self, context: StageContext, params: P, inputs: Mapping[str, Path], outputs: Mapping[str, Path]
    ) -> dict[str, float]:
        """Run the stage: read ``inputs``, write ``outputs`` (directories), return summary metrics."""

    def warnings(self, metrics: Mapping[str, float]) -> list[str]:
        """What a reviewer must be told about an outcome, read from its summary ``metrics``.

        Read from the metrics (not kept by ``execute``) so that a cache hit tells it again. The
        runner tags the stage run and the workflow's run ``medseg.warning`` with each, and the
        command line prints them; none by default.
        """
        return []
