"""The medseg worker behind the Orthanc plugin: takes queued series, segments them, stores DICOM SEG back.

Each job runs the shipped ``pacs_predict`` pipeline for one series (fetch through DICOMweb →
ingest → predict → DICOM SEG → store), so it is one tracked MLflow run (named
``autoseg-<rule>-<job>``, stages nested) with the pipeline's privacy rules: no UIDs, names or
paths reach tracking. A job that fails goes back to the queue after a doubling back-off and
is reported in Orthanc's log (and as a FAILED run); after the configured attempts it moves to
``failed/``. Other jobs go on meanwhile. A job whose worker was killed is taken up again by the
next worker start (its finished stages are cache hits), and storing a SEG twice is harmless
(its UIDs are derived from the source and the model).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from medseg.api import model_registry, run_workflow
from medseg.errors import MedsegError
from medseg.io.dicomweb import checked_credentials
from medseg.orthanc.config import AutosegConfig, RouteRule
from medseg.runner.workspace import Workspace

Notify = Callable[[str], None]


class Worker:
    """Processes the jobs of ``config.queue`` one at a time (several workers may share a queue).

    Args:
        config: the checked configuration (``load_config``).
        environ: where Orthanc credentials are read (default: ``os.environ``).
        notify: called with one line per job event (the CLI prints them).

    """

    def __init__(
        self, config: AutosegConfig, *, environ: Mapping[str, str] | None = None, notify: Notify | None = None
    ) -> None:
        self.config = config
        self.environ = os.environ if environ is None else environ
        self.notify = notify or (lambda line: None)
        self.queue = config.open_queue()
        self.stopping = False

    def run(self, *, once: bool = False) -> int:
        """Process jobs until ``stop()`` (or, with ``once``, until none is due); return how many ran."""
        processed = 0
        while not self.stopping:
            self.recover()
            job = self.queue.claim()
            if job is not None:
                self.process(job)
                processed += 1
                continue
            if once:
                break
            deadline = time.monotonic() + self.config.poll_s
            while not self.stopping and time.monotonic() < deadline:
                time.sleep(0.1)
        return processed

    def stop(self) -> None:
        """Finish the current job, then return from ``run``."""
        self.stopping = True

    def recover(self) -> None:
        """Put back the jobs of workers that died (an attempt each, no back-off)."""
        for job in self.queue.orphans(self.config.lease_s):
            reason = "the worker processing it stopped (killed or crashed)"
            state = self.queue.retry_or_fail(
                job, reason, attempts=self.config.retry.attempts, backoff_s=0.0, max_backoff_s=0.0
            )
            self._report(job["job"], "failed" if state == "failed" else "requeued", reason)

    def process(self, job: dict[str, Any]) -> None:
        """Segment one claimed job's series and store the SEG; requeue or fail it on error."""
        name = job["job"]
        rule = self.config.rule(job["rule"])
        started = time.monotonic()
        self.notify(f"job {name}: segmenting (rule {job['rule']}, attempt {int(job.get('attempts', 0)) + 1})")
        try:
            if rule is None:
                raise MedsegError(
                    f"rule '{job['rule']}' is no longer configured; add it back or drop the job"
                )
            result = self.segment(job, rule)
        except Exception as error:  # one bad series must not stop the others
            message = " ".join(str(error).split()) or type(error).__name__
            retry = self.config.retry
            state = self.queue.retry_or_fail(
                job,
                message,
                attempts=retry.attempts,
                backoff_s=retry.backoff_s,
                max_backoff_s=retry.max_backoff_s,
            )
            status = "failed" if state == "failed" else "retrying"
            self.notify(f"job {name}: {status}: {message}")
            self._report(name, status, message)
            return
        result["seconds"] = round(time.monotonic() - started, 2)
        self.queue.finish(job, result)
        line = f"SEG stored in {result['seconds']:.1f} s (MLflow run {result['run_id']})"
        self.notify(f"job {name}: done: {line}")
        self._report(name, "done", line)

    def segment(self, job: dict[str, Any], rule: RouteRule) -> dict[str, Any]:
        """Run ``pacs_predict`` for the job's series with the rule's model; the run's summary."""
        scratch = Path(tempfile.mkdtemp(prefix=f"job-{job['job']}-", dir=self.queue.root))
        try:
            model = self._model(rule, scratch)
            endpoint = self.config.orthanc.endpoint().model_dump(mode="json")
            workflow = {
                "pipeline": "pacs_predict",
                "name": f"autoseg-{rule.name}-{job['job']}",
                "inputs": {"model": str(model)},
                "params": {
                    "fetch": {"endpoint": endpoint, "query": {"series_uid": job["series_uid"]}},
                    "store": {"endpoint": endpoint},
                },
                "tracking": {"experiment": self.config.tracking.experiment},
            }
            path = scratch / "workflow.yaml"
            path.write_text(yaml.safe_dump(workflow))
            result = run_workflow(
                path, workspace=self.config.workspace, tracking_uri=self.config.tracking.uri
            )
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return {
            "run_id": result.parent_run_id,
            "stored": int(result.metrics.get("store/instances", 0)),
            "cached": result.cached,
        }

    def _model(self, rule: RouteRule, scratch: Path) -> Path:
        """The rule's export folder; a registry model is downloaded for this job (aliases move)."""
        if not rule.model.startswith(("models:/", "runs:/")):
            return Path(rule.model)
        uri = self.config.tracking.uri or Workspace(self.config.workspace).default_tracking_uri
        destination = scratch / "model"
        destination.mkdir()
        return model_registry(uri)(rule.model, destination)

    def _report(self, job: str, status: str, message: str) -> None:
        """Tell Orthanc (its log) how a job went; a PACS that is down only loses the log line."""
        import requests

        url = f"{self.config.orthanc.url}/medseg/jobs/{job}/report"
        try:
            auth = checked_credentials(self.config.orthanc.url, "Orthanc", self.environ)
            response = requests.post(
                url, data=json.dumps({"status": status, "message": message}), auth=auth, timeout=10
            )
            response.raise_for_status()
        except (requests.RequestException, MedsegError) as error:
            self.notify(f"job {job}: could not report to Orthanc ({type(error).__name__})")
