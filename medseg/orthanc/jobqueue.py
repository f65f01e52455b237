"""The durable job queue between Orthanc and the medseg worker: JSON files in four folders.

Standard library only: Orthanc's embedded Python imports this file from beside ``plugin.py``
(medseg is not installed there), and the worker imports it as ``medseg.orthanc.jobqueue``.

A queue is a folder::

    rules.json          routing rules the worker compiled from its YAML (read by the plugin)
    pending/<job>.json  waiting; ``not_before`` (epoch s) delays a retry
    running/<job>.json  claimed by a worker (``owner``: host, pid, since)
    done/<job>.json     finished (``result``)
    failed/<job>.json   gave up after the configured attempts (``error``)

Every write is a temporary file renamed into place, and a job moves between folders by
``os.rename`` (atomic on one file system), so a crash of Orthanc or of a worker leaves each job
in exactly one folder, whole. A job's id is derived from the Orthanc series id and the rule, so
a series announced twice is queued once. Job files hold the series' UIDs; they stay on this
machine (like a workspace's private map) and never reach tracking.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

FOLDERS = ("pending", "running", "done", "failed")
RULES_FILE = "rules.json"
CLAIM_GRACE_S = 2.0  # a live claimer writes its owner well within this after the rename


def write_json(path: Path, document: dict[str, Any]) -> None:
    """Write ``document`` to ``path`` atomically (temporary file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "w") as handle:
        json.dump(document, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def read_json(path: Path) -> dict[str, Any]:
    """The JSON document at ``path``."""
    with open(path) as handle:
        return dict(json.load(handle))


def job_id(series: str, rule: str) -> str:
    """The job id of Orthanc series ``series`` routed by ``rule`` (16 hex digits, not reversible)."""
    return hashlib.sha256(f"{series}\n{rule}".encode()).hexdigest()[:16]


def matching_rule(rules: list[dict[str, Any]], tags: dict[str, str]) -> dict[str, Any] | None:
    """The first rule whose criteria all hold for a series' DICOM ``tags``, or ``None``.

    A rule may give ``modality`` (equal, case-insensitive), ``description`` (a regular
    expression searched in SeriesDescription, case-insensitive) and ``body_part`` (equal to
    BodyPartExamined, case-insensitive); criteria it leaves out match anything.
    """
    for rule in rules:
        if rule.get("modality") and tags.get("Modality", "").upper() != rule["modality"].upper():
            continue
        if rule.get("description") and not re.search(
            rule["description"], tags.get("SeriesDescription", ""), re.IGNORECASE
        ):
            continue
        if rule.get("body_part") and tags.get("BodyPartExamined", "").upper() != rule["body_part"].upper():
            continue
        return rule
    return None


class JobQueue:
    """The queue folder ``root`` (see the module docstring for its layout)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def folder(self, state: str) -> Path:
        """The folder of jobs in ``state`` (pending, running, done, failed)."""
        return self.root / state

    def rules(self) -> list[dict[str, Any]]:
        """The routing rules the worker published (empty before any worker configured the queue)."""
        path = self.root / RULES_FILE
        return list(read_json(path)["rules"]) if path.is_file() else []

    def publish_rules(self, rules: list[dict[str, Any]]) -> None:
        """Replace the routing rules the plugin reads."""
        write_json(self.root / RULES_FILE, {"rules": rules})

    def state(self, job: str) -> str | None:
        """The folder job ``job`` is in, or ``None``."""
        for state in FOLDERS:
            if (self.folder(state) / f"{job}.json").is_file():
                return state
        return None

    def enqueue(self, series: str, rule: str, tags: dict[str, str]) -> tuple[str, bool]:
        """Queue series ``series`` for ``rule``; return (job id, whether it was queued now).

        A job already pending or running is left as it is; a finished or failed one is queued
        again (the series changed since: Orthanc announces a stable series once per change).
        """
        job = job_id(series, rule)
        state = self.state(job)
        if state in ("pending", "running"):
            return job, False
        document = {
            "job": job,
            "series": series,
            "series_uid": tags.get("SeriesInstanceUID", ""),
            "study_uid": tags.get("StudyInstanceUID", ""),
            "rule": rule,
            "queued": time.time(),
            "attempts": 0,
            "not_before": 0.0,
        }
        target = self.folder("pending") / f"{job}.json"
        if state is None:
            write_json(target, document)
        else:  # rewrite in place, then one rename: the job is never in two folders
            previous = self.folder(state) / f"{job}.json"
            write_json(previous, document)
            os.replace(previous, target)
        return job, True

    def claim(self, now: float | None = None) -> dict[str, Any] | None:
        """Move the oldest due pending job to ``running/`` for this process and return it."""
        now = time.time() if now is None else now
        due = []
        for path in self.folder("pending").glob("*.json"):
            try:
                document = read_json(path)
            except (OSError, ValueError):
                continue  # being replaced right now
            if document.get("not_before", 0.0) <= now:
                due.append((document.get("queued", 0.0), path))
        for _queued, path in sorted(due):
            target = self.folder("running") / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(path, target)
            except FileNotFoundError:
                continue  # another worker claimed it first
            document = read_json(target)
            document["owner"] = {"host": socket.gethostname(), "pid": os.getpid(), "since": now}
            write_json(target, document)
            return document
        return None

    def finish(self, document: dict[str, Any], result: dict[str, Any]) -> None:
        """Move a running job to ``done/`` with its ``result``."""
        self._move(document, "done", result=result, finished=time.time())

    def retry_or_fail(
        self, document: dict[str, Any], error: str, *, attempts: int, backoff_s: float, max_backoff_s: float
    ) -> str:
        """Count a failed attempt; back to ``pending/`` after a back-off, or ``failed/`` when spent.

        The n-th retry waits ``min(backoff_s · 2^(n-1), max_backoff_s)`` seconds. Returns the
        job's new state.
        """
        tried = int(document.get("attempts", 0)) + 1
        if tried >= attempts:
            self._move(document, "failed", attempts=tried, error=error, finished=time.time())
            return "failed"
        delay = min(backoff_s * 2 ** (tried - 1), max_backoff_s)
        self._move(document, "pending", attempts=tried, error=error, not_before=time.time() + delay)
        return "pending"

    def orphans(self, lease_s: float, now: float | None = None) -> list[dict[str, Any]]:
        """Running jobs whose worker is gone: a dead process on this host, or an expired lease.

        A claim renames the job into ``running/`` and then writes its owner; a worker killed
        between the two leaves a job with no owner. Such a job is an orphan once it has gone
        ``CLAIM_GRACE_S`` seconds (since the rename) without one; a younger one is waited for.
        """
        now = time.time() if now is None else now
        host = socket.gethostname()
        found = []
        for path in self.folder("running").glob("*.json"):
            try:
                document = read_json(path)
                if "owner" not in document:
                    time.sleep(max(0.0, CLAIM_GRACE_S - (time.time() - path.stat().st_ctime)))
                    document = read_json(path)
            except (OSError, ValueError):
                continue
            owner = document.get("owner")
            if owner is None:
                found.append(document)
            elif owner.get("host") == host and owner.get("pid") != os.getpid():
                if not _alive(int(owner.get("pid", 0))):
                    found.append(document)
            elif now - float(owner.get("since", now)) > lease_s:
                found.append(document)
        return found

    def counts(self) -> dict[str, int]:
        """How many jobs are in each state."""
        return {state: len(list(self.folder(state).glob("*.json"))) for state in FOLDERS}

    def create(self) -> JobQueue:
        """Make the queue's folders (idempotent) and return the queue."""
        for state in FOLDERS:
            self.folder(state).mkdir(parents=True, exist_ok=True)
        return self

    def _move(self, document: dict[str, Any], state: str, **updates: Any) -> None:
        """Rewrite a running job in place, then rename it into ``state`` (one atomic step)."""
        source = self.folder("running") / f"{document['job']}.json"
        moved = {key: value for key, value in document.items() if key != "owner"}
        moved.update(updates)
        write_json(source, moved)
        os.replace(source, self.folder(state) / source.name)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
