"""Where a cohort's cases are segmented: in this process (default) or on a Ray cluster.

Both executors run the same per-case code (``segment_case``) and hand every case's labels back
to the caller's ``on_done`` on the driver, which writes them; caching and tracking stay with the
driver. On Ray, each worker is an actor that loads the export once (weights-only, from its
card) and keeps it; a case's files travel to the worker through Ray's object store under
pseudonymous names (``image.nii.gz``, ``000001.dcm``...), so no shared file system is needed and
nothing but the case id (``case_0003``) appears in task names, Ray's dashboard or its logs. A
worker that dies is restarted and its cases retried (``retries``); a case still failing is
reported by its id and the others finish.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from medseg.errors import ConfigError, DataError
from medseg.params import OUTSIDE_CACHE_KEY, Params

if TYPE_CHECKING:
    from medseg.inference.segmenter import Segmenter
    from medseg.io.volume import Volume

IN_FLIGHT_PER_WORKER = 2
"""Cases queued on each Ray worker: the next case's transfer overlaps the current one's compute."""


class ExecutorParams(Params):
    """Where cases are segmented: ``local`` (this process) or ``ray`` (a Ray cluster, ``medseg[ray]``).

    ``address`` (ray): ``None`` starts a private Ray instance on this machine for the run;
    ``auto`` joins the cluster that ``ray start`` runs here; ``ray://host:10001`` connects
    through Ray Client. ``workers`` actors each take ``cpus_per_worker`` CPUs (their torch
    threads) and ``gpus_per_worker`` GPUs (then they segment on ``cuda``). A worker that dies
    is restarted and its cases retried ``retries`` times. Outputs are identical whichever
    executor runs, so the executor is not part of a stage's cache key.
    """

    kind: Literal["local", "ray"] = "local"
    address: str | None = None
    workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    retries: int = Field(1, ge=0)


def executor_field() -> Any:
    """A stage's ``executor`` param: logged with the run, outside the cache key."""
    return Field(default_factory=ExecutorParams, json_schema_extra=OUTSIDE_CACHE_KEY)


@dataclass(frozen=True)
class CaseJob:
    """One case to segment: ``source`` (an image file or a DICOM series folder) on the driver.

    ``case_id`` is pseudonymous: it is the only name a Ray cluster sees. ``reference_series``
    reads the folder's one DICOM series, as a DICOM SEG that references it needs.
    """

    case_id: str
    source: Path
    reference_series: bool = False


@dataclass(frozen=True)
class CaseOutcome:
    """A segmented case: its int32 instance labels ``(1, *spatial)`` in the source geometry, or why not."""

    case_id: str
    labels: Volume | None = None
    error: str | None = None


def segment_case(
    segmenter: Segmenter, source: Path, *, reference_series: bool, flip_tta: bool | None
) -> Volume:
    """The labels of the case in ``source`` (image file or DICOM series folder); both executors call this.

    Raises:
        DataError: the case cannot be read or does not fit the model.

    """
    from medseg.io.dicom import find_series, read_series

    series = find_series(source) if reference_series and source.is_dir() else None
    return segmenter.predict(read_series(series) if series else source, flip_tta=flip_tta)


def segment_cases(
    model: Path | Segmenter,
    jobs: list[CaseJob],
    executor: ExecutorParams,
    on_done: Callable[[CaseOutcome], None],
    *,
    device: str = "cpu",
    flip_tta: bool | None = None,
) -> None:
    """Segment every job with ``model``; ``on_done`` gets each outcome on the driver.

    ``model`` is an export folder, or (in this process only) a loaded ``Segmenter``.

    Outcomes arrive in job order in this process, in completion order on Ray. A case that
    raises ``DataError`` (or whose Ray worker died ``retries + 1`` times) comes back with its
    ``error``; any other exception stops the run.

    Raises:
        ConfigError: Ray is asked for but not installed, the cluster cannot be reached, or
            ``model`` is not an export folder.

    """
    from medseg.inference.segmenter import Segmenter

    if executor.kind == "ray":
        if isinstance(model, Segmenter):
            raise ConfigError("the Ray executor loads the model from an export folder; pass its path")
        _segment_on_ray(model, jobs, executor, on_done, device=device, flip_tta=flip_tta)
        return
    segmenter = model if isinstance(model, Segmenter) else Segmenter.from_export(model, device=device)
    for job in jobs:
        try:
            labels = segment_case(
                segmenter, job.source, reference_series=job.reference_series, flip_tta=flip_tta
            )
        except DataError as exc:
            on_done(CaseOutcome(job.case_id, error=str(exc)))
        else:
            on_done(CaseOutcome(job.case_id, labels))


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ConfigError(
            "executor 'ray' needs Ray: pip install 'medseg[ray]' (on the driver and every cluster node)"
        ) from exc
    return ray


def case_files(job: CaseJob) -> dict[str, bytes]:
    """The files of ``job`` under pseudonymous names: ``image<suffix>``, or ``000001.dcm``... for a folder."""
    from medseg.io.readers import image_suffix

    if job.source.is_file():
        return {f"image{image_suffix(job.source)}": job.source.read_bytes()}
    files = sorted(path for path in job.source.rglob("*") if path.is_file())
    return {f"{number:06d}.dcm": path.read_bytes() for number, path in enumerate(files, start=1)}


class CaseWorker:
    """A Ray actor's state: one ``Segmenter`` loaded from the export's files, kept for every case.

    The model comes as ``[object ref of {file name: bytes}]`` (``EXPORT_FILES``) with each call,
    wrapped in a list so that Ray passes the reference, not the bytes; it is loaded on the first
    call, and again by a restarted worker. (Constructor arguments would not survive a restart.)
    """

    def __init__(self, device: str, threads: int, medseg_version: str) -> None:
        import torch

        from medseg._version import __version__

        if medseg_version != __version__:
            raise ConfigError(
                f"this Ray worker has medseg {__version__}, the driver {medseg_version}; install the "
                "same medseg on every node"
            )
        torch.set_num_threads(threads)
        self.device = device
        self.segmenter: Segmenter | None = None

    def load(self, export: list[Any]) -> int:
        """Load the model (once); return this worker's process id (to watch or stop it)."""
        self._segmenter(export)
        return os.getpid()

    def _segmenter(self, export: list[Any]) -> Segmenter:
        import ray

        from medseg.inference.segmenter import Segmenter

        if self.segmenter is None:
            folder = Path(tempfile.mkdtemp(prefix="medseg-model-"))
            try:
                for name, content in ray.get(export[0]).items():
                    (folder / name).write_bytes(content)
                self.segmenter = Segmenter.from_export(folder, device=self.device)
            finally:
                shutil.rmtree(folder)
        return self.segmenter

    def segment(
        self,
        export: list[Any],
        case_id: str,
        files: dict[str, bytes],
        reference_series: bool,
        flip_tta: bool | None,
    ) -> CaseOutcome:
        """Segment case ``case_id`` from its ``files`` (``case_files``), put in a private temporary folder."""
        segmenter = self._segmenter(export)
        with tempfile.TemporaryDirectory(prefix="medseg-case-") as name:
            folder = Path(name)
            for file_name, content in files.items():
                (folder / file_name).write_bytes(content)
            first = next(iter(files))
            source = folder / first if first.startswith("image") else folder
            try:
                labels = segment_case(segmenter, source, reference_series=reference_series, flip_tta=flip_tta)
            except DataError as exc:
                return CaseOutcome(case_id, error=str(exc).replace(name, "<case>"))
        return CaseOutcome(case_id, labels)


def _segment_on_ray(
    export: Path,
    jobs: list[CaseJob],
    executor: ExecutorParams,
    on_done: Callable[[CaseOutcome], None],
    *,
    device: str,
    flip_tta: bool | None,
) -> None:
    from medseg._version import __version__
    from medseg.inference.segmenter import EXPORT_FILES

    ray = _import_ray()
    started = not ray.is_initialized()
    if started:
        options: dict[str, Any] = {"namespace": "medseg", "log_to_driver": False, "configure_logging": False}
        if executor.address is None:
            options["include_dashboard"] = False
        try:
            ray.init(address=executor.address, **options)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ConfigError(
                f"cannot reach the Ray cluster at '{executor.address}' ({type(exc).__name__}); start it "
                "(ray start --head) or fix executor.address"
            ) from exc
    try:
        _check_fits(ray.cluster_resources(), executor)
    except ConfigError:
        if started:
            ray.shutdown()
        raise
    worker_device = "cuda" if executor.gpus_per_worker > 0 else device
    remote = ray.remote(CaseWorker).options(
        num_cpus=executor.cpus_per_worker,
        num_gpus=executor.gpus_per_worker,
        max_restarts=executor.retries,
        max_task_retries=executor.retries,
    )
    model = ray.put({name: (export / name).read_bytes() for name in EXPORT_FILES})
    threads = max(1, int(executor.cpus_per_worker))
    actors = [remote.remote(worker_device, threads, __version__) for _ in range(executor.workers)]
    pending = deque(jobs)
    running: dict[Any, tuple[Any, CaseJob]] = {}

    def submit(actor: Any) -> None:
        job = pending.popleft()
        call = actor.segment.options(name=f"segment {job.case_id}")
        files = case_files(job)
        running[call.remote([model], job.case_id, files, job.reference_series, flip_tta)] = (actor, job)

    try:
        try:
            ray.get([actor.load.remote([model]) for actor in actors])
        except ray.exceptions.RayActorError as exc:
            cause = [line for line in str(exc).splitlines() if "Error" in line][-1:] or ["unknown cause"]
            raise ConfigError(f"the Ray workers could not start: {cause[0].strip()}") from None
        for actor in actors:
            for _ in range(IN_FLIGHT_PER_WORKER):
                if pending:
                    submit(actor)
        while running:
            (ready,), _ = ray.wait(list(running), num_returns=1)
            actor, job = running.pop(ready)
            try:
                outcome = ray.get(ready)
            except ray.exceptions.RayActorError as exc:
                reason = "died" if isinstance(exc, ray.exceptions.ActorDiedError) else "was lost"
                error = f"its Ray worker {reason} {executor.retries + 1} time(s) while segmenting it"
                outcome = CaseOutcome(job.case_id, error=error)
                actors = [other for other in actors if other is not actor]
            except ray.exceptions.RayTaskError as exc:
                raise exc.as_instanceof_cause() from None
            on_done(outcome)
            if pending and any(other is actor for other in actors):
                submit(actor)
            elif pending and not running:
                for job in pending:
                    on_done(CaseOutcome(job.case_id, error="no Ray worker left to segment it"))
                pending.clear()
    finally:
        for actor in actors:
            ray.kill(actor)
        if started:
            ray.shutdown()


def _check_fits(resources: dict[str, float], executor: ExecutorParams) -> None:
    """Refuse workers the cluster's nodes cannot all hold at once (they would wait for ever).

    Raises:
        ConfigError: naming what the cluster offers and what the workers need.

    """
    for name, each in (("CPU", executor.cpus_per_worker), ("GPU", executor.gpus_per_worker)):
        offered = float(resources.get(name, 0.0))
        if executor.workers * each > offered:
            raise ConfigError(
                f"the Ray cluster offers {offered:g} {name}s; {executor.workers} worker(s) × {each:g} {name} "
                f"need {executor.workers * each:g}: lower executor.workers (--workers) or the {name}s per "
                "worker, or add nodes"
            )
