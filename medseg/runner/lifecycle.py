"""Run lifecycle: runs of a killed ``medseg run`` are found, closed as KILLED and resumed in place.

While a workflow runs, ``<workspace>/leases/<parent run id>.json`` records the process (pid,
host) and the tracking runs it opened (parent, and each executing stage's run by cache key).
A clean end — success or failure — removes it. A process killed with SIGKILL cannot, so the
next ``medseg run`` in the workspace finds leases whose process is gone (same host, pid not
alive) and, through the tracker:

- marks every run of the dead process KILLED, tagged ``medseg.resumed_by=<new parent run>``;
- hands back the stage runs by cache key, so that a stage that resumes from its checkpoint
  (training) reopens *its* run under the new parent and keeps logging there: one run per
  stage with a continuous history, as nnU-Net's MLflow logger keeps its run across resumes.

Leases of another host (a workspace on a shared filesystem) are left alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from medseg.errors import TrackingError
from medseg.tracking.base import Tracker


@dataclass
class Lease:
    """What one live workflow run has opened in tracking."""

    path: Path
    pid: int
    host: str
    parent: str
    store: str
    stages: dict[str, str] = field(default_factory=dict)

    def save(self) -> None:
        """Write the lease (atomically: a reader never sees half of it)."""
        document = {
            "pid": self.pid,
            "host": self.host,
            "parent": self.parent,
            "store": self.store,
            "stages": self.stages,
        }
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps(document))
        partial.replace(self.path)

    def add_stage(self, key: str, run_id: str) -> None:
        """Record the run of a stage execution with cache key ``key``."""
        self.stages[key] = run_id
        self.save()

    def end_stage(self, key: str) -> None:
        """The stage's run ended cleanly: nothing of it is left to reclaim."""
        self.stages.pop(key, None)
        self.save()

    def close(self) -> None:
        """The workflow run ended cleanly: forget the lease."""
        self.path.unlink(missing_ok=True)


def open_lease(folder: Path, parent: str, store: str) -> Lease:
    """A lease for this process's workflow run with parent run ``parent`` in tracking store ``store``."""
    folder.mkdir(parents=True, exist_ok=True)
    lease = Lease(folder / f"{parent}.json", os.getpid(), socket.gethostname(), parent, store)
    lease.save()
    return lease


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def stale_leases(folder: Path, store: str) -> list[Lease]:
    """Leases of this host and tracking store whose process is gone."""
    found = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            document = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        lease = Lease(
            path, int(document["pid"]), str(document["host"]), str(document["parent"]), str(document["store"])
        )
        lease.stages = dict(document.get("stages", {}))
        if lease.host == socket.gethostname() and lease.store == store and not _alive(lease.pid):
            found.append(lease)
    return found


def reclaim(folder: Path, tracker: Tracker, new_parent: str, store: str) -> dict[str, str]:
    """Close the runs of dead workflow processes as KILLED; return their stage runs by cache key.

    Only leases of the same tracking ``store`` are reclaimed (the runs live there). Each run
    gets ``medseg.resumed_by=<new_parent>``; one the store no longer knows is skipped.
    """
    resumable: dict[str, str] = {}
    for lease in stale_leases(folder, store):
        for run_id in (lease.parent, *lease.stages.values()):
            with contextlib.suppress(TrackingError):
                tracker.set_tags(run_id, {"medseg.resumed_by": new_parent})
                tracker.end_run(run_id, "KILLED")
        resumable.update(lease.stages)
        lease.close()
    return resumable
