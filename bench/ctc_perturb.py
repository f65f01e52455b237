"""Plausible CTC results made from real ground truth, for checking evaluators against py-ctcmetrics.

Each frame's TRA markers of GOWT1 01 (one region per cell, all 92 frames) are grown into cells
and then perturbed deterministically: one cell dropped (false negative), two neighbours merged
(a vertex split in AOGM-D terms), one cell split in two halves, one shifted, fragments and a
spurious object added (false positives). Written as a complete CTC RES folder (``mask<T>.tif``
for every marker frame and a ``res_track.txt`` in which each object is a one-frame track), so
that py-ctcmetrics' own sequence evaluation runs on it unchanged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage

from medseg.io.layouts import ctc_mask_name


def perturb_markers(markers: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A result ``(H, W)`` uint16 from marker labels: grown cells with every kind of detection error."""
    cells = ndimage.grey_dilation(markers, size=7)
    ids = [int(i) for i in np.unique(cells) if i]
    result = np.zeros(markers.shape, np.int32)
    order = rng.permutation(ids)
    for index, label in enumerate(order):
        mask = cells == label
        if index == 0 and len(ids) > 4:
            continue  # dropped
        if index == 1 and len(ids) > 4:
            mask = np.roll(mask, 18, axis=int(rng.integers(2)))  # shifted
        target = index + 1
        if index == 3 and len(ids) > 4:
            target = 3  # merged with the object at index 2
        result[mask & (result == 0)] = target
        if index == 4 and len(ids) > 5:  # split into two halves along its centre row
            rows = np.nonzero(mask.any(axis=1))[0]
            half = mask.copy()
            half[: (rows[0] + rows[-1]) // 2] = False
            result[half] = len(ids) + 10
    for number in range(3):  # fragments of 10-30 px, and one large spurious object
        y, x = rng.integers(20, markers.shape[0] - 20), rng.integers(20, markers.shape[1] - 20)
        size = int(rng.integers(3, 6))
        result[y : y + size, x : x + size] = len(ids) + 20 + number
    result[2:40, 2:40] = len(ids) + 30
    return result.astype(np.uint16)


def write_perturbed_sequence(gt: Path, res: Path, *, seed: int = 0) -> int:
    """Write a perturbed RES folder for every ``TRA`` frame of ``gt``; return the frame count.

    Labels are made unique across frames (each object its own one-frame track) and listed in
    ``res_track.txt`` as the CTC format requires.
    """
    rng = np.random.default_rng(seed)
    res.mkdir(parents=True, exist_ok=True)
    tracks, next_label = [], 1
    frames = sorted((gt / "TRA").glob("man_track*.tif"))
    for path in frames:
        frame = int(path.stem.removeprefix("man_track"))
        local = perturb_markers(tifffile.imread(path), rng)
        ids = [int(i) for i in np.unique(local) if i]
        relabel = np.zeros(int(local.max()) + 1, np.uint16)
        for label in ids:
            relabel[label] = next_label
            tracks.append(f"{next_label} {frame} {frame} 0")
            next_label += 1
        tifffile.imwrite(res / ctc_mask_name(frame), relabel[local])
    (res / "res_track.txt").write_text("\n".join(tracks) + "\n")
    return len(frames)
