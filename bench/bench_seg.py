"""CTC SEG evaluation: medseg vs py-ctcmetrics (the challenge's Python metrics) on the same masks.

The reference masks are the real GOWT1 sequence-01 SEG ground truth (30 frames, 1024×1024);
the "result" masks are the same objects deterministically perturbed (relabelled, dilated or
eroded, one object per frame dropped, one merged with a neighbour, a spurious object added),
written as CTC RES ``mask<T>.tif``. Both tools read the files and compute SEG; the figure is
the median wall time over repetitions, and the largest difference of the SEG values.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage

import medseg
from medseg.io.layouts import ctc_mask_name

GT = Path(__file__).resolve().parents[2] / "shared" / "data" / "ctc" / "Fluo-N2DH-GOWT1" / "01_GT"


def perturb(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A plausible segmentation result from reference instance labels ``(H, W)``."""
    ids = [int(i) for i in np.unique(labels) if i]
    result = np.zeros(labels.shape, np.uint16)
    new_ids = rng.permutation(np.arange(1, len(ids) + 1)) + 100
    for index, label in enumerate(ids):
        mask = labels == label
        if index == 0 and len(ids) > 2:
            continue  # dropped: a missed object
        mask = (
            ndimage.binary_dilation(mask, iterations=2)
            if index % 2
            else ndimage.binary_erosion(mask, iterations=3)
        )
        target = new_ids[1] if index == 2 and len(ids) > 2 else new_ids[index]  # merge object 2 into 1
        result[mask & (result == 0)] = target
    result[5:25, 5:25] = 9999  # a spurious object
    return result


def write_results(folder: Path, frames: int) -> list[tuple[Path, Path]]:
    """Write perturbed RES masks for the first ``frames`` GT frames; return (ref, res) pairs."""
    rng = np.random.default_rng(0)
    pairs = []
    for ref in sorted((GT / "SEG").glob("man_seg*.tif"))[:frames]:
        frame = int(ref.stem.removeprefix("man_seg"))
        res = folder / ctc_mask_name(frame)
        tifffile.imwrite(res, perturb(tifffile.imread(ref), rng))
        pairs.append((ref, res))
    return pairs


def run_det(*, repetitions: int = 3) -> dict[str, object]:
    """DET + SEG + OP_CSB of a whole sequence (every TRA frame of GOWT1 01): medseg vs py-ctcmetrics.

    The result masks are the markers grown into cells with every kind of detection error
    (``bench.ctc_perturb``); py-ctcmetrics runs its own sequence evaluation on one process.
    """
    from ctc_metrics.scripts.evaluate import evaluate_sequence

    from bench.ctc_perturb import write_perturbed_sequence

    times: dict[str, list[float]] = {"medseg": [], "ctc": []}
    differences = []
    with tempfile.TemporaryDirectory() as folder:
        res = Path(folder) / "RES"
        n_frames = write_perturbed_sequence(GT, res)
        for _ in range(repetitions):
            start = time.perf_counter()
            summary, _cases = medseg.evaluate_masks(res, GT, surface=False)
            times["medseg"].append(time.perf_counter() - start)
            start = time.perf_counter()
            expected = evaluate_sequence(str(res), str(GT), metrics=["DET", "SEG"], threads=1)
            times["ctc"].append(time.perf_counter() - start)
            differences += [
                abs(summary.det - expected["DET"]),
                abs(summary.seg - expected["SEG"]),
                abs(summary.op_csb - expected["OP_CSB"]),
            ]
    median = {key: statistics.median(values) for key, values in times.items()}
    return {
        "benchmark": f"DET+SEG+OP_CSB of {n_frames} GOWT1 frames, read + compute; py-ctcmetrics on 1 process",
        "medseg_s": round(median["medseg"], 4),
        "baseline_s": round(median["ctc"], 4),
        "speedup": round(median["ctc"] / median["medseg"], 1),
        "seg": round(summary.seg, 6),
        "max_abs_difference": f"{max(differences):.1e}",
        "target": f"DET {summary.det:.4f}; speedup >= 10, difference < 1e-9",
    }


def run(*, repetitions: int = 5, frames: int = 30, det: bool = True) -> list[dict[str, object]]:
    """Rows: medseg vs py-ctcmetrics (one process, then all CPUs), speed ratio, SEG difference.

    Also splits medseg's time into loading the masks and computing SEG (target: computing
    well under loading).
    """
    from ctc_metrics.metrics import seg as ctc_seg
    from ctc_metrics.scripts.evaluate import match_computed_to_reference_masks

    from medseg.io.readers import read_image
    from medseg.metrics import evaluate_case

    with tempfile.TemporaryDirectory() as folder:
        res_dir, gt_dir = Path(folder) / "RES", Path(folder) / "GT"
        res_dir.mkdir()
        (gt_dir / "SEG").mkdir(parents=True)
        pairs = write_results(res_dir, frames)
        for ref, _ in pairs:
            (gt_dir / "SEG" / ref.name).symlink_to(ref)
        times: dict[str, list[float]] = {"medseg": [], "load": [], "compute": [], "ctc 1": [], "ctc all": []}
        differences = []
        for _ in range(repetitions):
            start = time.perf_counter()
            summary, _cases = medseg.evaluate_masks(res_dir, gt_dir, surface=False)
            times["medseg"].append(time.perf_counter() - start)
            start = time.perf_counter()
            arrays = [
                (read_image(r, kind="label").array[0], read_image(c, kind="label").array[0]) for r, c in pairs
            ]
            times["load"].append(time.perf_counter() - start)
            start = time.perf_counter()
            for ref, res in arrays:
                evaluate_case("frame", ref, res)
            times["compute"].append(time.perf_counter() - start)
            for threads in (1, 0):
                start = time.perf_counter()
                matched = match_computed_to_reference_masks(
                    [str(ref) for ref, _ in pairs], [str(res) for _, res in pairs], threads=threads
                )
                value = ctc_seg(matched["labels_ref"], matched["ious"])
                times["ctc 1" if threads else "ctc all"].append(time.perf_counter() - start)
                differences.append(abs(summary.seg - value))
    median = {key: statistics.median(values) for key, values in times.items()}
    rows = []
    for key, label in (("ctc 1", "1 process"), ("ctc all", "all CPUs")):
        rows.append(
            {
                "benchmark": f"SEG of {len(pairs)} GOWT1 frames, read + compute; py-ctcmetrics on {label}",
                "medseg_s": round(median["medseg"], 4),
                "baseline_s": round(median[key], 4),
                "speedup": round(median[key] / median["medseg"], 1),
                "seg": round(summary.seg, 6),
                "max_abs_difference": f"{max(differences):.1e}",
                "target": "speedup >= 20, difference < 1e-9",
            }
        )
    rows.append(
        {
            "benchmark": "medseg: compute vs load (single thread)",
            "medseg_s": round(median["compute"], 4),
            "baseline_s": round(median["load"], 4),
            "speedup": round(median["load"] / median["compute"], 1),
            "seg": round(summary.seg, 6),
            "max_abs_difference": "-",
            "target": "compute well under load",
        }
    )
    if det:
        rows.append(run_det(repetitions=max(1, repetitions // 2)))
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
