"""Orthanc Python plugin: queue every stable series that matches a routing rule for the medseg worker.

Runs inside Orthanc (Debian package ``orthanc-python``; ``"PythonScript"`` names this file) with
Orthanc's own Python and the standard library only: it never imports medseg or torch, so a
segmentation can neither slow nor crash the archive. ``medseg orthanc configure`` prints the
Orthanc configuration that loads it; the queue folder comes from the ``Medseg.Queue`` setting.

- On ``STABLE_SERIES`` it reads the series' shared tags, picks the first matching rule of
  ``<queue>/rules.json`` (written by the worker from its YAML) and writes a job file; a series
  that matches no rule is left alone (logged at info level).
- ``POST /medseg/jobs/<job>/report`` (called by the worker with the Orthanc credentials) writes
  the job's outcome into Orthanc's log: a failure as an error, so it shows where PACS
  administrators look.
- ``GET /medseg/jobs`` answers the number of jobs in each state.
"""

import json
from pathlib import Path

import orthanc  # provided by Orthanc's Python plugin
from jobqueue import JobQueue, matching_rule  # beside this file: Orthanc puts its folder on sys.path

_SETTINGS = json.loads(orthanc.GetConfiguration()).get("Medseg", {})
QUEUE = JobQueue(Path(_SETTINGS.get("Queue", "/var/lib/medseg/queue"))).create()


def on_change(change_type: int, level: int, resource: str) -> None:
    """Queue a stable series that matches a rule."""
    del level
    if change_type != orthanc.ChangeType.STABLE_SERIES:
        return
    try:
        tags = json.loads(orthanc.RestApiGet(f"/series/{resource}/shared-tags?simplify"))
        tags = {key: value for key, value in tags.items() if isinstance(value, str)}
        matched = matching_rule(QUEUE.rules(), tags)
        if matched is None:
            orthanc.LogInfo(f"medseg: series {resource} matches no routing rule; left alone")
            return
        rule = str(matched["name"])
        job, queued = QUEUE.enqueue(resource, rule, tags)
        if queued:
            orthanc.LogWarning(f"medseg: queued job {job} for series {resource} (rule {rule})")
    except Exception as error:  # a plugin must never take Orthanc down; say what went wrong
        orthanc.LogError(f"medseg: could not queue series {resource}: {type(error).__name__}: {error}")


def on_report(output: object, uri: str, **request: object) -> None:
    """Log a job outcome the worker reports (``{"status", "message"}``) in Orthanc's log."""
    del uri
    if request.get("method") != "POST":
        output.SendMethodNotAllowed("POST")
        return
    job = request["groups"][0]
    report = json.loads(request.get("body") or b"{}")
    line = f"medseg: job {job}: {report.get('status', '?')}: {report.get('message', '')}"
    if report.get("status") in ("failed", "retrying"):
        orthanc.LogError(line)
    else:
        orthanc.LogWarning(line)
    output.AnswerBuffer(json.dumps({"logged": True}), "application/json")


def on_jobs(output: object, uri: str, **request: object) -> None:
    """Answer the number of jobs in each state."""
    del uri, request
    output.AnswerBuffer(json.dumps(QUEUE.counts()), "application/json")


orthanc.RegisterOnChangeCallback(on_change)
orthanc.RegisterRestCallback("/medseg/jobs/([0-9a-f]+)/report", on_report)
orthanc.RegisterRestCallback("/medseg/jobs", on_jobs)
orthanc.LogWarning(f"medseg: plugin loaded; queue {QUEUE.root}")
