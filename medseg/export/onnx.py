"""ONNX export with dynamic batch and spatial axes, checked against PyTorch in ONNX Runtime."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from medseg.errors import StageError

OPSET = 18
"""ONNX opset written: recent enough for every op of the MONAI U-Nets (instance norm, deconv)."""


def export_onnx(net: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    """Write ``net`` (eval, CPU) as ONNX: ``image`` ``(N, C, *spatial)`` → ``logits``; N, spatial dynamic."""
    spatial = {axis: f"spatial_{axis - 2}" for axis in range(2, example.dim())}
    axes = {0: "batch", **spatial}
    with torch.inference_mode():
        torch.onnx.export(
            net.cpu().eval(),
            (example.cpu(),),
            str(path),
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": axes, "logits": axes},
            opset_version=OPSET,
            dynamo=False,
        )


def onnx_parity(
    net: torch.nn.Module, path: Path, inputs: Sequence[torch.Tensor], *, bound: float = 1e-3
) -> float:
    """Largest absolute logit difference between ONNX Runtime (CPU) and ``net`` over ``inputs``.

    Raises:
        StageError: the difference exceeds ``bound`` (the exported graph is not the network).

    """
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    with torch.inference_mode():
        for batch in inputs:
            expected = net(batch).numpy()
            (found,) = session.run(["logits"], {"image": batch.numpy()})
            worst = max(worst, float(np.abs(found - expected).max()))
    return within_bound(worst, bound, "ONNX export")


def within_bound(worst: float, bound: float, exported: str) -> float:
    """``worst``, the largest logit difference of an ``exported`` format from PyTorch, if within ``bound``.

    Raises:
        StageError: it exceeds ``bound`` (the exported graph is not the network).

    """
    if worst > bound:
        raise StageError(
            f"{exported} differs from PyTorch by {worst:.2e} (bound {bound:g}); report this model"
        )
    return worst
