"""Surface distances in mm (MONAI): 95th-percentile Hausdorff and average symmetric distance."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def surface_distances(
    reference: np.ndarray, prediction: np.ndarray, spacing: Sequence[float] | None
) -> tuple[float, float]:
    """HD95 and ASSD between two boolean masks, in mm.

    Args:
        reference: boolean mask ``(*spatial)``.
        prediction: boolean mask, same shape.
        spacing: voxel spacing in mm per array axis (default 1).

    Returns:
        ``(hd95, assd)``; both NaN when either mask is empty (distance undefined).

    """
    if not reference.any() or not prediction.any():
        return math.nan, math.nan
    import torch
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    def one_hot(mask: np.ndarray) -> torch.Tensor:
        tensor = torch.as_tensor(mask, dtype=torch.float32)
        return torch.stack([1 - tensor, tensor])[None]

    y_pred, y = one_hot(prediction), one_hot(reference)
    spacing_list = [float(s) for s in spacing] if spacing is not None else None
    hd95 = compute_hausdorff_distance(
        y_pred, y, include_background=False, percentile=95, spacing=spacing_list
    )
    assd = compute_average_surface_distance(
        y_pred, y, include_background=False, symmetric=True, spacing=spacing_list
    )
    return float(hd95.item()), float(assd.item())
