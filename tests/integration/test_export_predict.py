"""Export to the MLflow registry, the Segmenter from every source, `medseg predict`, the predict pipeline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

import medseg
from medseg.demo import write_phantom_ctc
from medseg.io.readers import read_image
from medseg.tracking.mlflow import MlflowTracker
from tests.integration.helpers import FAST_TRAIN, clean_env, run_cli, spy_on_stages, write_workflow

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """The phantom study exported and registered as ``phantom-cells`` with alias ``champion``."""
    root = tmp_path_factory.mktemp("registry")
    data = write_phantom_ctc(root / "source-data", frames=10, size=64, seed=5)
    params = {
        "ingest": {"train_on": "all"},
        "train": FAST_TRAIN,
        "export": {"register_as": "phantom-cells", "aliases": ["champion"], "segment": {"label": "cell"}},
    }
    workflow = write_workflow(
        root, data, name="registered", params=params, experiment="registry", mlflow_model=True
    )
    result = medseg.run_workflow(workflow, workspace=root / "ws")
    return root, data, result


def test_registered_version_has_alias_card_and_loads_from_every_source(registered):
    _root, data, result = registered
    client = MlflowClient(result.tracking_uri)
    version = client.get_model_version_by_alias("phantom-cells", "champion")
    assert str(version.version) == "1"
    assert "instance segmentation" in version.description and "seg " in version.description
    assert version.tags["medseg.spatial_dims"] == "2"
    assert json.loads(version.tags["medseg.labels"]) == {"0": "background", "1": "interior", "2": "border"}

    export = result.outputs["export"]["export"]
    card = json.loads((export / "model_card.json").read_text())
    for field in (
        "task",
        "labels",
        "spacing",
        "preprocessing",
        "training",
        "evaluation",
        "versions",
        "intended_use",
    ):
        assert card[field], field
    assert card["training"]["dataset_digest"] == version.tags["medseg.training_data_digest"]
    assert card["segments"][0]["label"] == "cell"
    assert {"torch", "monai", "medseg"} <= set(card["versions"])

    image = read_image(data / "01" / "t004.tif")
    expected = medseg.Segmenter.from_export(export).predict(image).array
    assert expected.max() > 0
    export_run = next(
        run.info.run_id
        for run in client.search_runs(
            [client.get_experiment_by_name("registry").experiment_id],
            f"tags.mlflow.parentRunId = '{result.parent_run_id}'",
        )
        if run.data.tags["medseg.stage"] == "export"
    )
    for source in (
        "models:/phantom-cells@champion",
        "models:/phantom-cells/1",
        f"runs:/{export_run}/model",
        result.parent_run_id,
    ):
        loaded = medseg.Segmenter.load(source, resolver=medseg.model_registry(result.tracking_uri))
        np.testing.assert_array_equal(loaded.predict(image).array, expected, err_msg=source)
    with pytest.raises(medseg.TrackingError, match="phantom-cells@missing"):
        medseg.Segmenter.load(
            "models:/phantom-cells@missing", resolver=medseg.model_registry(result.tracking_uri)
        )


@pytest.fixture
def fluent(registered):
    """MLflow's fluent API pointed at the registry study's store for one test."""
    import mlflow

    mlflow.set_tracking_uri(registered[2].tracking_uri)
    yield mlflow
    mlflow.set_tracking_uri(None)


def test_medseg_flavor_loads_a_segmenter_and_reads_the_card_without_weights(registered, fluent, tmp_path):
    import medseg.mlflow

    _root, data, result = registered
    uri = "models:/phantom-cells@champion"
    info = fluent.models.get_model_info(uri)
    assert {"medseg", "python_function"} <= set(info.flavors)
    assert str(fluent.MlflowClient().get_logged_model(info.model_id).status).endswith("READY")
    export = result.outputs["export"]["export"]
    expected_card = medseg.ModelCard.read(export / "model_card.json")

    # The card comes from MLmodel alone: with the weights gone from the artifact store it still loads.
    stored = Path(
        fluent.MlflowClient().get_logged_model(info.model_id).artifact_location.removeprefix("file://")
    )
    weights = stored / "artifacts" / "weights.pt"
    weights.rename(weights.with_suffix(".away"))
    try:
        assert medseg.mlflow.load_card(uri) == expected_card
        with pytest.raises(medseg.DataError, match=r"weights\.pt and model_card\.json needed"):
            medseg.mlflow.load_model(uri, tmp_path / "without-weights")
    finally:
        weights.with_suffix(".away").rename(weights)

    image = read_image(data / "01" / "t004.tif")
    expected = medseg.Segmenter.from_export(export).predict(image).array
    loaded = medseg.mlflow.load_model(uri, tmp_path / "download")
    assert isinstance(loaded, medseg.Segmenter) and loaded.card == expected_card
    np.testing.assert_array_equal(loaded.predict(image).array, expected)

    # log_model from an export folder into a new run, then back through MLflow's own pyfunc API.
    artifacts = (tmp_path / "flavor-artifacts").as_uri()  # not ./mlruns of the working directory
    experiment = fluent.MlflowClient().create_experiment("flavor", artifact_location=artifacts)
    with fluent.start_run(experiment_id=experiment):
        logged = medseg.mlflow.log_model(export, registered_model_name="flavor-round-trip")
    assert logged.flavors["medseg"]["card"]["name"] == expected_card.name
    # medseg's own logging goes to its run whatever the caller's fluent MLflow state is.
    client = fluent.MlflowClient()
    target = client.create_run(client.get_experiment_by_name("registry").experiment_id).info.run_id
    with fluent.start_run(experiment_id=experiment):
        MlflowTracker(result.tracking_uri).log_model(target, export)
    assert [
        model.source_run_id
        for model in client.search_logged_models([client.get_run(target).info.experiment_id])
        if model.source_run_id == target
    ] == [target]
    again = medseg.mlflow.load_model("models:/flavor-round-trip/1", tmp_path / "again")
    np.testing.assert_array_equal(again.predict(image).array, expected)
    # MLflow's pyfunc is the whole segmenter: raw images of any size in, instance labels out.
    pyfunc = fluent.pyfunc.load_model("models:/flavor-round-trip/1")
    batch = np.stack([image.array, read_image(data / "01" / "t005.tif").array]).astype(np.float32)
    labels = pyfunc.predict(batch, params={"spacing": [1.0, 1.0]})
    assert labels.dtype == np.int32 and labels.shape == (2, *image.spatial_shape)
    np.testing.assert_array_equal(labels[0], expected[0])
    with pytest.raises(medseg.DataError, match=r"not a medseg export folder, missing model\.ts, weights\.pt"):
        medseg.mlflow.log_model(tmp_path / "not-an-export")


def test_concurrent_predictions_equal_sequential_ones(registered):
    _, data, result = registered
    segmenter = medseg.Segmenter.from_export(result.outputs["export"]["export"])
    images = [read_image(data / "01" / f"t{frame:03d}.tif") for frame in range(6)]
    sequential = [segmenter.predict(image).array for image in images]
    start = threading.Barrier(6)

    def predict(index: int) -> np.ndarray:
        start.wait()  # all six calls enter predict together
        return segmenter.predict(images[index]).array

    with ThreadPoolExecutor(max_workers=6) as pool:
        concurrent = list(pool.map(predict, [index % 6 for index in range(12)]))
    for index, labels in enumerate(concurrent):
        np.testing.assert_array_equal(labels, sequential[index % 6])


def test_flip_tta_averages_over_mirrors(registered):
    import torch

    from medseg.inference.predict import predict_logits

    _, data, result = registered
    segmenter = medseg.Segmenter.from_export(result.outputs["export"]["export"])
    roi = segmenter.card.inference.roi_size
    image = read_image(data / "01" / "t004.tif").array[
        :, : roi[0], : roi[1]
    ]  # one window: no tiling asymmetry

    def logits(array: np.ndarray, tta: bool) -> np.ndarray:
        return predict_logits(
            segmenter.module, array, roi_size=roi, overlap=0.25, device=torch.device("cpu"), flip_tta=tta
        ).numpy()

    mirrored = image[:, ::-1].copy()
    with_tta, mirrored_tta = logits(image, True), logits(mirrored, True)[:, ::-1]
    plain, mirrored_plain = logits(image, False), logits(mirrored, False)[:, ::-1].copy()
    # Averaged over all four mirrors, the prediction of a mirrored image is the mirrored prediction.
    np.testing.assert_allclose(with_tta, mirrored_tta, atol=1e-5)
    assert np.abs(plain - mirrored_plain).max() > 1e-3  # the net alone is not mirror-symmetric
    # The result is the log of the mean softmax over the four mirrors.
    probabilities = [torch.as_tensor(plain).softmax(0), torch.as_tensor(mirrored_plain).softmax(0)]
    for axes in ((2,), (1, 2)):
        flipped = np.flip(image, axes).copy()
        probabilities.append(torch.as_tensor(np.flip(logits(flipped, False), axes).copy()).softmax(0))
    np.testing.assert_allclose(with_tta, torch.stack(probabilities).mean(0).log().numpy(), atol=1e-5)
    assert segmenter.predict(read_image(data / "01" / "t004.tif"), flip_tta=True).array.max() > 0


def test_a_card_that_chose_mirroring_mirrors_unless_told_not_to(registered):
    """``inference.mirror`` (chosen by the postprocess stage) is what ``predict`` does by default."""
    from dataclasses import replace

    _, data, result = registered
    exported = medseg.Segmenter.from_export(result.outputs["export"]["export"])
    plain, mirroring = (
        medseg.Segmenter(
            exported.module,
            exported.card.model_copy(update={"inference": replace(exported.card.inference, mirror=mirror)}),
            "cpu",
        )
        for mirror in (False, True)
    )
    image = read_image(data / "01" / "t004.tif")
    unmirrored, mirrored = plain.predict(image).array, plain.predict(image, flip_tta=True).array
    assert not np.array_equal(unmirrored, mirrored)
    np.testing.assert_array_equal(mirroring.predict(image).array, mirrored)
    np.testing.assert_array_equal(mirroring.predict(image, flip_tta=False).array, unmirrored)


def test_predict_cli_writes_each_case_in_its_format(registered, tmp_path):
    _, data, result = registered
    export = result.outputs["export"]["export"]
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    for frame in (3, 4):
        shutil.copy(data / "01" / f"t{frame:03d}.tif", cohort / f"frame{frame}.tif")
    out = tmp_path / "masks"
    done = run_cli("predict", str(export), str(cohort), str(out), "--format", "tiff")
    assert done.returncode == 0, done.stderr
    assert sorted(path.name for path in out.iterdir()) == ["frame3.tif", "frame4.tif"]
    segmenter = medseg.Segmenter.from_export(export)
    expected = segmenter.predict(cohort / "frame4.tif").array
    np.testing.assert_array_equal(read_image(out / "frame4.tif", kind="label").array, expected)
    assert "frame4" in done.stdout and "2 case(s)" in done.stdout

    single = tmp_path / "one.nii.gz"
    done = run_cli(
        "predict", "models:/phantom-cells@champion", str(cohort / "frame4.tif"), str(single),
        "--tracking-uri", result.tracking_uri,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    np.testing.assert_array_equal(read_image(single, kind="label").array, expected)

    refused = run_cli("predict", str(export), str(cohort), str(tmp_path / "seg"), "--format", "dicom-seg")
    assert refused.returncode == 1
    assert "DICOM SEG output needs a DICOM series" in refused.stdout + refused.stderr
    assert not any((tmp_path / "seg").glob("*.dcm"))


def test_predict_pipeline_segments_a_cohort_and_caches(registered, tmp_path, monkeypatch):
    _, data, result = registered
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    for frame in (5, 6, 7):
        shutil.copy(data / "01" / f"t{frame:03d}.tif", cohort / f"patient-{frame}.tif")
    export = tmp_path / "model"
    shutil.copytree(result.outputs["export"]["export"], export)
    workflow = tmp_path / "predict.yaml"
    document = {
        "pipeline": "predict",
        "name": "cohort",
        "inputs": {"images": "cohort", "model": "model"},
        "params": {"write": {"format": "tiff"}},
        "tracking": {"experiment": "cohort"},
    }
    workflow.write_text(yaml.safe_dump(document))
    calls = spy_on_stages(monkeypatch)
    first = medseg.run_workflow(workflow, workspace=tmp_path / "ws")
    assert first.executed == ["ingest", "predict", "write"]
    assert first.metrics["predict/cases"] == 3.0 and first.metrics["predict/mean_objects"] > 0
    masks = first.outputs["write"]["masks"]
    assert sorted(path.name for path in masks.glob("case_*")) == [
        "case_0001.tif",
        "case_0002.tif",
        "case_0003.tif",
    ]
    expected = medseg.Segmenter.from_export(export).predict(cohort / "patient-6.tif").array
    np.testing.assert_array_equal(read_image(masks / "case_0002.tif", kind="label").array, expected)
    second = medseg.run_workflow(workflow, workspace=tmp_path / "ws")
    assert second.executed == [] and calls == {"ingest_images": 1, "predict": 1, "write_masks": 1}
    private = next((tmp_path / "ws" / "private").glob("*.json"))
    assert json.loads(private.read_text())["case_0002"] == "patient-6.tif"
    database = (tmp_path / "ws" / "mlflow.db").read_bytes()
    assert b"patient-6" not in database


def test_bad_models_and_inputs_are_refused_clearly(registered, tmp_path):
    _, _data, result = registered
    export = result.outputs["export"]["export"]
    broken = tmp_path / "broken"
    shutil.copytree(export, broken)
    (broken / "model_card.json").unlink()
    with pytest.raises(medseg.DataError, match="not a medseg export"):
        medseg.Segmenter.load(broken)
    card = json.loads((export / "model_card.json").read_text())
    (broken / "model_card.json").write_text(json.dumps({**card, "in_channels": 2}))
    with pytest.raises(medseg.DataError, match="weights do not fit"):
        medseg.Segmenter.load(broken)
    segmenter = medseg.Segmenter.from_export(export)
    with pytest.raises(medseg.DataError, match="does not fit the model"):
        segmenter.predict(np.zeros((8, 8, 8), np.float32), spacing=(1.0, 1.0, 1.0))
    with pytest.raises(medseg.DataError, match="does not fit the model"):
        segmenter.predict(np.zeros((2, 16, 16), np.float32))
    empty = tmp_path / "no-series"
    empty.mkdir()
    (empty / "junk.dcm").write_bytes(b"not dicom")
    with pytest.raises(medseg.DataError, match="0 image series"):
        segmenter.predict(empty)
    with pytest.raises(medseg.DataError, match="model registry"):
        medseg.Segmenter.load("models:/phantom-cells/1")


def test_mlflow_models_serve_answers_like_segmenter_predict_on_a_larger_image(registered, tmp_path):
    """``mlflow models serve`` on the registered model: a real HTTP request, a frame bigger than any patch."""
    import urllib.request

    from tests.integration.helpers import free_port, stop

    _root, data, result = registered
    frames = [read_image(data / "01" / f"t{frame:03d}.tif").array for frame in range(4)]
    image = np.block([[frames[0], frames[1]], [frames[2], frames[3]]])[:, :, :100]  # (1, 128, 100)
    expected = medseg.Segmenter.from_export(result.outputs["export"]["export"]).predict(image).array
    port = free_port()
    bin_dir = str(Path(sys.executable).parent)  # mlflow starts uvicorn from PATH
    env = {
        **clean_env(),
        "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",
        "MLFLOW_TRACKING_URI": result.tracking_uri,
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [str(Path(bin_dir) / "mlflow"), "models", "serve",
         "-m", "models:/phantom-cells@champion", "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        body = json.dumps({"inputs": image[None].astype(float).tolist(), "params": {"spacing": [1.0, 1.0]}})
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", body.encode(), {"Content-Type": "application/json"}
        )
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    answer = json.loads(response.read())
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    served = (tmp_path / "serve.log").read_text()[-2000:]
                    pytest.fail(f"mlflow models serve did not answer: {served}")
                time.sleep(1)
    finally:
        stop(server)
        log.close()
    labels = np.asarray(answer["predictions"])
    assert labels.shape == (1, 128, 100)
    np.testing.assert_array_equal(labels[0], expected[0])
