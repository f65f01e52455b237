"""MLflow "model from code" of an exported medseg model: the whole ``Segmenter`` for ``mlflow.pyfunc``.

MLflow executes this file when loading the model; nothing is pickled. The model carries the
medseg package itself (``code_paths``), so ``mlflow.pyfunc.load_model`` and ``mlflow models
serve`` run exactly what ``Segmenter.predict`` runs — the card's preprocessing, sliding windows
(and the fold ensemble), post-processing, instance labelling, and the mapping back onto the input
grid — where only the model's pip requirements are installed.

Input: ``(N, C, *spatial)`` float32 images as acquired (not normalised), any spatial size.
Param ``spacing``: voxel spacing in mm, array axis order (default: the card's training spacing).
Output: ``(N, *spatial)`` int32 instance labels (0 = background), one image per input image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class SegmenterModel(PythonModel):
    """``Segmenter.predict`` over a batch of images."""

    def load_context(self, context: Any) -> None:
        """Load the export folder (weights loaded weights-only, as the card says)."""
        from medseg.inference.segmenter import Segmenter

        self._segmenter = Segmenter.from_export(Path(context.artifacts["card"]).parent)

    def predict(
        self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None
    ) -> np.ndarray:
        """Return instance labels ``(N, *spatial)`` for images ``(N, C, *spatial)``."""
        del context
        spacing = (params or {}).get("spacing")
        images = np.asarray(model_input, dtype=np.float32)
        labels = [
            self._segmenter.predict(
                image, spacing=tuple(float(value) for value in spacing) if spacing else None
            )
            for image in images
        ]
        return np.stack([label.array[0] for label in labels]).astype(np.int32)


mlflow.models.set_model(SegmenterModel())
