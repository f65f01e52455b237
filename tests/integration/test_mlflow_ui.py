"""The MLflow UI of a finished workflow run, opened in headless Chromium (Debian's, via Selenium)."""

from __future__ import annotations

import shutil
import time

import pytest

import medseg
from medseg.demo import write_phantom_ctc
from tests.integration.helpers import free_port, start_mlflow_server, stop, write_workflow

pytestmark = [
    pytest.mark.integration,
    pytest.mark.browser,
    pytest.mark.skipif(
        shutil.which("chromium") is None or shutil.which("chromedriver") is None,
        reason="Chromium/ChromeDriver not installed (tests/system-packages.sh installs them)",
    ),
]


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--window-size=2600,1000",  # wide enough for the eval columns beside the assistant panel
    ):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    yield driver
    driver.quit()


def _page_text(driver, *wanted: str, timeout: float = 60.0) -> str:
    """The page's visible text once it shows every ``wanted`` string (fails after ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    while True:
        text = driver.find_element("tag name", "body").text
        if all(item in text for item in wanted):
            return text
        if time.monotonic() > deadline:
            missing = [item for item in wanted if item not in text]
            pytest.fail(f"the MLflow UI never showed {missing}; it showed: {text[:1500]}")
        time.sleep(0.5)


def test_ui_shows_experiment_stage_runs_and_eval_metrics(tmp_path, browser):
    process, url = start_mlflow_server(tmp_path / "server", free_port())
    try:
        data = write_phantom_ctc(tmp_path / "data", frames=6, size=32, seed=2)
        params = {
            "ingest": {"train_on": "all"},
            "train": {"epochs": 1, "patch_size": [32, 32], "batch_size": 2},
        }
        workflow = write_workflow(tmp_path, data, name="ui-study", params=params, experiment="ui-review")
        result = medseg.run_workflow(workflow, workspace=tmp_path / "ws", tracking_uri=url)
        from mlflow.tracking import MlflowClient

        experiment = MlflowClient(url).get_experiment_by_name("ui-review").experiment_id

        # The link medseg prints opens the training-runs table (not the GenAI overview) with the
        # run named after what ran, its dataset input and the eval columns.
        assert result.review_link.startswith(f"#/experiments/{experiment}/runs?")
        browser.get(f"{url}/{result.review_link}")
        text = _page_text(
            browser,
            "ui-study · ran ingest, train, postprocess, evaluate, export",
            "ui-study/ingest.dataset",
            "eval/seg",
            "eval/det",
            "matching runs",
        )
        assert "Token Usage" not in text
        browser.save_screenshot(str(tmp_path / "experiment.png"))
        tags = MlflowClient(url).get_experiment(experiment).tags
        assert tags["mlflow.experimentKind"] == "custom_model_development"
        browser.find_element("css selector", "[data-component-id*='runnamecellrenderer']").click()  # expand
        _page_text(browser, "ingest", "train", "evaluate", "export")
        browser.save_screenshot(str(tmp_path / "runs.png"))

        browser.get(f"{url}/#/experiments/{experiment}/runs/{result.parent_run_id}")
        text = _page_text(browser, "eval/seg", "eval/iou", "eval/dice")
        assert f"{result.metrics['eval/seg']:.3f}"[:4] in text  # the value, as the UI rounds it
    finally:
        stop(process)
