"""ONNX export with dynamic batch and spatial axes, checked against PyTorch in ONNX Runtime."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from medseg.errors import StageError

OPSET = 18
"""ONNX opset written: recent enough for every op of the MONAI U-Nets (instance norm, deconv)."""


ONNX_EXPORTERS = {
    "dynamo": "torch.onnx dynamo exporter (from the torch.export program)",
    "torchscript": "torch.onnx TorchScript-based exporter (deprecated with TorchScript)",
}
"""The ONNX exporters medseg uses, as the model card names them."""


def export_onnx(
    net: torch.nn.Module,
    example: torch.Tensor,
    path: Path,
    *,
    program: torch.export.ExportedProgram | None = None,
) -> tuple[str, str]:
    """Write ``net`` (eval, CPU) as ONNX: ``image`` ``(N, C, *spatial)`` → ``logits``; N, spatial dynamic.

    With ``program`` (``net`` under ``torch.export``, dynamic sizes declared) the dynamo
    exporter converts it; where it cannot (no onnxscript, an operator it lacks) or without a
    program, the TorchScript-based exporter traces ``net`` from ``example`` ``(1, C, *spatial)``.

    Returns:
        The exporter used (a key of ``ONNX_EXPORTERS``) and why the dynamo one was not
        (``""`` when it was).

    """
    reason = "no torch.export program"
    if program is not None:
        try:
            pair = torch.cat([example, example]).cpu()
            torch.onnx.export(
                program, (pair,), str(path), input_names=["image"], output_names=["logits"],
                opset_version=OPSET, dynamo=True, verbose=False,
            )  # fmt: skip
        except (ImportError, torch.onnx.OnnxExporterError) as exc:
            reason = f"the dynamo exporter failed with {type(exc).__name__}"  # its text may name local paths
        else:
            return "dynamo", ""
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
    return "torchscript", reason


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
