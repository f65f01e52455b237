"""medseg: reproducible MONAI U-Net segmentation pipelines tracked in MLflow.

The public API is imported lazily so that ``import medseg`` (and the CLI's start-up) stays
fast; heavy libraries (torch, MONAI, MLflow) load on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from medseg._version import __version__

if TYPE_CHECKING:
    from medseg.api import (
        WorkflowResult,
        evaluate_masks,
        model_registry,
        run_workflow,
        validate_workflow,
        workflow_status,
    )
    from medseg.errors import ConfigError, DataError, MedsegError, StageError, TrackingError
    from medseg.inference.card import ModelCard
    from medseg.inference.segmenter import Segmenter
    from medseg.io.ingest import IngestParams
    from medseg.io.preprocessing import Preprocessing
    from medseg.io.readers import read_image, write_image
    from medseg.io.volume import Volume
    from medseg.metrics.evaluate import EvaluationSummary
    from medseg.stages.evaluate import EvaluateParams
    from medseg.stages.export import ExportParams
    from medseg.training.params import TrainParams

_EXPORTS = {
    "Volume": "medseg.io.volume",
    "read_image": "medseg.io.readers",
    "write_image": "medseg.io.readers",
    "Segmenter": "medseg.inference.segmenter",
    "ModelCard": "medseg.inference.card",
    "Preprocessing": "medseg.io.preprocessing",
    "model_registry": "medseg.api",
    "evaluate_masks": "medseg.api",
    "run_workflow": "medseg.api",
    "validate_workflow": "medseg.api",
    "workflow_status": "medseg.api",
    "WorkflowResult": "medseg.api",
    "EvaluationSummary": "medseg.metrics.evaluate",
    "IngestParams": "medseg.io.ingest",
    "TrainParams": "medseg.training.params",
    "EvaluateParams": "medseg.stages.evaluate",
    "ExportParams": "medseg.stages.export",
    "MedsegError": "medseg.errors",
    "ConfigError": "medseg.errors",
    "DataError": "medseg.errors",
    "StageError": "medseg.errors",
    "TrackingError": "medseg.errors",
}

__all__ = [
    "ConfigError",
    "DataError",
    "EvaluateParams",
    "EvaluationSummary",
    "ExportParams",
    "IngestParams",
    "MedsegError",
    "ModelCard",
    "Preprocessing",
    "Segmenter",
    "StageError",
    "TrackingError",
    "TrainParams",
    "Volume",
    "WorkflowResult",
    "__version__",
    "evaluate_masks",
    "model_registry",
    "read_image",
    "run_workflow",
    "validate_workflow",
    "workflow_status",
    "write_image",
]


def __getattr__(name: str) -> Any:
    """Import a public name on first access."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'medseg' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
