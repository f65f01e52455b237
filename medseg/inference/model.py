"""A trained model on disk: ``weights.pt`` (tensors only) and ``model.json`` (its card)."""

from __future__ import annotations

import json
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
    net = build_unet(
        NetParams.model_validate(card["net"]),
        spatial_dims=int(card["spatial_dims"]),
        in_channels=int(card["in_channels"]),
        out_channels=int(card["out_channels"]),
    )
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    except (RuntimeError, ValueError) as exc:
        raise DataError(f"{WEIGHTS_FILE}: weights do not fit the network in {CARD_FILE} ({exc})") from exc
    return net.to(device).eval(), card
