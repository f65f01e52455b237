"""A trained model on disk: ``weights.pt`` (tensors only) and ``model.json`` (its ``ModelCard``)."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from medseg.errors import DataError
from medseg.inference.card import ModelCard
from medseg.nets.ensemble import FoldEnsemble
from medseg.nets.unet import build_net

WEIGHTS_FILE = "weights.pt"
LAST_WEIGHTS_FILE = "last_weights.pt"
"""In a trained model's folder: the last epoch's weights beside the best validation ones."""
CARD_FILE = "model.json"
FOLDS_FILE = "folds.json"
"""In a fold ensemble's model folder: ``{"folds": k, "cases": {case id: fold}}`` (out-of-fold use)."""


def save_model(
    folder: Path,
    state_dict: dict[str, torch.Tensor],
    card: ModelCard,
    *,
    weights_file: str = WEIGHTS_FILE,
) -> None:
    """Write weights (as ``weights_file``) and the card (``model.json``) into ``folder``."""
    torch.save(state_dict, folder / weights_file)
    card.write(folder / CARD_FILE)


def load_model(folder: Path, device: torch.device) -> tuple[torch.nn.Module, ModelCard]:
    """Rebuild the network from its card and load its weights (weights-only, no unpickling).

    Returns:
        The network in eval mode on ``device`` and the card.

    Raises:
        DataError: the card or weights are missing or do not fit the network.

    """
    card_path, weights_path = folder / CARD_FILE, folder / WEIGHTS_FILE
    if not card_path.is_file() or not weights_path.is_file():
        raise DataError(f"model folder lacks {CARD_FILE} or {WEIGHTS_FILE}; point at a trained model")
    card = ModelCard.read(card_path)
    return network_from_card(card, weights_path, fix="retrain the model").to(device), card


def network_from_card(card: ModelCard, weights_path: Path, *, fix: str) -> torch.nn.Module:
    """The network a card describes, with weights from ``weights_path`` (weights-only load).

    A card with ``folds`` > 1 describes a ``FoldEnsemble`` of that many nets.

    Args:
        card: the model card (its ``net``, ``spatial_dims``, ``in_channels``, ``out_channels``).
        weights_path: a ``state_dict`` saved by ``torch.save`` (tensors only).
        fix: what the user should do when card and weights disagree (ends the error).

    Returns:
        The network in eval mode on the CPU.

    Raises:
        DataError: the weights do not fit the card's network.

    """
    try:
        nets = [
            build_net(
                card.net,
                spatial_dims=card.spatial_dims,
                in_channels=card.in_channels,
                out_channels=card.out_channels,
            )
            for _ in range(card.folds)
        ]
        net = nets[0] if card.folds == 1 else FoldEnsemble(nets)
        net.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
    except (ValueError, RuntimeError, pickle.UnpicklingError) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise DataError(
            f"{weights_path.name}: the weights do not fit the network its card describes ({reason}); {fix}"
        ) from exc
    return net.eval()
