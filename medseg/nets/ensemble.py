"""A fold ensemble as one network: the members' class probabilities averaged.

The ensemble returns the logarithm of the mean softmax of its members, so everything that
reads logits downstream (softmax, argmax, sliding windows, TorchScript and ONNX export) sees
the averaged probabilities without knowing there are several nets (nnU-Net averages softmax
outputs the same way).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

PROBABILITY_FLOOR = 1e-8
"""log(0) guard for averaged or smoothed probabilities: a class nothing predicts stays finite."""


class FoldEnsemble(torch.nn.Module):
    """``(N, C, *spatial)`` → log of the members' mean class probabilities ``(N, K, *spatial)``."""

    def __init__(self, members: Sequence[torch.nn.Module]) -> None:
        super().__init__()
        self.members = torch.nn.ModuleList(members)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Average the members' softmax and return its log (logits of the ensemble)."""
        total = self.members[0](image).softmax(dim=1)
        for member in self.members[1:]:
            total = total + member(image).softmax(dim=1)
        return (total / len(self.members)).clamp_min(PROBABILITY_FLOOR).log()


def ensemble_state(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of a ``FoldEnsemble`` whose members hold ``states`` (in fold order)."""
    return {
        f"members.{fold}.{name}": tensor
        for fold, state in enumerate(states)
        for name, tensor in state.items()
    }
