"""A deterministic 2D fluorescence-cell phantom in the Cell Tracking Challenge layout.

It lets the demo run on a machine without any dataset: ``medseg demo`` writes it, next to a
copy of the example workflow ``demo.yaml``, and runs that workflow.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage


def phantom_frame(
    rng: np.random.Generator, size: int, n_cells: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One frame: image ``(size, size)`` uint16, instance labels uint16, TRA markers uint16.

    Cells are ellipses (radii 5–11 px) at least nearly apart, with textured bright interiors,
    blurred, on a dim noisy background.
    """
    yy, xx = np.mgrid[0:size, 0:size]
    labels = np.zeros((size, size), dtype=np.uint16)
    markers = np.zeros_like(labels)
    centres: list[tuple[float, float, float]] = []
    attempts = 0
    while len(centres) < n_cells and attempts < 500:
        attempts += 1
        radius_a, radius_b = rng.uniform(5, 11, size=2)
        cy, cx = rng.uniform(radius_a + 2, size - radius_a - 2, size=2)
        if any(np.hypot(cy - y, cx - x) < radius_a + r - 1 for y, x, r in centres):
            continue
        angle = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = dy * np.cos(angle) + dx * np.sin(angle)
        v = -dy * np.sin(angle) + dx * np.cos(angle)
        inside = (u / radius_a) ** 2 + (v / radius_b) ** 2 <= 1
        label = len(centres) + 1
        labels[inside & (labels == 0)] = label
        markers[(dy**2 + dx**2 <= 4) & inside] = label
        centres.append((cy, cx, max(radius_a, radius_b)))
    brightness = np.zeros((size, size))
    for label in range(1, len(centres) + 1):
        brightness[labels == label] = rng.uniform(0.5, 1.0)
    texture = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), 1.5)
    signal = ndimage.gaussian_filter(brightness * (1 + 0.2 * texture), 1.0)
    noisy = 0.08 + signal + rng.normal(0, 0.04, (size, size))
    image = np.clip(noisy * 2000, 0, 65535).astype(np.uint16)
    return image, labels, markers


def write_phantom_ctc(root: Path, *, frames: int = 24, size: int = 128, seed: int = 0) -> Path:
    """Write a phantom sequence ``01`` in CTC layout under ``root``; return ``root``.

    Files: ``01/tNNN.tif``, ``01_GT/SEG/man_segNNN.tif``, ``01_GT/TRA/man_trackNNN.tif``.
    The same ``seed`` always gives byte-identical pixel data.
    """
    import tifffile

    rng = np.random.default_rng(seed)
    folders = [root / "01", root / "01_GT" / "SEG", root / "01_GT" / "TRA"]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    for t in range(frames):
        image, labels, markers = phantom_frame(rng, size, int(rng.integers(8, 15)))
        tifffile.imwrite(folders[0] / f"t{t:03d}.tif", image)
        tifffile.imwrite(folders[1] / f"man_seg{t:03d}.tif", labels)
        tifffile.imwrite(folders[2] / f"man_track{t:03d}.tif", markers)
    return root
