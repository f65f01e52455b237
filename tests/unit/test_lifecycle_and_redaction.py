"""Run leases (stale runs of dead processes) and the redaction boundary, without a server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from medseg.runner.lifecycle import open_lease, reclaim, stale_leases
from medseg.tracking.base import NullTracker
from medseg.tracking.redact import RedactingTracker, Redactor


class RecordingTracker(NullTracker):
    """Records the calls the lifecycle and redaction code make (a spy on a real Tracker)."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def set_tags(self, run_id, tags):
        self.calls.append(("set_tags", run_id, dict(tags)))

    def end_run(self, run_id, status="FINISHED"):
        self.calls.append(("end_run", run_id, status))

    def log_params(self, run_id, params):
        self.calls.append(("log_params", run_id, dict(params)))

    def log_artifact(self, run_id, path, artifact_path=None):
        self.calls.append(
            ("log_artifact", run_id, {p.name: p.read_text() for p in Path(path).rglob("*.json")})
        )


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_only_dead_processes_of_this_host_and_store_are_reclaimed(tmp_path):
    live = open_lease(tmp_path, "parent-live", "sqlite:///a")
    live.add_stage("key-train", "run-train-live")
    dead = open_lease(tmp_path, "parent-dead", "sqlite:///a")
    dead.add_stage("key-ingest", "run-ingest")
    dead.end_stage("key-ingest")  # finished cleanly: not to be killed
    dead.add_stage("key-train", "run-train")
    other_store = open_lease(tmp_path, "parent-other", "http://elsewhere")
    other_host = open_lease(tmp_path, "parent-far", "sqlite:///a")
    for lease, host in (
        (dead, socket.gethostname()),
        (other_store, socket.gethostname()),
        (other_host, "far"),
    ):
        document = json.loads(lease.path.read_text())
        lease.path.write_text(json.dumps({**document, "pid": _dead_pid(), "host": host}))
    assert [lease.parent for lease in stale_leases(tmp_path, "sqlite:///a")] == ["parent-dead"]

    tracker = RecordingTracker()
    resumable = reclaim(tmp_path, tracker, "parent-new", "sqlite:///a")
    assert resumable == {"key-train": "run-train"}
    assert tracker.calls == [
        ("set_tags", "parent-dead", {"medseg.resumed_by": "parent-new"}),
        ("end_run", "parent-dead", "KILLED"),
        ("set_tags", "run-train", {"medseg.resumed_by": "parent-new"}),
        ("end_run", "run-train", "KILLED"),
    ]
    assert not dead.path.exists() and live.path.exists() and other_store.path.exists()
    assert os.getpid() == live.pid


def test_redactor_replaces_paths_and_source_names_but_keeps_structure(tmp_path):
    data = tmp_path / "hospital"
    (data / "Smith_John_4417" / "series").mkdir(parents=True)
    (data / "Smith_John_4417" / "series" / "IM0001.dcm").write_bytes(b"")
    (data / "images").mkdir()
    (data / "images" / "t003.tif").write_bytes(b"")
    redactor = Redactor()
    redactor.add_input("data", data)
    redactor.add_sources({"case_0001": "Smith_John_4417"})
    text = (
        f"case case_0001: cannot read {data}/Smith_John_4417/series/IM0001.dcm (/usr/lib/x.so); "
        "Smith_John_4417 and IM0001.dcm; frame t003.tif in images/; train/loss eval/seg"
    )
    assert redactor.text(text) == (
        "case case_0001: cannot read <input:data> (<path>); case_0001 and <source>; "
        "frame t003.tif in images/; train/loss eval/seg"
    )
    assert (
        redactor.text("http://127.0.0.1:5000/api and sqlite:///tmp/x")
        == "http://127.0.0.1:5000/api and sqlite:///tmp/x"
    )

    tracker = RecordingTracker()
    wrapped = RedactingTracker(tracker, redactor)
    wrapped.log_params("r", {"note": "Smith_John_4417", "lr": 0.1})
    report = tmp_path / "report"
    report.mkdir()
    (report / "summary.json").write_text(json.dumps({"source": str(data / "Smith_John_4417")}))
    wrapped.log_artifact("r", report)
    assert tracker.calls[0] == ("log_params", "r", {"note": "case_0001", "lr": 0.1})
    assert tracker.calls[1] == ("log_artifact", "r", {"summary.json": '{"source": "<input:data>"}'})
    clean = tmp_path / "clean"
    clean.mkdir()
    (clean / "m.json").write_text("{}")
    with redactor.redacted_copy(clean) as upload:
        assert upload == clean  # nothing to redact: uploaded as it is, no copy
