"""MLflow "model from code" for an exported medseg model (loaded by ``mlflow.pyfunc``).

MLflow executes this file when loading the model; the model is not pickled. It runs where only
the model's pip requirements (torch, MONAI, numpy) are installed, not medseg, so it reads the
card's ``inference`` section as JSON rather than through ``ModelCard``. Input:
``(N, C, *spatial)`` float32 images, already normalised as the model card says. Output:
``(N, *spatial)`` int64 class labels.
"""

from __future__ import annotations

import json
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

        self._module = torch.jit.load(context.artifacts["torchscript"], map_location="cpu").eval()
        self._card = json.loads(Path(context.artifacts["card"]).read_text())

    def predict(self, context: Any, model_input: np.ndarray, params: Any = None) -> np.ndarray:
        """Return class labels ``(N, *spatial)`` for images ``(N, C, *spatial)``."""
        del context, params
        import torch
        from monai.inferers import sliding_window_inference

        images = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.inference_mode():
            logits = sliding_window_inference(
                images,
                roi_size=tuple(self._card["inference"]["roi_size"]),
                sw_batch_size=4,
                predictor=self._module,
                overlap=float(self._card["inference"]["overlap"]),
                mode="gaussian",
            )
        return logits.argmax(dim=1).numpy().astype(np.int64)


mlflow.models.set_model(TorchScriptSegmenter())
