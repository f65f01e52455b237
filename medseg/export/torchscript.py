"""TorchScript export with a parity check against the eager network."""

from __future__ import annotations

from pathlib import Path

import torch


def export_torchscript(net: torch.nn.Module, example: torch.Tensor, path: Path) -> torch.jit.ScriptModule:
    """Trace ``net`` (eval mode, CPU) on ``example`` ``(1, C, *spatial)`` and save it to ``path``."""
    net = net.cpu().eval()
    with torch.inference_mode():
        traced = torch.jit.trace(net, example.cpu(), check_trace=False)
    traced.save(str(path))
    return torch.jit.load(str(path), map_location="cpu")


def max_abs_difference(net: torch.nn.Module, module: torch.nn.Module, inputs: torch.Tensor) -> float:
    """Largest absolute logit difference between ``net`` and an exported ``module`` on ``inputs``."""
    with torch.inference_mode():
        return float((net(inputs) - module(inputs)).abs().max())
