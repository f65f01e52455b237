"""Sparse and partial annotations: unknown voxels leave the loss and the overlap metrics.

Known answers: the masked losses equal MONAI's where every voxel counts and equal MONAI's on the
known part alone; unknown voxels get no gradient; on real GOWT1 frames every unannotated cell's
marker lies in the left-out region and no outlined pixel does.
"""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
from monai.losses import DiceCELoss, DiceLoss

import medseg
from medseg.io.dataset import load_case, load_ignore, read_index
from medseg.io.ingest import IngestParams, ingest_dataset
from medseg.io.layouts import unannotated_regions
from medseg.metrics.evaluate import evaluate_case
from medseg.training.losses import LossParams, build_loss, masked_cross_entropy, masked_dice
from medseg.training.targets import IGNORE_CLASS, IGNORED, make_target
from tests.conftest import GOWT1, require


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 16, 16, generator=generator), torch.randint(
        0, 3, (2, 1, 16, 16), generator=generator
    )


def test_masked_losses_equal_monai_where_every_voxel_counts():
    logits, label = _batch()
    valid = torch.ones_like(label, dtype=torch.float32)
    monai = DiceCELoss(to_onehot_y=True, softmax=True)(logits, label)
    assert torch.allclose(
        masked_dice(logits, label, valid) + masked_cross_entropy(logits, label, valid), monai
    )
    assert torch.allclose(
        masked_dice(logits, label, valid), DiceLoss(to_onehot_y=True, softmax=True)(logits, label)
    )
    ce = build_loss(LossParams(name="ce"))(logits, {"label": label})
    assert torch.allclose(ce, torch.nn.functional.cross_entropy(logits, label[:, 0]))


@pytest.mark.parametrize(("over_batch", "background"), [(True, False), (True, True), (False, False)])
def test_dice_over_the_batch_or_without_background_equals_monai(over_batch, background):
    logits, label = _batch()
    valid = torch.ones_like(label, dtype=torch.float32)
    monai = DiceLoss(to_onehot_y=True, softmax=True, batch=over_batch, include_background=background)
    own = masked_dice(logits, label, valid, over_batch=over_batch, background=background)
    assert torch.allclose(own, monai(logits, label))
    # The registered loss takes the same options, with and without unknown voxels.
    params = LossParams(name="dice_ce", batch=over_batch, background=background)
    expected = own + torch.nn.functional.cross_entropy(logits, label[:, 0])
    assert torch.allclose(build_loss(params)(logits, {"label": label}), expected)
    unknown = label.clone()
    unknown[..., 8:] = IGNORE_CLASS
    half = masked_dice(
        logits[..., :8], label[..., :8], valid[..., :8], over_batch=over_batch, background=background
    )
    half = half + torch.nn.functional.cross_entropy(logits[..., :8], label[:, 0, :, :8])
    assert torch.allclose(build_loss(params)(logits, {"label": unknown}), half)


def test_a_batch_dice_counts_false_positives_of_a_class_absent_from_a_patch():
    logits, label = _batch()
    logits, label = logits[:, :2], label.clamp(max=1)  # background and one class
    label[1] = 0  # the class is absent from case 1
    valid = torch.ones_like(label, dtype=torch.float32)
    gradients = []
    for over_batch in (False, True):
        leaf = logits.clone().requires_grad_()
        masked_dice(leaf, label, valid, over_batch=over_batch, background=False).backward()
        gradients.append(leaf.grad[1].abs().max().item())
    # Per case, an absent class's Dice is 1 - 1e-5 / (Σp + 1e-5): flat, whatever case 1 predicts.
    assert gradients[0] < 1e-7 and gradients[1] > 1e-4


@pytest.mark.parametrize("name", ["dice_ce", "ce", "border_ce", "dice_border_ce"])
def test_unknown_voxels_leave_the_loss_and_get_no_gradient(name):
    logits, label = _batch(1)
    weight = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(2)) + 0.5
    unknown_label = label.clone()
    unknown_label[..., 8:] = IGNORE_CLASS  # the right half is unknown
    logits = logits.requires_grad_()
    loss = build_loss(LossParams(name=name))(logits, {"label": unknown_label, "weight": weight})
    loss.backward()
    assert torch.count_nonzero(logits.grad[..., 8:]) == 0 and torch.count_nonzero(logits.grad[..., :8]) > 0
    # Equal to the same loss on the known half alone (MONAI's where it applies).
    left = {"label": label[..., :8], "weight": weight[..., :8]}
    expected = build_loss(LossParams(name=name))(logits.detach()[..., :8], left)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_a_loss_that_cannot_ignore_is_refused_when_voxels_are_unknown():
    from medseg.training.losses import LOSSES, LossEntry

    LOSSES.register("plain_ce", LossEntry(lambda params: lambda logits, batch: logits.mean()))
    try:
        logits, label = _batch()
        label[0, 0, 0, 0] = IGNORE_CLASS
        with pytest.raises(medseg.StageError, match="loss 'plain_ce' cannot leave out unknown voxels"):
            build_loss(LossParams(name="plain_ce"))(logits, {"label": label})
    finally:
        LOSSES.unregister("plain_ce")


def test_targets_mark_unknown_voxels_and_give_known_objects_their_border():
    instances = np.zeros((12, 12), np.int32)
    instances[2:8, 2:8] = 1
    instances[:, 9:] = IGNORED
    target = make_target(instances, "boundary", border_width=1)[0]
    assert (target[:, 9:] == IGNORE_CLASS).all()
    assert target[4, 4] == 1 and target[2, 4] == 2 and target[4, 7] == 2 and target[4, 8] == 0


@pytest.mark.parametrize("frame", [5, 21])
def test_unannotated_cells_of_real_gowt1_frames_are_left_out(frame):
    label = tifffile.imread(require(GOWT1) / "01_GT" / "SEG" / f"man_seg{frame:03d}.tif")
    markers = tifffile.imread(GOWT1 / "01_GT" / "TRA" / f"man_track{frame:03d}.tif")
    region = unannotated_regions(label, markers)
    covered = set(np.unique(markers[(markers > 0) & (label > 0)]))
    uncovered = set(np.unique(markers[markers > 0])) - covered
    assert not (region & (label > 0)).any()
    for cell in uncovered:
        assert region[markers == cell].all(), cell
    if frame == 21:  # fully annotated: nothing is left out
        assert not uncovered and not region.any()
    else:  # 21 of 23 cells unoutlined; each region is a ball of 2.5 typical radii at most
        sizes = np.bincount(label.ravel())[1:]
        typical = np.median(sizes[sizes > 0])  # π r² of the typical outlined cell
        blobs = np.isin(markers, list(uncovered)).sum()
        assert len(uncovered) == 21
        # 2.5² = 6.25 cell areas per region where balls do not overlap (5.2 here); 1.5 gave 2.2
        assert 4 * typical * len(uncovered) < region.sum() <= 2.5**2 * typical * len(uncovered) + blobs


def test_ingest_keeps_every_annotated_frame_with_its_unknown_regions(tmp_path):
    data = tmp_path / "ctc"
    for folder, pattern in (
        ("01", "t{:03d}.tif"),
        ("01_GT/SEG", "man_seg{:03d}.tif"),
        ("01_GT/TRA", "man_track{:03d}.tif"),
    ):
        (data / folder).mkdir(parents=True)
        for frame in (5, 6, 21):
            (data / folder / pattern.format(frame)).symlink_to(
                require(GOWT1) / folder / pattern.format(frame)
            )
    params = IngestParams(train_on="annotated", split={"val_fraction": 0.0, "test_fraction": 0.0})
    index, _ = ingest_dataset(data, params, tmp_path / "out", seed=0, progress=lambda *args: None)
    assert index.splits["train"] == ["case_0001", "case_0002", "case_0003"]
    sparse, full = index.cases[0], index.cases[2]
    assert not sparse.fully_annotated and sparse.ignore is not None and full.ignore is None
    ignore = load_ignore(tmp_path / "out", sparse)
    _, label = load_case(tmp_path / "out", sparse)
    assert ignore.any() and not (ignore & (label.array[0] > 0)).any()
    assert read_index(tmp_path / "out").cases[0].ignore == sparse.ignore


def test_ignore_label_becomes_unknown_voxels_and_whole_ignored_cases_are_refused(tmp_path):
    images, labels = tmp_path / "src" / "images", tmp_path / "src" / "labels"
    images.mkdir(parents=True)
    labels.mkdir()
    rng = np.random.default_rng(0)
    label = np.zeros((32, 32), np.uint8)
    label[4:12, 4:12] = 1
    label[:, 20:] = 255  # not annotated
    for name in ("a", "b"):
        tifffile.imwrite(images / f"{name}.tif", rng.random((32, 32)).astype(np.float32))
        tifffile.imwrite(labels / f"{name}.tif", label)
    params = IngestParams(
        layout="paired", ignore_label=255, split={"val_fraction": 0.0, "test_fraction": 0.0}
    )
    index, _ = ingest_dataset(tmp_path / "src", params, tmp_path / "out", seed=0, progress=lambda *a: None)
    case = index.cases[0]
    _, cached = load_case(tmp_path / "out", case)
    ignore = load_ignore(tmp_path / "out", case)
    assert set(np.unique(cached.array)) == {0, 1} and (ignore == (label == 255)).all()

    # Overlap metrics leave the unknown voxels out: a prediction that paints them is not penalised.
    prediction = np.where(label == 255, 7, label).astype(np.int32)
    scored = evaluate_case("a", cached.array[0], prediction, ignore=ignore)
    assert scored.classes["foreground"].dice == 1.0 and scored.n_predicted == 1

    tifffile.imwrite(labels / "b.tif", np.full((32, 32), 255, np.uint8))
    with pytest.raises(
        medseg.DataError, match=r"case case_0002: label: ingest.ignore_label 255 covers every voxel"
    ):
        ingest_dataset(tmp_path / "src", params, tmp_path / "out2", seed=0, progress=lambda *a: None)
