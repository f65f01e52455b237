"""Workflow validation: errors name the dotted path and the closest valid key, before any work."""

from __future__ import annotations

from pathlib import Path

import pytest

from medseg.api import validate_workflow
from medseg.errors import ConfigError


def _workflow(tmp_path: Path, data: Path, body: str) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(f"pipeline: unet2d\ninputs:\n  data: {data}\n{body}")
    return path


def test_valid_workflow_resolves_params_with_overrides(tmp_path, phantom_dir):
    resolved = validate_workflow(_workflow(tmp_path, phantom_dir, "params:\n  train: {optim: {lr: 0.01}}\n"))
    train = next(stage for stage in resolved.stages if stage.name == "train")
    assert train.params.optim.lr == 0.01
    assert train.params.optim.name == "adamw"  # pipeline default kept by the deep merge
    assert [stage.name for stage in resolved.stages] == [
        "ingest",
        "train",
        "postprocess",
        "evaluate",
        "export",
    ]
    assert resolved.input_paths["data"] == phantom_dir.resolve()
    assert str(phantom_dir) not in str(resolved.resolved_document())  # no source paths logged


def test_typo_names_dotted_path_and_nearest_key(tmp_path, phantom_dir):
    path = _workflow(tmp_path, phantom_dir, "params:\n  train:\n    optim: {lrr: 0.01}\n")
    with pytest.raises(ConfigError) as error:
        validate_workflow(path)
    assert str(error.value) == "study.yaml: unknown key 'params.train.optim.lrr'; did you mean 'lr'?"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("pipelin: unet2d\n", "unknown key 'pipelin'; did you mean 'pipeline'?"),
        ("params:\n  trian: {epochs: 1}\n", "unknown key 'params.trian'; did you mean 'train'?"),
        ("params:\n  train: {epoch: 1}\n", "unknown key 'params.train.epoch'; did you mean 'epochs'?"),
        (
            "params:\n  train: {epochs: 0}\n",
            "'params.train.epochs': Input should be greater than or equal to 1",
        ),
        ("params:\n  train: {patch_size: [100, 100]}\n", "must be multiples of 8"),
        ("tracking: {urii: x}\n", "unknown key 'tracking.urii'; did you mean 'uri'?"),
    ],
)
def test_config_errors(tmp_path, phantom_dir, body, expected):
    with pytest.raises(ConfigError, match=None) as error:
        validate_workflow(_workflow(tmp_path, phantom_dir, body))
    assert expected in str(error.value)
    assert "\n" not in str(error.value)


def test_missing_input_path_is_named(tmp_path):
    path = _workflow(tmp_path, tmp_path / "no-such-folder", "")
    with pytest.raises(ConfigError, match=r"inputs.data: path '.*no-such-folder' does not exist"):
        validate_workflow(path)


def test_unknown_pipeline_suggests_the_closest(tmp_path, phantom_dir):
    path = tmp_path / "study.yaml"
    path.write_text(f"pipeline: unet2 \ninputs: {{data: {phantom_dir}}}\n")
    with pytest.raises(ConfigError, match="pipeline 'unet2' not found; did you mean 'unet2d'"):
        validate_workflow(path)


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("pipeline: unet2d\ninputs: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml line"):
        validate_workflow(path)


def test_shipped_examples_validate():
    examples = Path(__file__).resolve().parents[2] / "workflows" / "examples"
    gowt1 = examples / "gowt1_unet2d.yaml"
    if not (examples / "../../../shared/data").resolve().exists():
        pytest.skip("../shared/data not beside the project")
    assert validate_workflow(gowt1).name == "gowt1-unet2d"


def test_pacs_predict_takes_a_ray_executor_outside_the_cache_key(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    path = tmp_path / "pacs.yaml"
    path.write_text(
        f"pipeline: pacs_predict\ninputs: {{model: {model}}}\n"
        "params:\n  predict:\n    executor: {kind: ray, address: auto, workers: 4, gpus_per_worker: 0.5}\n"
    )
    predict = next(stage for stage in validate_workflow(path).stages if stage.name == "predict")
    assert predict.params.executor.kind == "ray" and predict.params.executor.gpus_per_worker == 0.5
    assert predict.params.loggable()["executor"]["address"] == "auto"  # logged with the run
    assert "executor" not in predict.params.keyed()  # the same outputs wherever they are computed
    assert type(predict.params)().keyed() == predict.params.keyed()
    path.write_text(path.read_text().replace("workers: 4", "workers: 0"))
    with pytest.raises(ConfigError, match=r"'params.predict.executor.workers': Input should be greater than"):
        validate_workflow(path)
