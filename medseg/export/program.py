"""``torch.export`` export (an ``ExportedProgram``, ``model.pt2``) with dynamic batch and spatial sizes.

TorchScript is deprecated from PyTorch 2.9 on; ``torch.export`` is its successor (and what
MONAI is moving to). The program is loaded back with ``torch.export.load`` and run with
``program.module()(image)``; its logits are checked against the eager network like the other
formats.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from medseg.export.onnx import within_bound
from medseg.export.torchscript import max_abs_difference


def export_program(
    net: torch.nn.Module, example: torch.Tensor, divisors: Sequence[int], path: Path
) -> torch.export.ExportedProgram:
    """Export ``net`` (eval, CPU) from ``example`` ``(1, C, *spatial)``: any batch, sizes × ``divisors``.

    The dynamic sizes are declared (batch 1…4096, each spatial axis ``divisor × k``), which
    ``torch.export`` checks in a second rather than searching for them; the program is saved to
    ``path`` and returned (in memory: the ONNX dynamo exporter converts it).
    """
    from torch.export import Dim

    dynamic = {0: Dim("batch", min=1, max=4096)}
    for axis, divisor in enumerate(divisors, start=2):
        dynamic[axis] = divisor * Dim(f"blocks_{axis - 2}", min=1, max=4096)
    pair = torch.cat([example, example]).cpu()  # traced on a batch of 2: a size-1 axis would be fixed at 1
    with torch.no_grad():
        program = torch.export.export(net.cpu().eval(), (pair,), dynamic_shapes=(dynamic,))
    torch.export.save(program, str(path))
    return program


def program_parity(
    net: torch.nn.Module, path: Path, inputs: Sequence[torch.Tensor], *, bound: float = 1e-3
) -> float:
    """Largest absolute logit difference between the program saved at ``path`` and ``net`` over ``inputs``.

    Raises:
        StageError: the difference exceeds ``bound`` (the exported graph is not the network).

    """
    module = torch.export.load(str(path)).module()
    worst = max(max_abs_difference(net, module, batch) for batch in inputs)
    return within_bound(worst, bound, "torch.export program")
