"""A trained model on disk: ``weights.pt`` (tensors only) and ``model.json`` (its card)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch

from medseg.errors import DataError
from medseg.nets.unet import NetParams, build_unet

WEIGHTS_FILE = "weights.pt"
CARD_FILE = "model.json"


def save_model(
    folder: Path,
    state_dict: dict[str, torch.Tensor],
    card: dict[str, Any],
    *,
    weights_file: str = WEIGHTS_FILE,
) -> None:
    """Write weights (as ``weights_file``) and card into ``folder``.

    ``card`` holds ``spatial_dims``, ``in_channels``, ``out_channels``, ``net`` (NetParams
    as data), ``inference`` (``roi_size``, ``overlap``, ``min_object_size``), ``intensity``
    and ``labels``.
    """
    torch.save(state_dict, folder / weights_file)
    (folder / CARD_FILE).write_text(json.dumps(card, indent=2))


def load_model(folder: Path, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the network from its card and load its weights (weights-only, no unpickling).

    Returns:
        The network in eval mode on ``device`` and the card.

    Raises:
        DataError: the card or weights are missing or do not fit the network.

    """
    card_path, weights_path = folder / CARD_FILE, folder / WEIGHTS_FILE
    if not card_path.is_file() or not weights_path.is_file():
        raise DataError(f"model folder lacks {CARD_FILE} or {WEIGHTS_FILE}; point at a trained model")
    card = json.loads(card_path.read_text())
    return network_from_card(card, weights_path, fix="retrain the model").to(device), card


def network_from_card(card: dict[str, Any], weights_path: Path, *, fix: str) -> torch.nn.Module:
    """The network a card describes, with weights from ``weights_path`` (weights-only load).

    Args:
        card: a model card with ``net``, ``spatial_dims``, ``in_channels``, ``out_channels``.
        weights_path: a ``state_dict`` saved by ``torch.save`` (tensors only).
        fix: what the user should do when card and weights disagree (ends the error).

    Returns:
        The network in eval mode on the CPU.

    Raises:
        DataError: the card is incomplete or the weights do not fit its network.

    """
    try:
        net = build_unet(
            NetParams.model_validate(card["net"]),
            spatial_dims=int(card["spatial_dims"]),
            in_channels=int(card["in_channels"]),
            out_channels=int(card["out_channels"]),
        )
        net.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
    except (KeyError, ValueError, RuntimeError, pickle.UnpicklingError) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise DataError(
            f"{weights_path.name}: the weights do not fit the network its card describes ({reason}); {fix}"
        ) from exc
    return net.eval()
