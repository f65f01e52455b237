"""What a newcomer touches to add a loss, a stage or an ingest layout: one entry each.

Each test adds a small real one from this file alone (nothing in ``medseg/`` is edited) and
runs it through the same path medseg's own entries take: the params model validates it, the
training loop / runner / ingest use it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import Field, ValidationError

from medseg.errors import ConfigError
from medseg.io.ingest import IngestParams
from medseg.io.layouts import LAYOUTS, SourceCase
from medseg.io.readers import read_image
from medseg.params import Params
from medseg.runner.contract import Kind, Stage, StageContext, ports
from medseg.runner.engine import Runner
from medseg.runner.spec import load_pipeline, load_workflow
from medseg.runner.workspace import Workspace
from medseg.stages import REGISTRY
from medseg.tracking.base import NullTracker
from medseg.training.losses import LOSSES, LossEntry, LossFunction, LossParams, build_loss
from tests.conftest import SHARED_DATA, require
from tests.unit.test_training import tiny_params, train

GOWT1 = SHARED_DATA / "ctc" / "Fluo-N2DH-GOWT1"


class FocalParams(Params):
    """The focal loss's own param: the focusing exponent γ (0: plain cross-entropy)."""

    gamma: float = Field(2.0, ge=0)


def build_focal(params: LossParams) -> LossFunction:
    """Focal loss (Lin et al. 2017): mean of −(1 − p_t)^γ · log p_t over voxels."""
    gamma = params.options().gamma  # type: ignore[attr-defined]

    def focal(logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        log_p = torch.log_softmax(logits, dim=1).gather(1, batch["label"].long())
        return (-((1 - log_p.exp()) ** gamma) * log_p).mean()

    return focal


@pytest.fixture
def focal_loss() -> Iterator[None]:
    LOSSES.register("focal", LossEntry(build_focal, params=FocalParams))
    yield
    LOSSES.unregister("focal")


def test_a_new_loss_is_one_registry_entry(focal_loss):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, generator=generator)
    batch = {"label": torch.randint(0, 3, (2, 1, 8, 8), generator=generator)}
    plain = torch.nn.functional.cross_entropy(logits, batch["label"][:, 0])
    assert torch.allclose(build_loss(LossParams(name="focal", gamma=0.0))(logits, batch), plain)  # γ = 0: CE
    assert build_loss(LossParams(name="focal", gamma=2.0))(logits, batch) < plain  # easy voxels count less

    result, epochs = train(tiny_params(loss={"name": "focal", "gamma": 1.5}, epochs=1))
    assert epochs == [1] and np.isfinite(result.history[-1]["train/loss"])

    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        LossParams(name="focal", gamma=-1)
    with pytest.raises(ValidationError, match="loss 'ce' takes no parameter gamma"):
        LossParams(name="ce", gamma=2)
    with pytest.raises(
        ValidationError, match="loss 'dice_ce' takes no parameter gamma; it takes background, batch"
    ):
        LossParams(name="dice_ce", gamma=2)
    with pytest.raises(ValidationError, match="unknown loss 'focl'; did you mean 'focal'"):
        LossParams(name="focl")


def discover_flat(root: Path, params: IngestParams) -> tuple[list[SourceCase], IngestParams]:
    """``<name>_img.tif`` beside ``<name>_mask.tif`` in one folder."""
    cases = [
        SourceCase(
            source_name=image.name[: -len("_img.tif")],
            image=image,
            label=image.with_name(image.name.replace("_img.tif", "_mask.tif")),
        )
        for image in sorted(root.glob("*_img.tif"))
    ]
    return cases, params


class ObjectCount(Stage[Params]):
    """Count the reference objects of every case of a dataset; a report."""

    name = "object_count"
    version = 1
    params = Params
    inputs = ports(dataset=Kind.DATASET)
    outputs = ports(report=Kind.REPORT)

    def execute(
        self, context: StageContext, params: Params, inputs: Mapping[str, Path], outputs: Mapping[str, Path]
    ) -> dict[str, float]:
        """Write ``counts.csv`` (case id, objects) and return the mean count."""
        from medseg.io.dataset import load_case, read_index

        counts = {}
        for record in read_index(inputs["dataset"]).cases:
            _, label = load_case(inputs["dataset"], record)
            counts[record.case_id] = len(np.unique(label.array[label.array > 0]))
        rows = [f"{case},{count}" for case, count in counts.items()]
        (outputs["report"] / "counts.csv").write_text("\n".join(["case_id,objects", *rows]) + "\n")
        return {"count/mean_objects": float(np.mean(list(counts.values())))}


PIPELINE = """
name: counting
inputs: {data: {}}
stages:
  ingest:
    uses: ingest
    inputs: {source: inputs.data}
    params: {layout: flat, split: {val_fraction: 0.0, test_fraction: 0.0}}
  count: {uses: object_count, inputs: {dataset: ingest.dataset}}
"""


@pytest.fixture
def flat_layout() -> Iterator[None]:
    LAYOUTS.register("flat", discover_flat)
    yield
    LAYOUTS.unregister("flat")


def test_a_new_layout_and_a_new_stage_are_one_entry_each(flat_layout, tmp_path):
    data = tmp_path / "flat"
    data.mkdir()
    frames = [2, 5]
    for frame in frames:  # real GOWT1 frames with their reference masks, renamed into the new layout
        (data / f"f{frame}_img.tif").symlink_to(require(GOWT1 / "01" / f"t{frame:03d}.tif"))
        (data / f"f{frame}_mask.tif").symlink_to(GOWT1 / "01_GT" / "SEG" / f"man_seg{frame:03d}.tif")
    (tmp_path / "counting.yaml").write_text(PIPELINE)
    workflow = tmp_path / "wf.yaml"
    workflow.write_text("pipeline: counting.yaml\ninputs: {data: flat}\n")
    registry = {**REGISTRY, "object_count": ObjectCount()}

    outcome = Runner(Workspace(tmp_path / "ws")).run(load_workflow(workflow, registry), NullTracker())

    assert outcome.executed == ["ingest", "count"]
    table = (outcome.stages[1].outputs["report"] / "counts.csv").read_text().splitlines()
    masks = [
        read_image(GOWT1 / "01_GT" / "SEG" / f"man_seg{frame:03d}.tif", kind="label") for frame in frames
    ]
    expected = [len(np.unique(mask.array[mask.array > 0])) for mask in masks]
    assert table == ["case_id,objects", *(f"case_{n:04d},{count}" for n, count in enumerate(expected, 1))]
    assert outcome.metrics["count/mean_objects"] == np.mean(expected)
    with pytest.raises(ValidationError, match="unknown layout 'flt'; did you mean 'flat'"):
        IngestParams(layout="flt")


def test_wiring_of_mismatched_kinds_is_refused_with_the_dotted_path(tmp_path):
    pipeline = tmp_path / "wrong.yaml"
    pipeline.write_text(
        """
name: wrong
inputs:
  images: {}
  model: {kind: export}
stages:
  ingest: {uses: ingest_images, inputs: {source: inputs.images}}
  predict: {uses: predict, inputs: {images: ingest.images, model: inputs.model}}
  evaluate: {uses: evaluate, inputs: {dataset: predict.labels, model: inputs.model}}
"""
    )
    with pytest.raises(
        ConfigError,
        match=r"stages.evaluate.inputs.dataset: 'predict.labels' is a labels but "
        r"'evaluate' needs a dataset here",
    ):
        load_pipeline(pipeline, REGISTRY)
    pipeline.write_text(pipeline.read_text().replace("model: {kind: export}", "model: {}"))
    with pytest.raises(ConfigError, match=r"stages.predict.inputs.model: 'inputs.model' is a source"):
        load_pipeline(pipeline, REGISTRY)
