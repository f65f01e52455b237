"""Sliding-window prediction and conversion of foreground masks to instance labels."""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from medseg.inference.settings import InferenceSettings


def predict_logits(
    net: torch.nn.Module,
    image: np.ndarray,
    *,
    roi_size: tuple[int, ...],
    overlap: float,
    device: torch.device,
    sw_batch_size: int = 4,
) -> torch.Tensor:
    """Logits of ``net`` over a whole image by Gaussian-blended sliding windows.

    Args:
        net: network in eval mode on ``device``.
        image: channel-first image ``(C, *spatial)``, float32, normalised.
        roi_size: window size in voxels, one entry per spatial axis.
        overlap: fraction of window overlap in ``[0, 1)``.

    Returns:
        Logits ``(out_channels, *spatial)`` on the CPU.

    """
    from monai.inferers import sliding_window_inference

    batch = torch.as_tensor(image, dtype=torch.float32, device=device)[None]
    with torch.inference_mode():
        logits = sliding_window_inference(
            batch, roi_size, sw_batch_size, net, overlap=overlap, mode="gaussian"
        )
    return logits[0].cpu()


def foreground_to_instances(foreground: np.ndarray, *, min_size: int, fill_holes: bool = True) -> np.ndarray:
    """Label connected foreground components, dropping those smaller than ``min_size`` voxels.

    Args:
        foreground: boolean mask, any spatial shape.
        min_size: smallest object kept, in voxels.
        fill_holes: fill background enclosed by foreground first (cells and organs have
            no holes; speckle inside bright nuclei is a classifier error).

    Returns:
        int32 instance labels ``1..n`` of the same shape, 0 for background.

    """
    if fill_holes:
        foreground = ndimage.binary_fill_holes(foreground)
    labels, count = ndimage.label(foreground)
    if count == 0:
        return labels.astype(np.int32)
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_size
    keep[0] = False
    relabel = np.zeros(count + 1, dtype=np.int32)
    relabel[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return relabel[labels]


def segment_instances(
    net: torch.nn.Module,
    image: np.ndarray,
    settings: InferenceSettings,
    *,
    device: torch.device,
    sw_batch_size: int = 4,
) -> np.ndarray:
    """Instance labels ``(*spatial)`` int32 for an image ``(C, *spatial)`` (argmax > 0 is foreground)."""
    logits = predict_logits(
        net,
        image,
        roi_size=settings.roi_size,
        overlap=settings.overlap,
        device=device,
        sw_batch_size=sw_batch_size,
    )
    return foreground_to_instances(
        logits.argmax(dim=0).numpy() > 0,
        min_size=settings.min_object_size,
        fill_holes=settings.fill_holes,
    )
