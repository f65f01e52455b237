"""Each benchmark runs at tiny size, so that none of them rots (no timing is asserted)."""

import numpy as np
import pytest

from bench import (
    bench_accuracy,
    bench_dicom,
    bench_inference,
    bench_pipeline,
    bench_planning,
    bench_seg,
    bench_sparse,
    bench_targets,
    bench_train,
)
from tests.conftest import GOWT1, SHARED_DATA, require

pytestmark = pytest.mark.integration


def test_pipeline_benchmark_smoke():
    rows = bench_pipeline.run(repetitions=1, epochs=1, frames=4, size=64, weights_only=True)
    assert [row["benchmark"] for row in rows] == [
        "rerun, 0 stages executed (tracking daemon warm)",
        "medseg --help",
    ]
    assert all(row["medseg_s"] > 0 and row["baseline_s"] > 0 for row in rows)
    rows = bench_pipeline.concurrency(epochs=1, frames=4, size=64, baseline=False, weights_only=True)
    assert rows[0]["medseg_s"] > 0 and rows[0]["baseline_s"] > 0


def test_seg_benchmark_smoke():
    require(GOWT1)
    rows = bench_seg.run(repetitions=1, frames=2, det=False)
    assert len(rows) == 3
    assert all(float(row["max_abs_difference"]) < 1e-9 for row in rows[:2])


def test_train_benchmark_smoke():
    rows = bench_train.run(repetitions=1, epochs=1, cases=2, size=64, compiled=False)
    assert len(rows) == 1 and rows[0]["benchmark"].startswith("train step, UNet")
    assert rows[0]["medseg_s_per_step"] > 0 and rows[0]["plain_monai_s_per_step"] > 0


def test_targets_benchmark_smoke(tmp_path):
    from medseg.demo import write_phantom_ctc

    data = write_phantom_ctc(tmp_path / "phantom", frames=8, size=64)
    tiny = {"budget": {"steps": 2}, "patch_size": [32, 32], "samples_per_image": 2, "batch_size": 4}
    rows = bench_targets.run(data=data, train=tiny)
    assert [row["variant"] for row in rows] == list(bench_targets.VARIANTS)
    assert all(0 <= row["seg"] <= 1 and row["n_reference"] > 0 for row in rows)


def test_dicom_benchmark_smoke():
    require(SHARED_DATA / "dicom" / "totalsegmentator-example" / "example_ct_dicom")
    rows = bench_dicom.run(slices=4, repetitions=1, syntaxes=("JPEG-LS", "RLE"))
    assert [row["benchmark"] for row in rows] == [
        "CT series → volume, 4 slices 512² (JPEG-LS)",
        "CT series → volume, 4 slices 512² (RLE)",
    ]
    assert all(row["voxels_equal"] is True and float(row["max_affine_difference_mm"]) < 1e-6 for row in rows)


def test_inference_benchmark_smoke():
    rows = bench_inference.run(repetitions=1, size_2d=256, shape_3d=(64, 64, 32), rss_shape=(64, 64, 40))
    assert [row["unit"] for row in rows] == ["s", "s", "GiB"]
    assert all(row["medseg"] > 0 and row["monai_sliding_window"] > 0 for row in rows)


def test_accuracy_benchmark_smoke(tmp_path):
    from medseg.demo import write_phantom_ctc

    data = write_phantom_ctc(tmp_path / "phantom", frames=8, size=64)
    tiny = {"budget": {"steps": 2}, "patch_size": [32, 32], "samples_per_image": 2, "batch_size": 4}
    rows = bench_accuracy.run(data=data, train=tiny)
    assert rows[0]["method"] == "medseg default 2D workflow"
    assert rows[1]["method"].startswith("plain MONAI script")  # on the fully annotated frames, if any
    assert all(0 <= row["seg"] <= 1 and row["n_reference"] > 0 for row in rows)


def test_sparse_benchmark_smoke(tmp_path):
    import tifffile

    from medseg.demo import write_phantom_ctc

    data = write_phantom_ctc(tmp_path / "phantom", frames=10, size=64)
    for frame in range(6):  # sparse frames: only the first two cells outlined, every cell marked
        path = data / "01_GT" / "SEG" / f"man_seg{frame:03d}.tif"
        mask = tifffile.imread(path)
        tifffile.imwrite(path, np.where(mask <= 2, mask, 0).astype(mask.dtype))
    tiny = {"epochs": 2, "epoch_repeats": 1, "patch_size": [32, 32], "samples_per_image": 2, "val_every": 1}
    rows = bench_sparse.run(minutes=5.0, data=data, train=tiny)
    assert [row["training frames (train+val)"] for row in rows] == ["fully_annotated: 3", "annotated: 7"]
    assert all(0 <= row["SEG"] <= 1 and 0 <= row["DET"] <= 1 and row["held-out frames"] >= 1 for row in rows)


def test_planning_benchmarks_smoke(tmp_path):
    from medseg.demo import write_phantom_ctc

    data = write_phantom_ctc(tmp_path / "phantom", frames=10, size=64)
    spread = bench_planning.seeds(data=data, steps=12)
    assert [row["run"] for row in spread][-1] == "mean ± sd over 3 seeds" and len(spread) == 4
    assert all(0 <= row["SEG"] <= 1 for row in spread[:3])
    single, ensemble = bench_planning.folds(data=data, steps=12, k=2)
    assert single["run"] == "single model (12 steps)"
    assert ensemble["run"] == "2-fold ensemble (12 steps per fold)" and 0 <= ensemble["DET"] <= 1


def test_a_rerun_keeps_the_notes_written_under_the_previous_table_with_that_table():
    from bench.run import markdown, with_earlier_notes

    old_table = markdown([{"method": "medseg", "seg": 0.918}])
    new_table = markdown([{"method": "medseg", "seg": 0.917}])
    new = f"## accuracy\n\n2026-12-06: machine B\n\nAbout.\n\n{new_table}\n"
    bare = f"## accuracy\n\n2026-12-02: machine A\n\nAbout.\n\n{old_table}\n"
    assert with_earlier_notes(new, None) == new and with_earlier_notes(new, bare) == new
    merged = with_earlier_notes(new, bare + "\nSEG 0.918 here: the pair is split.\n")
    assert merged.startswith(new)
    assert merged[len(new) :] == (
        f"\nThe previous run (2026-12-02: machine A) and its notes:\n\n{old_table}\n\n"
        "SEG 0.918 here: the pair is split.\n"
    )
