"""Training as users run it: resume after SIGKILL, and DistributedDataParallel under torchrun."""

from __future__ import annotations

import faulthandler
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from mlflow.tracking import MlflowClient

from medseg.collective import Collective, leave
from medseg.demo import write_phantom_ctc
from medseg.training.checkpoint import CHECKPOINT_FILE
from medseg.training.loop import train_segmentation
from tests.integration.helpers import child_runs, clean_env, run_cli, write_workflow
from tests.unit.test_training import phantom_cases, run_clock, same_weights, tiny_params

pytestmark = pytest.mark.integration

TRAIN = {
    "epochs": 6,
    "patch_size": [32, 32],
    "batch_size": 2,
    "net": {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1},
    "target": "boundary",
    "loss": {"name": "dice_border_ce"},
    "augment": {"elastic": 0.5, "rotate": 20},
}


def cached_weights(workspace: Path, name: str) -> dict[str, torch.Tensor]:
    """The train stage's weights file ``name`` (the postprocess stage's model links the same file)."""
    files = [
        path
        for path in (workspace / "cache").glob(f"*/model/{name}")
        if json.loads((path.parent.parent / "manifest.json").read_text())["stage"] == "train"
    ]
    assert len(files) == 1, files
    return torch.load(files[0], weights_only=True)


def checkpoint_epoch(workspace: Path) -> int:
    files = list((workspace / "scratch").glob(f"*/{CHECKPOINT_FILE}"))
    if not files:
        return 0
    try:
        return int(torch.load(files[0], weights_only=True)["epoch"])
    except (RuntimeError, EOFError, OSError):
        return 0


@pytest.fixture(scope="module")
def workflow(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    data = write_phantom_ctc(root / "data", frames=8, size=64, seed=4)
    params = {"ingest": {"train_on": "all"}, "train": TRAIN}
    return write_workflow(root, data, name="runs", params=params, experiment="runs")


def test_sigkill_mid_training_then_rerun_resumes_to_identical_weights(workflow, tmp_path):
    reference = run_cli("run", str(workflow), "--workspace", str(tmp_path / "uninterrupted"))
    assert reference.returncode == 0, reference.stderr

    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "medseg.cli", "run", str(workflow), "--workspace", str(killed)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=clean_env(),
    )
    deadline = time.monotonic() + 240
    while checkpoint_epoch(killed) < 2 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert process.poll() is None, "training ended before it could be killed; give it more epochs"
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = checkpoint_epoch(killed)
    assert 2 <= done < TRAIN["epochs"]
    assert not list((killed / "cache").glob("*/model"))  # nothing of train committed

    resumed = run_cli("run", str(workflow), "--workspace", str(killed))
    assert resumed.returncode == 0, resumed.stderr
    assert (
        "stages executed: train, postprocess, evaluate, export" in resumed.stderr
    )  # ingest committed before
    for name in ("weights.pt", "last_weights.pt"):
        assert same_weights(cached_weights(tmp_path / "uninterrupted", name), cached_weights(killed, name))
    assert not list((killed / "scratch").iterdir())  # checkpoints removed on commit
    assert not list((killed / "cache" / "tmp").iterdir())  # the killed run's temp output is gone

    client = MlflowClient(f"sqlite:///{killed / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("runs").experiment_id
    runs = client.search_runs([experiment])
    assert not [run for run in runs if run.info.status == "RUNNING"]  # nothing left open
    parents = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    (dead,) = [run for run in parents if run.info.status == "KILLED"]
    (alive,) = [run for run in parents if run.info.status == "FINISHED"]
    assert dead.data.tags["medseg.resumed_by"] == alive.info.run_id  # the killed run points to its resumer
    # One train run, continued in place under the resuming parent: a continuous loss curve.
    (train,) = [run for run in runs if run.data.tags.get("medseg.stage") == "train"]
    assert train.info.status == "FINISHED" and train.data.tags["mlflow.parentRunId"] == alive.info.run_id
    assert train.data.tags["medseg.resumed_by"] == alive.info.run_id
    assert train.data.metrics["train/resumed_from_epoch"] == done
    steps = [metric.step for metric in client.get_metric_history(train.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(1, TRAIN["epochs"] + 1))
    # The killed process's ingest run had finished; it stays under the killed parent.
    (ingest,) = [
        run
        for run in runs
        if run.data.tags.get("medseg.stage") == "ingest"
        and run.info.status == "FINISHED"
        and run.data.tags["medseg.cache_hit"] == "false"
    ]
    assert ingest.data.tags["mlflow.parentRunId"] == dead.info.run_id


def _ddp_worker(rank: int, world: int, init_file: str, folder: str) -> None:
    faulthandler.enable()  # a native abort prints the Python frames it came from
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    out = Path(folder) / f"rank{rank}"
    out.mkdir()
    # The ranks' clocks disagree: an epoch takes 10 s on rank 0 (30 s hold the 3 epochs) and
    # 20 s on rank 1 (30 s would hold 1); each epoch reads the clock once.
    run_clock(pytest.MonkeyPatch(), itertools.count(0.0, 10.0 * (rank + 1)))  # never undone: the process ends
    reported: list[int] = []
    result = train_segmentation(
        phantom_cases(4),
        phantom_cases(1, seed=10),
        tiny_params(budget={"minutes": 0.5}),
        seed=3,
        on_epoch=lambda epoch, metrics: reported.append(epoch),
        progress=lambda *args: None,
        checkpoint=out / CHECKPOINT_FILE,
    )
    torch.save(
        {
            "weights": result.last_state_dict,
            "reported": torch.tensor(reported),
            "steps": result.history[-1]["train/steps"],
            "lr": torch.tensor([entry["train/lr"] for entry in result.history]),
        },
        out / "result.pt",
    )
    leave(Collective(rank, world), together=True)  # a rank destroying mid-exchange aborts its peer
    # Skip interpreter finalization: gloo's threads may free the last work's tensors under a
    # finalizing interpreter and abort a rank whose results are written (pytorch/pytorch#179291).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_ddp_two_cpu_processes_stay_in_sync_and_only_rank0_reports(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}" / "result.pt", weights_only=True) for r in (0, 1)]
    # Gradients were averaged, and both ranks fitted the minutes budget on rank 0's clock.
    assert torch.equal(ranks[0]["lr"], ranks[1]["lr"])
    assert ranks[0]["lr"][-1].item() == pytest.approx(0.0, abs=1e-12)  # the schedule ran out
    assert same_weights(ranks[0]["weights"], ranks[1]["weights"])
    assert ranks[0]["reported"].tolist() == [1, 2, 3] and ranks[1]["reported"].tolist() == []
    assert (tmp_path / "rank0" / CHECKPOINT_FILE).is_file()
    assert not (tmp_path / "rank1" / CHECKPOINT_FILE).exists()
    single = train_segmentation(
        phantom_cases(4),
        phantom_cases(1, seed=10),
        tiny_params(),
        seed=3,
        on_epoch=lambda *a: None,
        progress=lambda *a: None,
    )
    # 4 cases, batch 2 per rank: each rank takes 1 step per epoch where one process takes 2.
    assert single.history[-1]["train/steps"] == 2 and ranks[0]["steps"] == ranks[1]["steps"] == 1
    assert not same_weights(single.last_state_dict, ranks[0]["weights"])


def test_torchrun_workflow_tracks_once_from_rank0(workflow, tmp_path):
    workspace = tmp_path / "ws"
    torchrun = ("--standalone", "--nproc-per-node", "2", "-m", "medseg.cli")
    completed = run_cli(
        *torchrun, "run", str(workflow), "--workspace", str(workspace), module="torch.distributed.run"
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stderr.count("stages executed: ingest, train, postprocess, evaluate, export") == 1
    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("runs")
    parents = client.search_runs([experiment.experiment_id], "tags.medseg.workflow = 'runs'")
    parents = [run for run in parents if "mlflow.parentRunId" not in run.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = child_runs(client, experiment.experiment_id, parents[0].info.run_id)
    assert set(children) == {"ingest", "train", "postprocess", "evaluate", "export"}
    train_run = children["train"]
    assert train_run.data.metrics["train/world_size"] == 2
    steps = client.get_metric_history(train_run.info.run_id, "train/steps")
    # 4 train frames, batch 2 per rank: one step per rank and epoch.
    assert len(steps) == TRAIN["epochs"] and all(m.value == 1 for m in steps)
    assert np.isfinite(parents[0].data.metrics["eval/seg"])
