"""The model card: everything inference needs, typed and versioned (no torch import).

Written by the train stage (``model.json`` beside the weights), updated by the postprocess
stage (post-processing chosen on validation) and completed by the export stage
(``model_card.json``: name, segments, evaluation, versions). Every reader goes through
``ModelCard.read``; cards written before version 2 are migrated on reading.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from medseg.errors import DataError
from medseg.inference.settings import InferenceSettings
from medseg.io.preprocessing import Preprocessing
from medseg.nets.unet import NetParams

if TYPE_CHECKING:
    from medseg.io.cohort import OutputFormat
    from medseg.io.dicom import DicomSeries
    from medseg.io.volume import Volume

CARD_VERSION = 2
"""Version 2 (medseg 0.x, this release): ``preprocessing`` is the whole ``Preprocessing``
(version 1 kept ``intensity`` beside an ``orientation``/``spacing`` dict) and ``training``
names its selection measure (``select_on``/``best_val``)."""


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


StopReason = Literal["schedule", "patience", "minutes"]
"""What ended a training run: its last scheduled epoch, early stopping, or a minutes budget."""


class TrainingRecord(_Section):
    """How the weights were trained (``best_val``: the ``select_on`` measure at ``best_epoch``).

    ``planned`` names the train params the dataset's plan decided (the others were set by the
    workflow or pipeline); their values are in the card (``net``, ``inference``) and in the
    model's ``plan.json``. ``stopped_by`` says what ended the training: its last scheduled epoch,
    early stopping (``patience``) or the minutes of its budget (``minutes``; beside a steps budget,
    the run was cut short of its steps). A fold ensemble: ``minutes`` if they cut any fold.
    """

    dataset_digest: str = ""
    train_cases: int = 0
    val_cases: int = 0
    epochs: int = 0
    epochs_run: int = 0
    best_epoch: int = 0
    select_on: str = "dice"
    best_val: float | None = None
    loss: str = ""
    seed: int = 0
    steps_per_s: float | None = None
    stopped_by: StopReason = "schedule"
    planned: tuple[str, ...] = ()


WeightsName = Literal["best", "last"]
"""Which of the train stage's weights a model keeps: best on validation, or the last epoch's."""


class PostprocessingRecord(_Section):
    """How the card's post-processing values were chosen (``measure`` on the ``chosen_by`` split).

    ``weights`` names the weights the model kept: the training's ``best`` validation weights or
    its ``last`` epoch's, whichever scored higher with its own post-processing chosen
    (``weights_scores``: the chosen ``measure`` of each, None where NaN; ``weights_epoch``: the
    epoch kept, None for a fold ensemble). ``smoothing_scores``: the kept weights' chosen
    ``measure`` at each candidate smoothing of the probabilities (σ in voxels, as text; the card's
    ``inference.smoothing`` is the one kept), with the kept mirroring. ``mirror_scores``: the kept
    weights' best ``measure`` without (``off``) and with (``on``) test-time mirroring, each as tried
    (the card's ``inference.mirror`` is the one kept).
    """

    chosen_by: str
    measure: str | None = None
    score: float | None = None
    baseline_score: float | None = None
    candidates: int | None = None
    median_training_object_size: float | None = None
    weights: WeightsName = "best"
    weights_epoch: int | None = None
    weights_scores: dict[str, float | None] = Field(default_factory=dict)
    smoothing_scores: dict[str, float | None] = Field(default_factory=dict)
    mirror_scores: dict[str, float | None] = Field(default_factory=dict)


class SegmentRecord(_Section):
    """A DICOM SEG segment the model writes: label value, name and SNOMED CT codes."""

    number: int = 1
    label: str = "foreground"
    category: tuple[str, str] = ("85756007", "Tissue")
    property_type: tuple[str, str] = ("85756007", "Tissue")


class ModelCard(_Section):
    """What a trained net predicts and how to apply it; one JSON file beside the weights.

    Attributes:
        card_version: the card format (``CARD_VERSION``); older cards are migrated on reading.
        task: one sentence on what the model does.
        spatial_dims, in_channels, out_channels: the network's input and output.
        labels: class value (as text) → class name of the net's output.
        net: the network's architecture (``NetParams``); the weights hold only tensors.
        inference: sliding window and post-processing (``InferenceSettings``).
        preprocessing: what turns a source image into the net's input (``Preprocessing``).
        spacing: voxel spacing (mm) of the first training case, for the record.
        training: how the weights were trained.
        folds: how many cross-validation fold models the weights hold (1: a single model);
            more than 1: a ``FoldEnsemble`` averaging their probabilities.
        postprocessing: how the post-processing values were chosen (postprocess stage).
        formats: the export's files and how to run each (``model.pt2``, ``model.onnx``,
            ``model.ts`` — marked deprecated —, ``weights.pt``).
        name, intended_use, segments, input, output, evaluation, versions, medseg_version:
            written by the export stage.

    """

    card_version: Literal[2] = CARD_VERSION
    task: str = "segmentation"
    spatial_dims: Literal[2, 3]
    in_channels: int
    out_channels: int
    labels: dict[str, str] = {"0": "background", "1": "foreground"}
    net: NetParams
    inference: InferenceSettings
    preprocessing: Preprocessing
    spacing: tuple[float, ...] = ()
    training: TrainingRecord = TrainingRecord()
    folds: int = Field(1, ge=1)
    postprocessing: PostprocessingRecord | None = None
    name: str | None = None
    intended_use: str | None = None
    segments: tuple[SegmentRecord, ...] = ()
    input: str | None = None
    output: str | None = None
    formats: dict[str, str] = {}
    evaluation: dict[str, Any] | None = None
    versions: dict[str, str | None] | None = None
    medseg_version: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _migrate(cls, data: Any) -> Any:
        """Bring a version-1 card (no ``card_version``, an ``intensity`` section) to this version."""
        if not isinstance(data, dict) or "card_version" in data or "intensity" not in data:
            return data
        data = dict(data)
        data["card_version"] = CARD_VERSION
        steps = data.get("preprocessing") or {}
        spatial_dims = data.get("spatial_dims")
        data["preprocessing"] = {
            "spatial_dims": spatial_dims,
            "channels": data.get("in_channels"),
            "orientation": steps.get("orientation") or ("RAS" if spatial_dims == 3 else "as stored"),
            "spacing": steps.get("spacing"),
            "normalize": data.pop("intensity", None) or {"method": "none"},
        }
        training = dict(data.get("training") or {})
        for key in [key for key in training if key.startswith("best_val_")]:
            training["select_on"], training["best_val"] = key.removeprefix("best_val_"), training.pop(key)
        data["training"] = training
        return data

    def write_labels(
        self, labels: Volume, path: Path, output_format: OutputFormat, *, series: DicomSeries | None = None
    ) -> Path:
        """Write this model's predicted ``labels`` as NIfTI, TIFF or DICOM SEG; return ``path``.

        A DICOM SEG holds the card's first declared segment (default: foreground), names the
        model as its algorithm and references ``series``, the source the labels were predicted on.
        """
        from medseg.io.cohort import write_labels
        from medseg.io.dicom_seg import SegmentInfo

        declared = self.segments[0] if self.segments else SegmentRecord()
        segment = SegmentInfo(declared.number, declared.label, declared.category, declared.property_type)
        return write_labels(
            labels, path, output_format, segment=segment, algorithm=self.name or "unet", series=series
        )

    @classmethod
    def parse(cls, document: dict[str, Any], *, where: str = "model card") -> ModelCard:
        """Validate (and migrate) a card document.

        Raises:
            DataError: naming the first wrong field of ``where``.

        """
        try:
            return cls.model_validate(document)
        except ValidationError as exc:
            error = exc.errors()[0]
            field = ".".join(str(part) for part in error["loc"]) or "card"
            raise DataError(f"{where}: {field}: {error['msg']}; re-export or retrain the model") from exc

    @classmethod
    def read(cls, path: Path) -> ModelCard:
        """Read a card file (``model.json`` of a trained model, ``model_card.json`` of an export).

        Raises:
            DataError: the file is missing, not JSON, or not a valid card.

        """
        if not path.is_file():
            raise DataError(f"{path.name} not found beside the weights; point at a trained or exported model")
        try:
            document = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"{path.name}: not JSON ({exc.msg}); re-export the model") from exc
        return cls.parse(document, where=path.name)

    def write(self, path: Path) -> Path:
        """Write the card as indented JSON; return ``path``."""
        path.write_text(json.dumps(self.model_dump(mode="json", exclude_none=True), indent=2))
        return path
