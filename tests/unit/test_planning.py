"""Planning from the dataset fingerprint: known-answer strides, fingerprints, measured memory, origins."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from medseg.errors import ConfigError
from medseg.io.fingerprint import Fingerprint, FingerprintBuilder, inner_voxels, rim_split_objects
from medseg.nets.unet import NetParams
from medseg.training.params import PlanningParams, TrainParams
from medseg.training.planning import UNTIL_BUDGET, plan_strides, plan_training, trial_step

CPU = torch.device("cpu")


def _cells_fingerprint(**update: object) -> Fingerprint:
    """A GOWT1-like fingerprint: 2D 1024² frames, nuclei of ~60 px diameter."""
    builder = FingerprintBuilder(seed=0)
    label = np.zeros((1024, 1024), np.int32)
    yy, xx = np.mgrid[:1024, :1024]
    for number, (y, x) in enumerate([(200, 200), (500, 600), (800, 300)], start=1):
        label[(yy - y) ** 2 + (xx - x) ** 2 <= 30**2] = number
    image = (label > 0).astype(np.float32)[None] * 100 + 10
    for _ in range(20):
        builder.add_intensities(image, label, None)
        builder.add_labels(label, (1.0, 1.0), instances=True)
    return builder.build(spatial_dims=2, trainable_cases=20).model_copy(update=update)


def test_fingerprint_known_answers():
    builder = FingerprintBuilder(seed=0)
    label = np.zeros((20, 30), np.int32)
    label[:10, :10] = 1  # 100 voxels
    label[10:20, :30] = 2  # 300 voxels
    image = np.where(label > 0, 50.0, 5.0)[None]
    builder.add_intensities(image, label, "MR")
    builder.add_labels(label, (0.5, 2.0), instances=True)
    fingerprint = builder.build(spatial_dims=2, trainable_cases=1)
    assert fingerprint.shape_median == (20, 30) and fingerprint.anisotropy == 4.0
    assert fingerprint.modality == "MR" and fingerprint.instance_labels
    assert fingerprint.class_fraction == {"0": pytest.approx(200 / 600), "1": pytest.approx(400 / 600)}
    objects = fingerprint.objects
    assert objects is not None and objects.count == 2 and objects.size_median == 200.0
    assert objects.diameter_median == pytest.approx(2 * math.sqrt(200 / math.pi), abs=0.01)
    assert fingerprint.intensity_foreground[0].mean == 50.0 and fingerprint.intensity_background[0].p50 == 5.0


def test_rim_split_counts_the_objects_an_all_round_rim_cuts_apart_or_empties():
    label = np.zeros((40, 60), np.int32)
    label[5:13, 5:13] = 1  # two 8 × 8 lobes ...
    label[8:10, 13:25] = 1  # ... joined by a neck 2 px wide
    label[5:13, 25:33] = 1
    label[25:31, 40:46] = 2  # a 6 × 6 square
    assert ndimage.label(inner_voxels(label, 1) & (label == 1))[1] == 2
    # The neck is all rim at 1 px already; at 3 px the square has no inner voxel either.
    assert rim_split_objects(label) == [1, 1, 2, 2]
    builder = FingerprintBuilder(seed=0)
    builder.add_labels(label, (1.0, 1.0), instances=True)
    builder.add_labels(np.where(label == 2, 1, 0), (1.0, 1.0), instances=True)
    objects = builder.build(spatial_dims=2, trainable_cases=2).objects
    assert objects is not None and objects.count == 3
    assert objects.rim_split == pytest.approx((1 / 3, 1 / 3, 1.0, 1.0), abs=1e-4)
    builder = FingerprintBuilder(seed=0)
    builder.add_labels(label, (1.0, 1.0), instances=False)
    assert builder.build(spatial_dims=2, trainable_cases=1).objects.rim_split == ()  # classes


def test_binary_labels_count_connected_components():
    builder = FingerprintBuilder(seed=0)
    label = np.zeros((8, 8, 8), np.int32)
    label[:2, :2, :2] = 1
    label[5:, 5:, 5:] = 1
    builder.add_labels(label, (1.0, 1.0, 1.0), instances=False)
    objects = builder.build(spatial_dims=3, trainable_cases=1).objects
    assert objects is not None and objects.count == 2 and objects.size_p95 > objects.size_p05


def test_strides_known_answers_isotropic_and_thick_slices():
    planning = PlanningParams()
    assert plan_strides((256, 256), (1.0, 1.0), planning) == (2, 2, 2, 2, 2)
    assert plan_strides((32, 32), (1.0, 1.0), planning) == (2, 2, 2)  # 32 → 4: three halvings
    # 0.7 × 0.7 × 5 mm: slices are not pooled until the in-plane spacing reaches half of 5 mm.
    assert plan_strides((128, 128, 32), (0.7, 0.7, 5.0), planning) == ((2, 2, 1), (2, 2, 1), 2, 2, 2)


def test_trial_step_memory_grows_with_the_patch():
    params = TrainParams(spatial_dims=2, patch_size=(64, 64), target="boundary")
    small = trial_step(params, 1, device=CPU)
    large = trial_step(params.model_copy(update={"patch_size": (128, 128)}), 1, device=CPU)
    assert large.fixed_bytes == small.fixed_bytes > 0
    assert large.bytes_per_patch / small.bytes_per_patch == pytest.approx(4.0, rel=0.05)
    assert small.patches_within(small.fixed_bytes + 3.5 * small.bytes_per_patch) == 3


def test_plan_fills_unset_values_and_keeps_set_ones():
    fingerprint = _cells_fingerprint()
    planned = plan_training(fingerprint, TrainParams(), train_cases=14, device=CPU)
    params = planned.params
    assert params.spatial_dims == 2 and params.target == "boundary" and params.select_on == "seg"
    assert params.patch_size == (256, 256) and params.net.strides == (2, 2, 2, 2, 2)
    assert params.net.channels == (16, 32, 64, 128, 256, 256)
    assert params.border_width == 2  # 60 px nuclei
    assert fingerprint.objects is not None and fingerprint.objects.rim_split == (0.0,) * 4
    assert params.borders == "all"  # round nuclei keep one interior inside any rim
    assert params.budget is not None and params.budget.steps == PlanningParams().steps
    patches = params.batch_size * params.samples_per_image
    assert 2 <= patches <= PlanningParams().max_patches
    assert set(planned.planned) == set(planned.values)  # nothing was set

    chosen = TrainParams.model_validate({"patch_size": [128, 128], "epochs": 3, "batch_size": 2})
    kept = plan_training(fingerprint, chosen, train_cases=14, device=CPU)
    assert kept.params.patch_size == (128, 128) and kept.params.epochs == 3 and kept.params.batch_size == 2
    assert kept.params.budget is None  # epochs set: no budget planned
    assert kept.params.net.strides == (2, 2, 2, 2, 2)  # planned for the workflow's patch: 128 → 4
    assert kept.origins["patch_size"] == "set" and kept.origins["net.channels"] == "planned"
    assert kept.params.val_every == 1


def test_borders_are_planned_touching_where_a_rim_would_cut_the_objects_apart():
    cells = _cells_fingerprint()
    assert cells.objects is not None
    necked = cells.model_copy(
        update={"objects": cells.objects.model_copy(update={"rim_split": (0.05, 0.4, 0.6, 0.6)})}
    )
    small = {"patch_size": [64, 64]}  # a cheap trial step; the patch plays no part here
    planned = plan_training(necked, TrainParams.model_validate(small), train_cases=14, device=CPU)
    assert planned.params.border_width == 2 and planned.params.borders == "touching"  # 0.4 at 2 px
    assert planned.origins["borders"] == "planned"
    thin = TrainParams.model_validate({**small, "border_width": 1})
    assert plan_training(necked, thin, train_cases=14, device=CPU).params.borders == "all"  # 0.05 at 1 px
    rimmed = TrainParams.model_validate({**small, "borders": "all"})
    kept = plan_training(necked, rimmed, train_cases=14, device=CPU)
    assert kept.params.borders == "all" and kept.origins["borders"] == "set"


def test_compile_is_planned_from_the_run_s_patch_voxels_when_a_compiler_builds():
    from torch._inductor import config

    from medseg.training.loop import steps_per_epoch
    from medseg.training.planning import can_compile

    fingerprint = _cells_fingerprint()
    long = plan_training(fingerprint, TrainParams(), train_cases=14, device=CPU)  # 1 500 steps of 256²
    assert can_compile(CPU) and long.params.compile and long.origins["compile"] == "planned"
    # A compiled epoch drops its last partial batch: the planned epochs follow from whole batches.
    samples = 14 * long.params.epoch_repeats
    assert (
        long.facts["steps_per_epoch"]
        == steps_per_epoch(samples, long.params, 1)
        == samples // long.params.batch_size
    )
    # Decided from the plan, not from timings: the run's patch voxels against the threshold.
    patch_voxels = long.params.batch_size * long.params.samples_per_image * 256 * 256
    steps = math.ceil(PlanningParams().compile_min_megavoxels * 1e6 / patch_voxels)
    for budget, compiles in ((steps, True), (steps - 1, False)):
        params = TrainParams(budget={"steps": budget})
        assert plan_training(fingerprint, params, train_cases=14, device=CPU).params.compile is compiles
    kept = TrainParams.model_validate({"budget": {"steps": 20}, "compile": True})
    assert plan_training(fingerprint, kept, train_cases=14, device=CPU).origins["compile"] == "set"

    with config.patch({"cpp.cxx": (None, "/nonexistent/c++")}):
        assert not can_compile(CPU)
        assert not plan_training(fingerprint, TrainParams(), train_cases=14, device=CPU).params.compile
    assert can_compile(CPU)
    assert not can_compile(torch.device("meta"))  # only CPU processes are planned to compile


def test_a_budget_of_steps_and_minutes_is_planned_from_its_steps():
    fingerprint = _cells_fingerprint()
    for steps in (40, 1200):
        alone = plan_training(fingerprint, TrainParams(budget={"steps": steps}), train_cases=14, device=CPU)
        # A minute is far too short for 1 200 steps here; it caps the run and changes no planned value.
        capped = TrainParams(budget={"steps": steps, "minutes": 1.0})
        both = plan_training(fingerprint, capped, train_cases=14, device=CPU)
        assert {k: v for k, v in both.values.items() if k != "budget"} == {
            k: v for k, v in alone.values.items() if k != "budget"
        }
        assert both.params.epochs == alone.params.epochs < UNTIL_BUDGET
        assert both.facts["expected_epochs"] == alone.facts["expected_epochs"]
    minutes = plan_training(fingerprint, TrainParams(budget={"minutes": 1.0}), train_cases=14, device=CPU)
    assert minutes.params.epochs == UNTIL_BUDGET  # minutes alone: the run stops when they are spent


def test_loggable_leaves_out_what_the_plan_decides():
    params = TrainParams.model_validate({"patch_size": [64, 64], "optim": {"lr": 0.01}})
    logged = params.loggable()
    assert logged["patch_size"] == [64, 64] and "batch_size" not in logged and "target" not in logged
    assert "channels" not in logged["net"] and logged["optim"]["lr"] == 0.01


def test_cache_key_tells_a_planned_value_left_unset_from_one_set_to_its_default():
    unset = TrainParams.model_validate({"optim": {"lr": 0.01}})
    channels = list(NetParams().channels)
    defaults = TrainParams.model_validate(
        {"optim": {"lr": 0.01}, "target": "foreground", "net": {"channels": channels}}
    )
    assert (unset.target, unset.net.channels) == (defaults.target, defaults.net.channels)
    assert "target" not in unset.keyed() and "channels" not in unset.keyed()["net"]
    assert defaults.keyed()["target"] == "foreground" and defaults.keyed()["net"]["channels"] == channels
    assert unset.keyed() != defaults.keyed() and unset.keyed()["optim"]["lr"] == 0.01
    assert unset.keyed() == TrainParams.model_validate({"optim": {"lr": 0.01}}).keyed()


def test_memory_budget_too_small_even_for_the_smallest_patch_is_a_clear_error():
    params = TrainParams.model_validate({"planning": {"memory_gib": 0.0001}})
    with pytest.raises(ConfigError, match=r"train\.planning\.memory_gib=0\.0001 cannot hold") as error:
        plan_training(_cells_fingerprint(), params, train_cases=14, device=CPU)
    assert "GiB" in str(error.value) and "smaller train.patch_size" in str(error.value)


def test_ct_zscore_clips_to_the_window_then_standardises():
    from medseg.io.preprocessing import NormalizeParams, normalize_intensity

    decided = NormalizeParams(method="ct_zscore", window=(-100.0, 300.0), mean=100.0, std=50.0)
    values = normalize_intensity(np.array([-1000.0, 100.0, 200.0, 5000.0]), decided)
    assert values.tolist() == [-4.0, 0.0, 2.0, 4.0]


def test_anisotropic_strides_build_a_net_that_keeps_the_patch_shape():
    from medseg.nets.unet import NetParams, build_net

    net_params = NetParams(channels=(4, 8, 16, 32), strides=((2, 2, 1), (2, 2, 1), 2), num_res_units=1)
    assert net_params.size_divisors(3) == (8, 8, 2)
    params = TrainParams.model_validate(
        {"spatial_dims": 3, "patch_size": [32, 32, 6], "net": net_params.model_dump()}
    )
    assert params.patch_size == (32, 32, 6)
    with pytest.raises(ValueError, match=r"multiples of \(8, 8, 2\) per axis"):
        TrainParams.model_validate(
            {"spatial_dims": 3, "patch_size": [32, 32, 5], "net": net_params.model_dump()}
        )
    net = build_net(net_params, spatial_dims=3, in_channels=1, out_channels=2)
    with torch.inference_mode():
        assert net(torch.zeros(1, 1, 32, 32, 6)).shape == (1, 2, 32, 32, 6)
