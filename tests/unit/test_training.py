"""Training: targets and weights (known answers), the paper's net, determinism, resume, errors."""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import ndimage

from medseg.demo import phantom_frame
from medseg.errors import DataError, StageError
from medseg.inference.predict import boundary_to_instances
from medseg.nets.unet import NetParams, build_net
from medseg.training.augment import rotation_plane, train_transforms
from medseg.training.checkpoint import CHECKPOINT_FILE
from medseg.training.loop import TrainingCase, prepare_sample, train_segmentation
from medseg.training.params import TrainParams
from medseg.training.targets import (
    IGNORE_CLASS,
    IGNORED,
    border_weight_map,
    boundary_target,
    class_balance_weights,
)


def two_touching_squares() -> np.ndarray:
    labels = np.zeros((20, 30), np.int32)
    labels[5:15, 3:13] = 1
    labels[5:15, 13:23] = 2
    return labels


def test_boundary_target_marks_the_contact_and_the_rim():
    target = boundary_target(two_touching_squares(), border_width=1)[0]
    assert target.shape == (20, 30)
    assert target[10, 12] == target[10, 13] == 2  # both sides of the contact line
    assert target[5, 8] == 2 and target[10, 3] == 2  # outer rim
    assert target[10, 8] == 1 and target[10, 17] == 1  # interiors
    assert (target[:5] == 0).all()
    assert np.count_nonzero(target == 1) == 2 * 8 * 8


def test_touching_borders_mark_only_the_contacts_so_a_necked_object_stays_one_object():
    labels = np.zeros((20, 40), np.int32)
    labels[5:15, 3:13] = 1
    labels[5:15, 13:23] = 2
    labels[9:11, 23:28] = 2  # a neck 2 px wide ...
    labels[6:14, 28:36] = 2  # ... to a second lobe of the same object
    labels[0:2, 0:40] = 3  # a strip along the image edge, apart from the others
    rimmed = boundary_target(labels, border_width=1)[0]
    assert (rimmed[9:11, 23:28] == 2).all()  # the rim leaves the neck without interior ...
    assert ndimage.label((rimmed == 1) & (labels == 2))[1] == 2  # ... so object 2 has two seeds
    assert len(np.unique(boundary_to_instances(rimmed, min_size=1)[labels == 2])) == 2

    target = boundary_target(labels, border_width=1, borders="touching")[0]
    assert target[10, 12] == target[10, 13] == 2  # both sides of the contact line
    assert np.count_nonzero(target == 2) == 2 * 10  # and nothing else
    assert target[5, 8] == target[10, 25] == target[0, 0] == 1  # rims, the neck, the edge strip
    assert ndimage.label((target == 1) & (labels == 2))[1] == 1
    instances = boundary_to_instances(target, min_size=1)
    assert all(len(np.unique(instances[labels == index])) == 1 for index in (1, 2, 3))
    assert ((instances > 0) == (labels > 0)).all() and len(np.unique(instances)) == 4


def test_boundary_post_processing_separates_touching_objects_exactly():
    labels = two_touching_squares()
    instances = boundary_to_instances(boundary_target(labels, 1)[0], min_size=1)
    assert len(np.unique(instances)) == 3
    for index in (1, 2):
        found = np.unique(instances[labels == index])
        assert len(found) == 1 and found[0] > 0  # each object is exactly one instance
    assert ((instances > 0) == (labels > 0)).all()


def test_unseeded_foreground_becomes_its_own_object_and_small_ones_drop():
    classes = np.zeros((12, 12), np.uint8)
    classes[1:5, 1:5] = 2  # border only: no interior seed
    classes[8, 8] = 2  # a single stray pixel
    instances = boundary_to_instances(classes, min_size=4, fill_holes=False)
    assert instances.max() == 1 and np.count_nonzero(instances) == 16


def test_a_cell_with_one_seed_stays_whole_though_a_neighbour_s_seed_is_nearer_to_its_far_end():
    classes = np.zeros((5, 40), np.uint8)
    classes[1:4, 0:21] = 2  # a long cell, its seed at the left end
    classes[2, 1:3] = 1
    classes[1:4, 23:27] = 2  # a separate small cell two pixels to the right
    classes[2, 24:26] = 1
    instances = boundary_to_instances(classes, min_size=1, fill_holes=False)
    # Pixels 13-20 of the long cell lie nearer the small cell's seed than their own; they
    # belong to their own component's seed, not to a fragment of their own.
    assert instances.max() == 2
    assert (instances[1:4, 0:21] == instances[2, 1]).all() and instances[2, 1] > 0
    assert (instances[1:4, 23:27] == instances[2, 24]).all() and instances[2, 24] not in (0, instances[2, 1])


def test_several_seeds_in_one_component_share_it_by_distance_and_others_stay_whole():
    classes = np.zeros((9, 30), np.uint8)
    classes[1:8, 1:20] = 2  # one component, two seeds: split at the midline between them
    classes[3:6, 3:6] = 1
    classes[3:6, 14:17] = 1
    classes[1:8, 24:29] = 2  # another component, one seed
    classes[4, 26] = 1
    instances = boundary_to_instances(classes, min_size=1, fill_holes=False)
    left, right, other = instances[4, 4], instances[4, 15], instances[4, 26]
    assert len({left, right, other, 0}) == 4 and instances.max() == 3
    # Columns up to 9 are nearer the left seed (columns 3-5), from 10 on the right one (14-16).
    assert (instances[1:8, 1:10] == left).all() and (instances[1:8, 10:20] == right).all()
    assert (instances[1:8, 24:29] == other).all()


@pytest.mark.parametrize("shape", [(64, 64), (12, 16, 20)])
def test_filled_equals_scipy_fill_holes(shape):
    from scipy import ndimage

    from medseg.inference.predict import filled

    rng = np.random.default_rng(len(shape))
    for density in (0.2, 0.5, 0.7, 0.9):
        mask = rng.random(shape) < density
        expected = ndimage.binary_fill_holes(mask)
        assert (filled(mask) == expected).all()
        assert density < 0.7 or (expected & ~mask).any()  # dense masks enclose background: holes were filled
    assert not filled(np.zeros(shape, bool)).any() and filled(np.ones(shape, bool)).all()


@pytest.mark.parametrize("objects", [True, False])
def test_object_patches_centre_on_annotated_objects_never_on_unknown_voxels(objects):
    instances = np.zeros((64, 64), np.int32)
    instances[20:44, 20:44] = IGNORED  # an unannotated cell's left-out region, 576 px
    if objects:
        instances[50:54, 10:14] = 1  # the one outlined cell, 16 px
    params = TrainParams(patch_size=(8, 8), samples_per_image=64)
    sample = prepare_sample(TrainingCase.in_memory("c", np.zeros((1, 64, 64), np.float32), instances), params)
    transforms = train_transforms(
        params.model_copy(
            update={
                "augment": params.augment.model_copy(
                    update={"flip": False, "rotate90": False, "rotate": 0.0, "elastic": 0.0, "intensity": 0.0}
                )
            }
        )
    )
    transforms.set_random_state(0)
    patches = transforms(sample)
    centres = np.array([int(patch["label"][0, 4, 4]) for patch in patches])
    assert not (centres == IGNORE_CLASS).any()  # before: about half the patches centred there
    on_cell = int((centres > 0).sum())  # each patch is drawn on a cell with probability 1/2
    assert 16 < on_cell < 48 if objects else on_cell == 0
    assert set(patches[0]) == {"image", "label"}  # the index arrays do not reach the batch
    plain = prepare_sample(
        TrainingCase.in_memory("c", np.zeros((1, 64, 64), np.float32), np.maximum(instances, 0)), params
    )
    assert set(plain) == {"image", "label"}  # fully annotated: MONAI finds the centres itself


@pytest.mark.parametrize(
    ("patch_size", "plane"),
    [((16, 16), (0, 1)), ((16, 24), None), ((8, 16, 8), (0, 2)), ((8, 8, 16), (0, 1))],
)
def test_patches_that_are_not_square_keep_their_shape_through_augmentation(patch_size, plane):
    """A 90° turn swaps two axes: only a plane of equal axes turns (a 224 × 256 plan crashed collate)."""
    assert rotation_plane(patch_size) == plane
    shape = tuple(2 * size for size in patch_size)
    instances = np.zeros(shape, np.int32)
    instances[tuple(slice(2, size - 2) for size in shape)] = 1
    gradient = np.arange(math.prod(shape), dtype=np.float32).reshape(1, *shape)
    params = TrainParams(
        spatial_dims=len(patch_size),
        patch_size=patch_size,
        samples_per_image=16,
        net={"channels": [4, 8], "strides": [2]},
        augment={"flip": False, "rotate90": True, "intensity": 0.0},
    )
    transforms = train_transforms(params)
    transforms.set_random_state(0)
    patches = transforms(prepare_sample(TrainingCase.in_memory("c", gradient, instances), params))
    assert {tuple(patch["image"].shape[1:]) for patch in patches} == {patch_size}
    assert {tuple(patch["label"].shape[1:]) for patch in patches} == {patch_size}
    axis = 0 if plane is None else plane[0]  # a turned patch steps along this axis by another
    step = tuple(1 if position == axis else 0 for position in range(len(shape)))  # axis's stride
    strides = {
        abs(round(float(patch["image"][(0, *step)] - patch["image"][(0,) * (len(shape) + 1)])))
        for patch in patches
    }
    assert len(strides) == (1 if plane is None else 2)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_gamma_keeps_each_patch_s_mean_and_sd_and_blur_smooths_only_the_image(spatial_dims):
    """Gamma reshapes the histogram but keeps mean and sd; the blur lowers white noise's sd; labels stay."""
    patch_size = (16,) * spatial_dims
    shape = (32,) * spatial_dims
    image = np.random.default_rng(0).random((1, *shape)).astype(np.float32) ** 2
    instances = np.zeros(shape, np.int32)
    instances[(slice(4, 28),) * spatial_dims] = 1
    still = {"flip": False, "rotate90": False, "intensity": 0.0}
    outputs = {}
    for name, extra in {"none": {}, "gamma": {"gamma": 1.0}, "blur": {"blur": 1.0}}.items():
        params = TrainParams(
            spatial_dims=spatial_dims, patch_size=patch_size, samples_per_image=8, augment={**still, **extra}
        )
        transforms = train_transforms(params)
        transforms.set_random_state(0)
        outputs[name] = transforms(prepare_sample(TrainingCase.in_memory("c", image, instances), params))
    for plain, gamma, blur in zip(outputs["none"], outputs["gamma"], outputs["blur"], strict=True):
        before, after = np.asarray(plain["image"]), np.asarray(gamma["image"])
        assert not np.allclose(before, after)
        assert np.isclose(after.mean(), before.mean(), atol=1e-4) and np.isclose(
            after.std(), before.std(), rtol=1e-3
        )
        assert np.asarray(blur["image"]).std() < 0.8 * before.std()
        assert np.array_equal(np.asarray(plain["label"]), np.asarray(gamma["label"]))
        assert np.array_equal(np.asarray(plain["label"]), np.asarray(blur["label"]))


def test_class_balance_weights_give_objects_and_background_equal_totals():
    labels = np.zeros((10, 10), np.int32)
    labels[:2] = 1  # 20 object pixels, 80 background
    weights = class_balance_weights(labels)[0]
    assert weights[labels == 1].sum() == pytest.approx(weights[labels == 0].sum())
    assert weights.mean() == pytest.approx(1.0)
    assert (class_balance_weights(np.zeros((4, 4), np.int32)) == 1).all()


def test_border_weight_ridge_between_objects_is_the_papers_formula():
    labels = np.zeros((20, 31), np.int32)
    labels[5:15, 3:14] = 1
    labels[5:15, 17:28] = 2  # gap of three pixels: columns 14, 15, 16
    weights = border_weight_map(labels, w0=10.0, sigma=5.0)[0]
    base = class_balance_weights(labels)[0]
    # In the middle of the gap d1 = d2 = 2 pixels.
    assert weights[10, 15] - base[10, 15] == pytest.approx(10 * math.exp(-(4**2) / 50), rel=1e-6)
    # At the corner d1 = |(5, 3)| and d2 = |(5, 17)|: the ridge has almost vanished.
    corner = math.hypot(5, 3) + math.hypot(5, 17)
    assert weights[0, 0] - base[0, 0] == pytest.approx(10 * math.exp(-(corner**2) / 50), abs=1e-6)
    single = np.where(labels == 1, 1, 0)
    assert np.allclose(border_weight_map(single), class_balance_weights(single))  # no second object


def test_ronneberger_preset_is_the_papers_layout():
    params = NetParams.model_validate({"architecture": "ronneberger"})
    assert params.channels == (64, 128, 256, 512, 1024)
    net = build_net(params, spatial_dims=2, in_channels=1, out_channels=2)
    modules = list(net.modules())
    convs = [m for m in modules if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    ups = [m for m in modules if isinstance(m, torch.nn.ConvTranspose2d)]
    pools = [m for m in modules if isinstance(m, torch.nn.MaxPool2d)]
    assert len(convs) == 18  # two 3×3 convolutions at each of 9 levels on the way down and up
    assert len(pools) == 4 and all(p.kernel_size == 2 for p in pools)
    assert len(ups) == 4 and all(u.kernel_size == (2, 2) and u.stride == (2, 2) for u in ups)
    assert [c.out_channels for c in convs[:10:2]] == [64, 128, 256, 512, 1024]
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(31.0e6, rel=0.01)
    assert net(torch.zeros(1, 1, 32, 32)).shape == (1, 2, 32, 32)
    with pytest.raises(ValueError, match="residual"):
        NetParams.model_validate({"architecture": "ronneberger", "num_res_units": 2})


def phantom_case(case_id: str, seed: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    image, labels, _ = phantom_frame(np.random.default_rng(seed), size, 3)
    return (image / image.max()).astype(np.float32)[None], labels.astype(np.int32)


def phantom_cases(count: int, seed: int = 0) -> list[TrainingCase]:
    return [
        TrainingCase.in_memory(f"case_{index:04d}", *phantom_case(f"case_{index:04d}", seed + index))
        for index in range(count)
    ]


def tiny_params(**overrides) -> TrainParams:
    base = {
        "net": {"channels": [4, 8], "strides": [2], "num_res_units": 0},
        "epochs": 3,
        "batch_size": 2,
        "patch_size": [16, 16],
        "samples_per_image": 2,
        "target": "boundary",
        "loss": {"name": "dice_border_ce"},
        "augment": {"elastic": 0.5, "rotate": 15},
    }
    return TrainParams.model_validate({**base, **overrides})


def train(params: TrainParams, **kwargs):
    epochs: list[int] = []
    result = train_segmentation(
        phantom_cases(3),
        phantom_cases(1, seed=10),
        params,
        seed=kwargs.pop("seed", 7),
        on_epoch=lambda epoch, metrics: epochs.append(epoch),
        progress=kwargs.pop("progress", lambda *args: None),
        **kwargs,
    )
    return result, epochs


class CrashError(Exception):
    """Stands for a run killed during epoch 2 (before that epoch's checkpoint)."""


def crash_after_epoch_2(description, completed, total, status=""):
    if completed == 2:
        raise CrashError


def same_weights(first: dict, second: dict) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_same_seed_same_weights_and_another_seed_differs():
    params = tiny_params()
    first, epochs = train(params)
    second, _ = train(params)
    other, _ = train(params, seed=8)
    assert epochs == [1, 2, 3]
    assert same_weights(first.last_state_dict, second.last_state_dict)
    assert not same_weights(first.last_state_dict, other.last_state_dict)
    assert [h["train/loss"] for h in first.history] == [h["train/loss"] for h in second.history]


def test_a_compiled_run_drops_partial_batches_reproduces_and_a_broken_compiler_is_a_clear_error(
    tmp_path, monkeypatch
):
    from torch._dynamo.utils import counters
    from torch._inductor import config

    params = tiny_params(epochs=2, compile=True)  # 3 cases in batches of 2: one full batch per epoch
    graphs = counters["stats"]["unique_graphs"]
    first, epochs = train(params)
    assert counters["stats"]["unique_graphs"] > graphs  # the training step ran compiled
    assert epochs == [1, 2] and [h["train/steps"] for h in first.history] == [1.0, 1.0]
    second, _ = train(params)
    assert same_weights(first.last_state_dict, second.last_state_dict)
    assert first.history == second.history
    assert [h["train/steps"] for h in train(tiny_params(epochs=1))[0].history] == [2.0]  # eager keeps it

    torch._dynamo.reset()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # no kernel built before
    broken = {"fx_graph_cache": False, "cpp.cxx": (None, "/nonexistent/c++")}
    with (
        config.patch(broken),
        pytest.raises(StageError, match=r"could not build the training step .*compile: false"),
    ):
        train(tiny_params(epochs=1, compile=True))
    torch._dynamo.reset()


def test_resume_from_checkpoint_ends_identical_to_an_uninterrupted_run(tmp_path):
    params = tiny_params()
    uninterrupted, _ = train(params, checkpoint=tmp_path / CHECKPOINT_FILE)

    checkpoint = tmp_path / "interrupted" / CHECKPOINT_FILE
    checkpoint.parent.mkdir()
    with pytest.raises(CrashError):
        train(params, checkpoint=checkpoint, progress=crash_after_epoch_2)
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 1  # epoch 2 crashed before its save
    resumed, epochs = train(params, checkpoint=checkpoint)
    assert resumed.resumed_from == 1 and epochs == [2, 3]
    assert same_weights(uninterrupted.last_state_dict, resumed.last_state_dict)
    assert same_weights(uninterrupted.state_dict, resumed.state_dict)
    assert uninterrupted.history == resumed.history


def test_checkpoint_of_other_params_is_refused(tmp_path):
    checkpoint = tmp_path / CHECKPOINT_FILE
    train(tiny_params(epochs=1), checkpoint=checkpoint)
    with pytest.raises(StageError, match="other train params"):
        train(tiny_params(epochs=2), checkpoint=checkpoint)


def test_cases_read_from_disk_train_exactly_like_cases_in_memory():
    in_memory, _ = train(tiny_params())
    from_disk, _ = train(tiny_params(cache_gib=0))
    assert same_weights(in_memory.last_state_dict, from_disk.last_state_dict)


def test_early_stopping_ends_the_run_and_a_resumed_run_stays_stopped(tmp_path):
    params = tiny_params(epochs=30, patience=1, optim={"lr": 1e-9}, schedule="constant")
    result, epochs = train(params, checkpoint=tmp_path / CHECKPOINT_FILE)
    assert len(epochs) < 30 and result.epochs_run == len(epochs)
    assert result.best_epoch == 1 and result.stopped_by == "patience"
    # A kill after the stop's checkpoint, before the stage kept the model: the rerun trains no further.
    again, more = train(params, checkpoint=tmp_path / CHECKPOINT_FILE)
    assert more == [] and again.stopped_by == "patience" and again.history == result.history
    assert same_weights(again.last_state_dict, result.last_state_dict)


def test_patch_larger_than_image_names_the_case():
    with pytest.raises(DataError, match=r"train case case_0000 has shape \(32, 32\).*patch_size"):
        train(tiny_params(patch_size=[64, 64]))


def test_nan_loss_stops_with_the_epoch_and_keeps_the_last_good_checkpoint(tmp_path):
    image, labels = phantom_case("case_0001", 0)
    image[0, 0, 0] = np.nan  # poisons the loss whenever a patch covers the corner
    checkpoint = tmp_path / CHECKPOINT_FILE
    with pytest.raises(StageError, match=r"loss became nan at epoch (\d+).*lr") as raised:
        train_segmentation(
            [TrainingCase.in_memory("case_0001", image, labels)],
            [],
            tiny_params(epochs=50),
            seed=0,
            on_epoch=lambda *args: None,
            progress=lambda *args: None,
            checkpoint=checkpoint,
        )
    epoch = int(re.search(r"epoch (\d+)", str(raised.value)).group(1))
    if epoch == 1:
        assert not checkpoint.exists()
    else:
        assert torch.load(checkpoint, weights_only=True)["epoch"] == epoch - 1
        assert f"checkpoint of epoch {epoch - 1} is kept" in str(raised.value)


def ball_volume(seed: int, size: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """A 3D phantom: three touching-or-near balls, image ``(1, D, H, W)`` and labels ``(D, H, W)``."""
    rng = np.random.default_rng(seed)
    grid = np.indices((size,) * 3)
    labels = np.zeros((size,) * 3, np.int32)
    for index in range(1, 4):
        centre = rng.uniform(6, size - 6, size=3)
        inside = ((grid - centre[:, None, None, None]) ** 2).sum(0) < rng.uniform(9, 25)
        labels[inside & (labels == 0)] = index
    image = (labels > 0).astype(np.float32) + rng.normal(0, 0.2, labels.shape).astype(np.float32)
    return image[None], labels


@pytest.mark.parametrize("cache_gib", [4.0, 0.0])
def test_3d_training_runs_on_patches_from_memory_or_disk(cache_gib):
    params = TrainParams.model_validate(
        {
            "spatial_dims": 3,
            "net": {"channels": [4, 8], "strides": [2], "num_res_units": 0},
            "epochs": 2,
            "batch_size": 2,
            "patch_size": [16, 16, 16],
            "samples_per_image": 2,
            "target": "boundary",
            "loss": {"name": "dice_border_ce", "sigma": 2.0},
            "augment": {"elastic": 1.0, "elastic_scale": 3.0, "elastic_magnitude": 2.0},
            "cache_gib": cache_gib,
        }
    )
    cases = [TrainingCase.in_memory(f"case_{i:04d}", *ball_volume(i)) for i in range(2)]
    result = train_segmentation(
        cases,
        [TrainingCase.in_memory("case_0009", *ball_volume(9))],
        params,
        seed=0,
        on_epoch=lambda *a: None,
        progress=lambda *a: None,
    )
    assert result.epochs_run == 2 and np.isfinite(result.history[-1]["train/loss"])
    assert 0 <= result.history[-1]["val/dice"] <= 1
    assert result.state_dict["model.0.conv.weight"].shape == (4, 1, 3, 3, 3)


@pytest.mark.parametrize("loss", ["dice_ce", "ce", "border_ce", "dice_border_ce"])
def test_losses_are_finite_on_float16_logits_as_amp_produces(loss):
    from medseg.training.losses import build_loss

    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(8, 3, 64, 64, generator=generator) * 4).half()
    batch = {
        "label": torch.randint(0, 3, (8, 1, 64, 64), generator=generator),
        "weight": torch.rand(8, 1, 64, 64, generator=generator) * 10,
    }
    value = build_loss(tiny_params(loss={"name": loss}).loss)(logits, batch)
    assert torch.isfinite(value) and value.dtype == torch.float32


def index_of(**overrides):
    from medseg.io.dataset import CaseRecord, DatasetIndex

    case = CaseRecord(
        "case_0001", "cases/case_0001/image.nii.gz", "cases/case_0001/label.nii.gz", (32, 32), (1.0, 1.0)
    )
    fields = {
        "spatial_dims": 2,
        "channels": 1,
        "labels": {"0": "background", "1": "foreground"},
        "instance_labels": True,
        "cases": (case,),
        "splits": {"train": ["case_0001"], "val": [], "test": []},
        **overrides,
    }
    return DatasetIndex(**fields)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"spatial_dims": 3}, r"dataset is 3D but train.spatial_dims is 2"),
        (
            {"instance_labels": False, "labels": {"0": "background", "1": "liver", "2": "tumour"}},
            r"dataset declares 3 classes \(background, liver, tumour\) but train.target 'boundary' trains 3",
        ),
        ({"splits": {"train": [], "val": ["case_0001"], "test": []}}, r"the train split is empty"),
    ],
)
def test_train_stage_refuses_a_dataset_that_does_not_fit(overrides, message):
    from medseg.stages.train import check_dataset

    with pytest.raises(DataError, match=message):
        check_dataset(index_of(**overrides), tiny_params())
    check_dataset(index_of(), tiny_params())  # the fitting dataset passes


def test_data_loading_workers_keep_runs_reproducible():
    first, _ = train(tiny_params(num_workers=2, epochs=2))
    second, _ = train(tiny_params(num_workers=2, epochs=2))
    assert same_weights(first.last_state_dict, second.last_state_dict)


def test_a_steps_budget_buys_whole_epochs_and_the_schedule_ends_with_it():
    # 3 cases, batch 2 → 2 steps per epoch; 9 steps → 4 epochs (rounded), cosine reaching 0 at the last.
    result, epochs = train(tiny_params(epochs=50, budget={"steps": 9}, val_every=2))
    assert epochs == [1, 2, 3, 4]
    assert [row["train/steps"] for row in result.history] == [2.0] * 4
    assert result.history[-1]["train/lr"] == pytest.approx(0.0, abs=1e-12)
    assert result.steps_per_s > 0
    assert "val/seg" in result.history[-1]  # the last epoch of the budget validates


def test_budgets_too_small_for_one_validation_are_refused():
    with pytest.raises(DataError, match=r"train.budget.steps=3 ends before the first validation \(2 steps"):
        train(tiny_params(budget={"steps": 3}, val_every=2))
    with pytest.raises(StageError, match=r"train.budget.minutes=1e-05 is too small for one epoch"):
        train(tiny_params(budget={"minutes": 0.00001}))
    with pytest.raises(ValueError, match="give steps, minutes or both"):
        tiny_params(budget={})


def run_clock(monkeypatch, readings: Iterable[float]) -> None:
    """Make the training run's clock (read at its start, then once per epoch) give ``readings`` (s).

    Only the training loop's ``time`` is replaced: nothing else can draw the readings.
    """
    import medseg.training.loop as loop

    ticks = iter(readings)
    monkeypatch.setattr(loop, "time", SimpleNamespace(monotonic=lambda: next(ticks)))


def test_minutes_beside_steps_cap_the_run_and_leave_it_alone_where_the_steps_fit(monkeypatch):

    # 9 steps buy 4 epochs of 2 steps (as a steps budget alone); 60 s hold 6 epochs at 10 s each.
    steps_only, epochs = train(tiny_params(epochs=50, budget={"steps": 9}))
    assert epochs == [1, 2, 3, 4]
    run_clock(monkeypatch, itertools.count(0.0, 10.0))
    roomy, epochs = train(tiny_params(epochs=50, budget={"steps": 9, "minutes": 1.0}))
    assert epochs == [1, 2, 3, 4] and roomy.steps_run == 8
    assert same_weights(steps_only.last_state_dict, roomy.last_state_dict)
    assert roomy.history == steps_only.history
    assert (steps_only.stopped_by, roomy.stopped_by) == ("schedule", "schedule")
    # 30 s hold 3 epochs: the schedule is refitted to them and still ends at a learning rate of 0.
    run_clock(monkeypatch, itertools.count(0.0, 10.0))
    capped_params = tiny_params(epochs=50, budget={"steps": 9, "minutes": 0.5})
    capped, epochs = train(capped_params)
    assert epochs == [1, 2, 3] and capped.steps_run == 6
    assert capped.history[-1]["train/lr"] == pytest.approx(0.0, abs=1e-12)
    assert capped.stopped_by == "minutes"


def test_the_train_stage_warns_when_the_minutes_cut_the_steps_short(monkeypatch):
    from medseg.stages.train import STAGE, _summary

    # 9 steps buy 4 epochs of 2 steps; at 10 s an epoch, 30 s hold 3 of them, 60 s all 4.
    runs = {}
    for minutes in (0.5, 1.0):
        run_clock(monkeypatch, itertools.count(0.0, 10.0))
        params = tiny_params(epochs=50, budget={"steps": 9, "minutes": minutes})
        runs[minutes] = _summary(params, [None], [train(params)[0]])
    cut, whole = runs[0.5], runs[1.0]
    assert (cut["train/cut_by_minutes"], cut["train/steps_planned"]) == (1.0, 9.0)
    assert cut["train/steps_run"] == 6.0
    assert (whole["train/cut_by_minutes"], whole["train/steps_run"]) == (0.0, 8.0)
    (warning,) = STAGE.warnings(cut)
    assert warning.startswith("the minutes of train.budget ended training after 6 of 9 planned optimiser")
    assert "raise train.budget.minutes, lower train.budget.steps" in warning
    assert STAGE.warnings(whole) == []
    # A minutes budget alone buys what its minutes hold: ending there is its plan, not a cut.
    run_clock(monkeypatch, itertools.count(0.0, 10.0))
    minutes_only = tiny_params(epochs=50, budget={"minutes": 0.5})
    result, _ = train(minutes_only)
    assert result.stopped_by == "minutes"
    assert "train/cut_by_minutes" not in _summary(minutes_only, [None], [result])


def test_a_compiled_run_fits_a_minutes_budget_on_its_second_epoch(tmp_path, monkeypatch):
    # A 40 s first epoch that holds the compile, then 10 s epochs. Fitted on epoch 1, a minute
    # would buy 1 epoch; on epoch 2, 3.
    run_clock(monkeypatch, [0.0, 40.0, 50.0, 60.0, 70.0])
    result, epochs = train(tiny_params(epochs=50, budget={"minutes": 1.0}, compile=True))
    assert epochs == [1, 2, 3] and result.history[-1]["train/lr"] == pytest.approx(0.0, abs=1e-12)


def test_a_slow_first_epoch_does_not_cut_a_run_whose_steps_fit_the_minutes(monkeypatch):
    import medseg.training.loop as loop

    # 9 steps buy 4 epochs of 2 steps; a minute holds them at 10 s an epoch. A 20 s first epoch
    # (a moment of load) fits 3: alone, it cuts the run.
    params = tiny_params(epochs=50, budget={"steps": 9, "minutes": 1.0})
    run_clock(monkeypatch, [0.0, 20.0, 30.0, 40.0])
    cut, epochs = train(params)
    assert epochs == [1, 2, 3] and cut.stopped_by == "minutes"
    # Timed again over 25 s of epochs (15 s each on the mean), the 4 planned epochs fit again.
    monkeypatch.setattr(loop, "PACE_SECONDS", 25.0)
    run_clock(monkeypatch, [0.0, 20.0, 30.0, 40.0, 50.0])
    paced, epochs = train(params)
    assert epochs == [1, 2, 3, 4] and paced.steps_run == 8 and paced.stopped_by == "schedule"
    assert paced.history[-1]["train/lr"] == pytest.approx(0.0, abs=1e-12)


def test_a_minutes_budget_fits_epochs_once_and_a_resumed_run_keeps_them(tmp_path, monkeypatch):
    params = tiny_params(epochs=50, budget={"minutes": 0.5})  # 30 s at 10 s an epoch: 3 epochs
    run_clock(monkeypatch, itertools.count(0.0, 10.0))
    uninterrupted, epochs = train(params, checkpoint=tmp_path / CHECKPOINT_FILE)
    assert epochs == [1, 2, 3] and uninterrupted.history[-1]["train/lr"] == pytest.approx(0.0, abs=1e-12)

    checkpoint = tmp_path / "interrupted" / CHECKPOINT_FILE
    checkpoint.parent.mkdir()
    run_clock(monkeypatch, itertools.count(0.0, 10.0))
    with pytest.raises(CrashError):
        train(params, checkpoint=checkpoint, progress=crash_after_epoch_2)
    saved = torch.load(checkpoint, weights_only=True)
    assert (saved["epoch"], saved["fitted_epochs"], saved["seconds"]) == (1, 3, 10.0)
    # The resumed session counts its time on top of the 10 s already spent.
    run_clock(monkeypatch, itertools.count(0.0, 10.0))
    resumed, epochs = train(params, checkpoint=checkpoint)
    assert resumed.resumed_from == 1 and epochs == [2, 3]
    assert same_weights(uninterrupted.last_state_dict, resumed.last_state_dict)
    assert uninterrupted.history == resumed.history
    assert uninterrupted.stopped_by == resumed.stopped_by == "minutes"
