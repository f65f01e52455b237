"""The ``medseg`` command line (typer + rich). Library errors print one line and exit 1."""

from __future__ import annotations

import gc
import importlib.abc
import importlib.machinery
import importlib.util
import json
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from medseg.errors import MedsegError

app = typer.Typer(
    name="medseg",
    help="Reproducible MONAI U-Net segmentation pipelines tracked in MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
cache_app = typer.Typer(help="Manage the stage cache.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")
tracking_app = typer.Typer(help="Tracking server housekeeping.", no_args_is_help=True)
app.add_typer(tracking_app, name="tracking")
orthanc_app = typer.Typer(help="Automatic segmentation of series arriving in Orthanc.", no_args_is_help=True)
app.add_typer(orthanc_app, name="orthanc")
ConfigArgument = Annotated[Path, typer.Argument(help="Auto-segmentation configuration (YAML).")]
ORTHANC_PYTHON = Path("/usr/share/orthanc/plugins/libOrthancPython.so")

console = Console(stderr=True)
_state = {"debug": False}

WorkspaceOption = Annotated[
    Path,
    typer.Option(
        "--workspace",
        envvar="MEDSEG_WORKSPACE",
        help="Cache, private maps and the embedded MLflow store.",
    ),
]
TrackingOption = Annotated[
    str | None,
    typer.Option(
        "--tracking-uri",
        envvar="MLFLOW_TRACKING_URI",
        help="MLflow tracking URI (default: the workflow's tracking.uri, else the workspace's SQLite store).",
    ),
]
WorkflowArgument = Annotated[Path, typer.Argument(help="Workflow YAML file.")]


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors.")] = False,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads",
            min=1,
            help="CPU threads for compute (default: OMP_NUM_THREADS, else the CPUs this process may use).",
        ),
    ] = None,
) -> None:
    from medseg.threads import compute_threads, thread_environment

    _state["debug"] = debug
    settings = thread_environment(compute_threads(threads, os.environ))
    os.environ.update({key: value for key, value in settings.items() if key.endswith("_NUM_THREADS")})
    os.environ.setdefault("GOMP_SPINCOUNT", settings["GOMP_SPINCOUNT"])


@contextmanager
def _errors() -> Iterator[None]:
    """Print library errors as one line and exit 1; keep the traceback for ``--debug``."""
    try:
        yield
    except MedsegError as exc:
        if _state["debug"]:
            raise
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        if exc.local_detail:
            console.print(f"  here (never logged): {exc.local_detail}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


class _DebugLog(logging.FileHandler):
    """A log file created (with its folder) at the first record, so a failed command leaves no workspace."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, encoding="utf-8", delay=True)

    def _open(self) -> Any:
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


def _quiet_libraries(workspace: Path | None = None) -> None:
    """Keep third-party chatter off the user's terminal: it goes to ``<workspace>/logs/debug.log``.

    Python warnings (``logging.captureWarnings``) and the records of every library logger
    reach only that file (nowhere without a workspace); medseg's own warnings (a broken
    plugin) stay on the terminal. With ``--debug`` everything is shown as well.
    """
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")  # its records reach our handlers
    # MLflow's default (7 retries, doubling back-off) hangs for minutes on a dead server;
    # medseg journals what cannot be sent instead (see `medseg tracking sync`).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    logging.captureWarnings(True)
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    if workspace is not None:
        to_file = _DebugLog(workspace / "logs" / "debug.log")
        to_file.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
        root.addHandler(to_file)
    else:
        root.addHandler(logging.NullHandler())
    to_terminal = logging.StreamHandler()
    to_terminal.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    if _state["debug"]:
        root.addHandler(to_terminal)
    else:
        to_terminal.setLevel(logging.WARNING)
        logging.getLogger("medseg").addHandler(to_terminal)
    if "torch" in sys.modules:
        _torch_logs_to_root()
    elif not any(isinstance(finder, _AfterTorchImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterTorchImport())


def _torch_logs_to_root() -> None:
    """Take torch's own stderr handlers off its loggers, so that their records reach ours (the debug log).

    torch gives ``torch`` and its registered sub-loggers (``torch.onnx``, ``torch.export``...) a
    stderr handler each and stops them from propagating; the ONNX exporter's notes (e.g.
    "torchvision is not installed") would otherwise reach the user's terminal.
    """
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and (name == "torch" or name.startswith("torch.")):
            for handler in list(logger.handlers):
                if type(handler) is logging.StreamHandler and handler.stream is sys.stderr:
                    logger.removeHandler(handler)
            logger.propagate = True


class _AfterTorchImport(importlib.abc.MetaPathFinder):
    """Calls ``_torch_logs_to_root`` as soon as ``import torch`` has run (torch loads lazily)."""

    def find_spec(
        self, fullname: str, path: Any = None, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        """Wrap the loader of the ``torch`` package so that its execution ends by rerouting its logs."""
        if fullname != "torch":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            execute(module)
            _torch_logs_to_root()

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _run_with_progress(path: Path, workspace: Path, tracking_uri: str | None) -> Any:
    from medseg.api import run_workflow
    from medseg.collective import collective_from_environment, leave

    collective = collective_from_environment()
    try:
        if collective.rank > 0:
            result = run_workflow(path, workspace=workspace, tracking_uri=tracking_uri, collective=collective)
        else:
            result = _run_rank0(path, workspace, tracking_uri, collective)
    except BaseException:
        leave(collective, together=False)
        raise
    leave(collective, together=True)
    if collective.rank > 0:
        _exit_after_clean_leave()
    return result


def _exit_after_clean_leave() -> NoReturn:
    """End a rank > 0 whose run succeeded without the interpreter's teardown.

    Rank 0 tracks and reports; the other ranks have nothing left to do once they have left the
    group. Their teardown could still fail a run that succeeded: gloo's C++ threads have aborted a
    finished rank at exit (SIGABRT, "terminate called without an active exception"), and
    ``torchrun`` then reports the whole launch failed.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(0)


def _progress_bar() -> Progress:
    """A transient bar: description, bar, done/total, time left, a status column."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        transient=True,
    )


def _run_rank0(path: Path, workspace: Path, tracking_uri: str | None, collective: Any) -> Any:
    from medseg.api import run_workflow
    from medseg.tracking.daemon import idle_seconds

    with _progress_bar() as bar:
        tasks: dict[str, Any] = {}

        def on_event(stage: str, message: str) -> None:
            if message == "running":
                gc.enable()
            mark = {"cached": "[cyan]cached[/]", "failed": "[red]failed[/]"}.get(message, message)
            console.print(f"  {stage:<10} {mark}")

        def progress(description: str, completed: float, total: float, status: str = "") -> None:
            if description not in tasks:
                tasks[description] = bar.add_task(description, total=total, status=status)
            bar.update(tasks[description], completed=completed, total=total, status=status)

        return run_workflow(
            path,
            workspace=workspace,
            tracking_uri=tracking_uri,
            on_event=on_event,
            progress=progress,
            collective=collective,
            tracking_daemon_idle_s=idle_seconds(os.environ),
        )


def metrics_table(result: Any) -> Table:
    """The run's headline metrics: a value each, or for several seeds mean ± sd and each seed's."""
    table = Table(title=f"{result.workflow}: metrics", show_header=True)
    table.add_column("metric")
    shown = (
        "eval/seg",
        "eval/det",
        "eval/op_csb",
        "eval/f1",
        "eval/pq",
        "eval/iou",
        "eval/dice",
        "eval/objects_per_case",
        "eval/reference_objects_per_case",
        "eval/n_cases",
        "eval/n_reference",
    )
    if result.repeats:  # several seeds: mean ± sd, then each seed's value
        seeds = sorted(result.repeats)
        table.add_column("mean ± sd", justify="right")
        for seed in seeds:
            table.add_column(f"seed {seed}", justify="right")
        for key in shown:
            if f"{key}_mean" in result.metrics:
                spread = f"{result.metrics[f'{key}_mean']:.4f} ± {result.metrics[f'{key}_sd']:.4f}"
                table.add_row(key, spread, *(f"{result.metrics[f'seed_{s}/{key}']:.4f}" for s in seeds))
        return table
    table.add_column("value", justify="right")
    for key in (*shown, *sorted(key for key in result.metrics if key.startswith("predict/"))):
        if key in result.metrics:
            table.add_row(key, f"{result.metrics[key]:.4f}")
    return table


def _print_result(result: Any) -> None:
    Console().print(metrics_table(result))
    if result.outputs:
        last = list(result.outputs)[-1]
        for name, path in result.outputs[last].items():
            console.print(f"output {last}.{name}: {path}", soft_wrap=True)
    executed = ", ".join(result.executed) or "none"
    console.print(f"stages executed: {executed}; cached: {', '.join(result.cached) or 'none'}")
    console.print(f"MLflow parent run {result.parent_run_id} in {_display_uri(result.tracking_uri)}")
    for warning in result.warnings:
        console.print(f"[bold yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    _print_review(result)


def _print_review(result: Any) -> None:
    """Where a reviewer sees the runs: the experiment's runs table with the ``eval/*`` columns."""
    if not result.review_link:
        return
    uri = _display_uri(result.tracking_uri)
    if uri.startswith(("http://", "https://")):
        console.print(
            f"review the runs: {uri.rstrip('/')}/{result.review_link}", soft_wrap=True, highlight=False
        )
        return
    console.print(
        "\nBrowse the runs in the MLflow UI:\n"
        f"  MLFLOW_DISABLE_TELEMETRY=true mlflow ui --backend-store-uri {uri} --port 5000\n"
        f"then open http://127.0.0.1:5000/{result.review_link}",
        soft_wrap=True,
        highlight=False,
    )


def _display_uri(uri: str) -> str:
    from medseg.tracking.mlflow import redact_uri

    return redact_uri(uri)


@app.command()
def run(
    workflow: WorkflowArgument,
    workspace: WorkspaceOption = Path(".medseg"),
    tracking_uri: TrackingOption = None,
) -> None:
    """Run a workflow: stages whose inputs and params are unchanged are reused from the cache."""
    _quiet_libraries(workspace)
    with _errors():
        result = _run_with_progress(workflow, workspace, tracking_uri)
    _print_result(result)


@app.command()
def validate(workflow: WorkflowArgument) -> None:
    """Check a workflow and its pipeline without running anything."""
    from medseg.api import validate_workflow

    with _errors():
        resolved = validate_workflow(workflow)
    stages = " → ".join(stage.name for stage in resolved.stages)
    console.print(f"[green]ok[/] {resolved.name}: pipeline {resolved.pipeline.name} ({stages})")


@app.command()
def status(workflow: WorkflowArgument, workspace: WorkspaceOption = Path(".medseg")) -> None:
    """Show, per stage, whether it is cached or will run."""
    from medseg.api import workflow_status

    with _errors():
        planned = workflow_status(workflow, workspace=workspace)
    table = Table(show_header=True)
    table.add_column("stage")
    table.add_column("state")
    table.add_column("cache key")
    for stage in planned:
        colour = "cyan" if stage.state == "cached" else "yellow"
        table.add_row(stage.name, f"[{colour}]{stage.state}[/]", (stage.key or "-")[:12])
    Console().print(table)


@app.command()
def plan(
    workflow: WorkflowArgument,
    workspace: WorkspaceOption = Path(".medseg"),
    tracking_uri: TrackingOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the plan as JSON")] = False,
) -> None:
    """Show the training plan: each planned value and whether the plan or the workflow set it.

    Builds (or reuses) the dataset the train stage reads, then plans as training will.
    """
    from medseg.api import plan_workflow

    _quiet_libraries(workspace)
    with _errors():
        plans = plan_workflow(workflow, workspace=workspace, tracking_uri=tracking_uri)
    if as_json:
        document = [
            {
                "stage": training.stage,
                "values": {
                    entry.key: {"value": entry.value, "origin": entry.origin} for entry in training.values
                },
                "facts": training.facts,
            }
            for training in plans
        ]
        typer.echo(json.dumps(document, indent=2))
        return
    for training in plans:
        table = Table(show_header=True, title=f"plan of stage '{training.stage}'")
        table.add_column("param")
        table.add_column("value")
        table.add_column("origin")
        for entry in training.values:
            colour = {"planned": "cyan", "workflow": "yellow"}.get(entry.origin, "white")
            table.add_row(entry.key, json.dumps(entry.value), f"[{colour}]{entry.origin}[/]")
        out = Console()
        out.print(table)
        facts = ", ".join(f"{key} {json.dumps(value)}" for key, value in training.facts.items())
        out.print(f"from: {facts}")


@app.command()
def demo(
    directory: Annotated[
        Path, typer.Option("--dir", help="Folder for the demo data, workflow and workspace.")
    ] = Path("medseg-demo"),
) -> None:
    """Generate a phantom cell dataset and run the demo workflow on it end to end."""
    from medseg.demo import write_phantom_ctc
    from medseg.resources import shipped_dir

    _quiet_libraries(directory / ".medseg")
    directory.mkdir(parents=True, exist_ok=True)
    write_phantom_ctc(directory / "phantom")
    workflow = directory / "demo.yaml"
    shutil.copyfile(shipped_dir("workflows") / "demo.yaml", workflow)
    workspace = directory / ".medseg"
    console.print(f"demo data and workflow written to {directory}/")
    with _errors():
        result = _run_with_progress(workflow, workspace, None)
    _print_result(result)


@app.command()
def evaluate(
    predictions: Annotated[
        Path, typer.Argument(help="Folder of predicted label images (CTC RES: mask*.tif).")
    ],
    references: Annotated[
        Path, typer.Argument(help="Folder of reference labels (CTC GT or SEG: man_seg*.tif).")
    ],
    out: Annotated[
        Path | None, typer.Option("--out", help="Write per_case.csv and summary.json here.")
    ] = None,
    surface: Annotated[
        bool, typer.Option("--surface/--no-surface", help="Compute HD95 and ASSD (mm).")
    ] = True,
) -> None:
    """Score predicted against reference masks: CTC SEG and DET, object F1/PQ, IoU/Dice, surface distances."""
    from medseg.api import evaluate_masks
    from medseg.metrics.report import write_case_table, write_summary

    _quiet_libraries()
    with _errors():
        summary, cases = evaluate_masks(predictions, references, surface=surface)
    table = Table(title=f"{len(cases)} case(s)", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in summary.as_metrics("eval").items():
        table.add_row(key, f"{value:.4f}")
    Console().print(table)
    if summary.n_det_cases:
        console.print(
            f"DET over the {summary.n_det_cases} frame(s) with markers; SEG over {summary.n_cases} "
            f"frame(s) with a reference; {summary.n_overlap_undefined} sparsely annotated frame(s) "
            "left out of IoU/Dice and object F1"
        )
    else:
        console.print("DET not computed: it needs TRA markers (a CTC *_GT folder with TRA/man_track*.tif)")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_case_table(out / "per_case.csv", cases)
        write_summary(out / "summary.json", summary)
        console.print(f"wrote {out}/per_case.csv and summary.json")


@app.command()
def ingest(
    source: Annotated[Path, typer.Argument(help="Folder tree of DICOM files.", exists=True, file_okay=False)],
    list_series: Annotated[
        bool, typer.Option("--list", help="List the image series found (headers only, no PHI).")
    ] = False,
) -> None:
    """Inspect a DICOM folder: its series, without names, IDs, dates or UIDs (hashed keys).

    Ingestion itself runs as the first stage of a workflow (``medseg run``).
    """
    from medseg.io.dicom import index_dicom

    if not list_series:
        console.print("error: use --list to list a folder's series; ingestion runs inside `medseg run`")
        raise typer.Exit(1)
    with _errors():
        index = index_dicom(source)
    table = Table(title=f"{len(index.series)} series", show_header=True)
    columns = (
        "series",
        "modality",
        "description",
        "stack",
        "slices",
        "size",
        "orientation",
        "multiframe",
        "syntax",
        "scaling",
    )
    for column in columns:
        table.add_column(column)
    for series in index.series:
        row = series.listing()
        table.add_row(*(str(row[column]) for column in columns))
    Console().print(table)
    if index.skipped:
        skipped = ", ".join(f"{count} {reason}" for reason, count in sorted(index.skipped.items()))
        console.print(f"skipped: {skipped}")


@app.command()
def predict(
    model: Annotated[
        str,
        typer.Argument(
            help="Export folder, models:/name/version, models:/name@alias, runs:/<id>/model or a run id."
        ),
    ],
    source: Annotated[
        Path,
        typer.Argument(help="Image file, DICOM series folder, or folder of images / series folders."),
    ],
    output: Annotated[Path, typer.Argument(help="Output folder (or file for a single case).")],
    output_format: Annotated[
        str, typer.Option("--format", help="nifti, dicom-seg (needs DICOM input) or tiff.")
    ] = "nifti",
    flip_tta: Annotated[
        bool | None,
        typer.Option(
            "--flip-tta/--no-flip-tta",
            help="Average predictions over mirrored copies (2^dims passes), or never; "
            "unset: as the model card's inference.mirror (chosen on validation).",
        ),
    ] = None,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:1 ...")] = "cpu",
    executor: Annotated[
        str, typer.Option("--executor", help="local (this process) or ray (a Ray cluster: medseg[ray]).")
    ] = "local",
    address: Annotated[
        str | None,
        typer.Option("--address", help="Ray: auto (ray start here), ray://host:10001; unset: a private one."),
    ] = None,
    workers: Annotated[int, typer.Option("--workers", help="Ray: workers, each loads the model once.")] = 2,
    gpus_per_worker: Annotated[
        float, typer.Option("--gpus-per-worker", help="Ray: GPUs per worker (0: CPU; > 0: on cuda).")
    ] = 0.0,
    workspace: WorkspaceOption = Path(".medseg"),
    tracking_uri: TrackingOption = None,
) -> None:
    """Segment images with a trained model; labels come back in each input's geometry."""
    import tempfile

    from pydantic import ValidationError

    from medseg.api import model_registry
    from medseg.inference.cohort import predict_cohort
    from medseg.inference.executors import ExecutorParams
    from medseg.inference.segmenter import fetch_export
    from medseg.io.cohort import OUTPUT_SUFFIX, discover_images
    from medseg.runner.workspace import Workspace

    _quiet_libraries(workspace)
    if output_format not in OUTPUT_SUFFIX:
        console.print(f"[bold red]error:[/] --format must be one of {', '.join(OUTPUT_SUFFIX)}")
        raise typer.Exit(1)
    try:
        where = ExecutorParams(
            kind=executor,
            address=address,
            workers=workers,
            gpus_per_worker=gpus_per_worker,  # type: ignore[arg-type]
        )
    except ValidationError as exc:
        problem = exc.errors()[0]
        option = "-".join(map(str, problem["loc"])).replace("_", "-").replace("kind", "executor")
        console.print(f"[bold red]error:[/] --{option}: {problem['msg']}")
        raise typer.Exit(1) from None
    with _errors(), tempfile.TemporaryDirectory(prefix="medseg-model-") as fetched:
        uri = tracking_uri or Workspace(workspace).default_tracking_uri
        export = fetch_export(model, model_registry(uri), Path(fetched))
        cases = discover_images(source)
        with _progress_bar() as bar:
            task = bar.add_task("predict", total=len(cases), status="")

            def progress(description: str, completed: float, total: float, status: str = "") -> None:
                bar.update(task, completed=completed, status=status)

            results = predict_cohort(
                export,
                cases,
                output,
                output_format,
                device=device,
                flip_tta=flip_tta,
                executor=where,
                progress=progress,
            )
    table = Table(title=f"{len(results)} case(s) → {output}", show_header=True)
    for column in ("case", "objects", "voxels", "volume (ml)", "written"):
        table.add_column(column)
    for item in results:
        written = item.path.name if item.path else f"[red]failed:[/] {item.error}"
        table.add_row(item.name, str(item.objects), str(item.voxels), f"{item.volume_ml:.2f}", written)
    Console().print(table)
    failed = [item.name for item in results if item.error]
    if failed:
        console.print(
            f"[bold red]error:[/] {len(failed)} of {len(results)} case(s) failed: {', '.join(failed)}"
        )
        raise typer.Exit(1)


@app.command()
def plugins() -> None:
    """List the stages, nets, losses, optimisers and layouts installed packages add."""
    from medseg.api import installed_plugins

    logging.getLogger("medseg.plugins").setLevel(logging.ERROR)  # the table shows the broken ones
    found = installed_plugins()
    if not found.entries and not found.broken:
        console.print("no medseg plugins installed (entry-point groups medseg.stages, medseg.nets, ...)")
        return
    table = Table(show_header=True)
    for column in ("group", "name", "package", "version"):
        table.add_column(column)
    for origin in found.entries:
        table.add_row(origin.group, origin.name, origin.package, origin.version)
    Console().print(table)
    for broken in found.broken:
        console.print(f"[red]broken[/]: {broken.origin}: {broken.reason}", soft_wrap=True, markup=True)


@orthanc_app.command("configure")
def orthanc_configure(config: ConfigArgument) -> None:
    """Check the configuration, publish its rules to the queue, print Orthanc's settings (JSON)."""
    import json
    import sys

    import medseg.orthanc
    from medseg.orthanc.config import load_config

    with _errors():
        settings = load_config(config)
    queue = settings.open_queue()
    snippet = {
        "Plugins": [str(ORTHANC_PYTHON)],
        "PythonScript": str(Path(medseg.orthanc.__file__).with_name("plugin.py")),
        "StableAge": 60,
        "Medseg": {"Queue": str(queue.root)},
    }
    sys.stdout.write(json.dumps(snippet, indent=2) + "\n")
    console.print(
        f"{len(settings.rules)} rule(s) published to {queue.root}; merge the JSON above into Orthanc's "
        "configuration (with its DICOMweb plugin enabled), restart Orthanc, then run "
        f"`medseg orthanc worker {config}`",
        highlight=False,
    )


@orthanc_app.command("worker")
def orthanc_worker(
    config: ConfigArgument,
    once: Annotated[bool, typer.Option("--once", help="Process the jobs due now, then exit.")] = False,
) -> None:
    """Segment queued series and store DICOM SEG back into Orthanc (SIGTERM: finish the job, exit)."""
    import signal

    from medseg.orthanc.config import load_config
    from medseg.orthanc.worker import Worker

    _quiet_libraries()
    with _errors():
        settings = load_config(config)
        worker = Worker(settings, notify=lambda line: console.print(line, highlight=False, soft_wrap=True))
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: worker.stop())
    console.print(f"medseg worker: queue {settings.queue}, {len(settings.rules)} rule(s)", highlight=False)
    gc.enable()
    processed = worker.run(once=once)
    console.print(f"medseg worker: stopped after {processed} job(s)", highlight=False)


@orthanc_app.command("jobs")
def orthanc_jobs(config: ConfigArgument) -> None:
    """Show the queue: jobs per state, and why failed or retrying jobs failed."""
    from medseg.orthanc.config import load_config
    from medseg.orthanc.jobqueue import JobQueue, read_json

    with _errors():
        settings = load_config(config)
    queue = JobQueue(settings.queue).create()
    Console().print(" ".join(f"{state}: {count}" for state, count in queue.counts().items()))
    table = Table(show_header=True)
    for column in ("job", "state", "rule", "attempts", "last error"):
        table.add_column(column)
    for state in ("pending", "failed"):
        for path in sorted(queue.folder(state).glob("*.json")):
            job = read_json(path)
            if job.get("error"):
                table.add_row(job["job"], state, job["rule"], str(job.get("attempts", 0)), job["error"])
    if table.row_count:
        Console().print(table)


@cache_app.command("gc")
def cache_gc(
    keep: Annotated[list[Path] | None, typer.Argument(help="Workflows whose cached stages to keep.")] = None,
    workspace: WorkspaceOption = Path(".medseg"),
) -> None:
    """Delete cache entries not used by the given workflows (and leftover temp and checkpoint folders)."""
    from medseg.api import workflow_status
    from medseg.runner.workspace import Workspace

    with _errors():
        keys = {
            stage.key
            for path in keep or []
            for stage in workflow_status(path, workspace=workspace)
            if stage.key
        }
        removed = Workspace(workspace).collect_garbage(keys)
    entries = removed.cache_entries
    console.print(f"removed {entries} cache entr{'y' if entries == 1 else 'ies'}; kept {len(keys)}")
    if removed.scratch_folders:
        console.print(f"removed {removed.scratch_folders} unfinished run checkpoint folder(s) from scratch/")


@tracking_app.command("sync")
def tracking_sync(
    workspace: WorkspaceOption = Path(".medseg"),
    tracking_uri: Annotated[
        str | None,
        typer.Option("--tracking-uri", help="Send to this server instead of the one each journal recorded."),
    ] = None,
) -> None:
    """Send the metrics, tags and run ends journalled while a tracking server was away."""
    from medseg.api import sync_tracking

    _quiet_libraries(workspace)
    with _errors():
        sent = sync_tracking(workspace=workspace, tracking_uri=tracking_uri)
    console.print(f"sent {sent} journal{'s' if sent != 1 else ''}" if sent else "nothing to send")


def main() -> None:
    """Console-script entry point.

    Start-up (MLflow, SQLAlchemy) allocates about a million objects; cyclic garbage
    collection passes over them and the final collection at exit cost about a second, more
    than a fully cached rerun does. So collection is paused until a stage actually runs
    (``on_event("running")`` resumes it) and the survivors are frozen at exit.
    """
    gc.disable()
    try:
        app()
    finally:
        gc.freeze()


if __name__ == "__main__":
    main()
