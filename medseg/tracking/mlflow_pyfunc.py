"""MLflow "model from code" for an exported medseg model (loaded by ``mlflow.pyfunc``).

MLflow executes this file when loading the model; the model is not pickled. Input:
``(N, C, *spatial)`` float32 images, already normalised as the model card says. Output:
``(N, *spatial)`` int64 class labels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class TorchScriptSegmenter(PythonModel):
    """Sliding-window inference of the exported TorchScript network."""

    def load_context(self, context: Any) -> None:
        """Load the TorchScript module and the model card."""
        import torch

        from medseg.inference.card import ModelCard

        self._module = torch.jit.load(context.artifacts["torchscript"], map_location="cpu").eval()
        self._inference = ModelCard.read(Path(context.artifacts["card"])).inference

    def predict(self, context: Any, model_input: np.ndarray, params: Any = None) -> np.ndarray:
        """Return class labels ``(N, *spatial)`` for images ``(N, C, *spatial)``."""
        del context, params
        import torch
        from monai.inferers import sliding_window_inference

        images = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.inference_mode():
            logits = sliding_window_inference(
                images,
                roi_size=self._inference.roi_size,
                sw_batch_size=4,
                predictor=self._module,
                overlap=self._inference.overlap,
                mode="gaussian",
            )
        return logits.argmax(dim=1).numpy().astype(np.int64)


mlflow.models.set_model(TorchScriptSegmenter())
