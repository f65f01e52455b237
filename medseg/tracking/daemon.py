"""A tracking daemon: MLflow imported and a workspace's SQLite store open, kept warm between runs.

Importing MLflow and opening its SQLite store costs about 2.5 s on a 2-core machine — most of
a fully cached rerun. The first ``medseg run`` on a workspace tracks in-process as always and
starts this daemon in the background; later runs within its idle time (``MEDSEG_TRACKING_DAEMON``
seconds, default 900; ``0`` switches it off) send their tracking calls to it over a Unix socket
and get the same answers, synchronously, in the same order, so what MLflow holds is identical.

Safety:

- one daemon per (tracking URI, medseg code, Python), listening on a socket in a folder
  only this user can enter (``$TMPDIR/medseg-<uid>/``); the code is the version and the
  source files as they are now (``code_identity``), so an upgraded or edited medseg never
  talks to a daemon still running the old modules;
- only the workspace's embedded SQLite store is served (no credentials are ever shared);
- each client names the store file it expects (device, inode): a daemon whose file was
  deleted or replaced refuses, exits, and the client tracks in-process;
- a client that cannot reach a daemon tracks in-process: the daemon is an accelerator only.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medseg._version import __version__
from medseg.errors import TrackingError
from medseg.tracking.base import DatasetInfo, ModelInfo, RunStatus

DAEMON_ENV = "MEDSEG_TRACKING_DAEMON"
"""Seconds an idle daemon stays up; ``0`` runs every command without one."""
DEFAULT_IDLE_S = 900.0
_CONNECT_TIMEOUT_S = 1.0


def idle_seconds(environ: Mapping[str, str]) -> float:
    """The daemon idle time asked for by ``environ`` (``DEFAULT_IDLE_S`` when unset)."""
    text = environ.get(DAEMON_ENV, "").strip()
    try:
        return max(0.0, float(text)) if text else DEFAULT_IDLE_S
    except ValueError:
        return 0.0


@functools.cache
def code_identity() -> str:
    """The medseg version and a digest of its source files' paths, sizes and modification times.

    A daemon keeps the modules it started with. An editable install keeps its version while its
    files change: a model card with a field added since the daemon started failed validation in
    the daemon's ``log_model`` (``Extra inputs are not permitted``). Stating the package's
    ~90 files takes about 2 ms.
    """
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256(__version__.encode())
    for path in sorted(package.rglob("*.py")):
        info = path.stat()
        digest.update(f"{path.relative_to(package)}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
    return f"{__version__}+{digest.hexdigest()[:16]}"


def socket_path(tracking_uri: str) -> Path:
    """Where the daemon for ``tracking_uri`` and this medseg code listens (this user's private folder)."""
    key = hashlib.sha256(f"{tracking_uri}\0{code_identity()}\0{sys.executable}".encode()).hexdigest()[:20]
    return Path(tempfile.gettempdir()) / f"medseg-{os.getuid()}" / f"tracking-{key}.sock"


def _private(folder: Path) -> bool:
    """Create ``folder`` for this user only; ``False`` when it exists with other owners or rights."""
    with contextlib.suppress(FileExistsError):
        folder.mkdir(mode=0o700)
    info = folder.lstat()
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o077


def _identity(path: Path) -> list[int] | None:
    """(device, inode) of a file, ``None`` when it does not exist."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    return [info.st_dev, info.st_ino]


def _encode(value: Any) -> Any:
    """A call argument as JSON: paths and dataset records tagged, mappings and sequences walked."""
    if isinstance(value, DatasetInfo):
        return {"__dataset__": {**dataclasses.asdict(value), "profile": dict(value.profile)}}
    if isinstance(value, Path):
        return {"__path__": str(value)}
    if isinstance(value, Mapping):
        return {str(key): _encode(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_encode(item) for item in value]
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if "__dataset__" in value:
            return DatasetInfo(**value["__dataset__"])
        if "__path__" in value:
            return Path(value["__path__"])
        return {key: _decode(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_decode(item) for item in value]
    return value


class _Channel:
    """Newline-delimited JSON messages over a connected Unix socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = sock.makefile("r", encoding="utf-8")

    def send(self, message: Mapping[str, Any]) -> None:
        self.sock.sendall((json.dumps(message) + "\n").encode())

    def receive(self) -> dict[str, Any] | None:
        line = self.reader.readline()
        return json.loads(line) if line else None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.reader.close()
            self.sock.close()


class DaemonTracker:
    """A :class:`Tracker` whose calls run in the tracking daemon (same answers, same order).

    Raises ``TrackingError`` with the daemon's message when a call fails there, or when the
    daemon goes away mid-run (``ResilientTracker`` then journals what it can, as for a server).
    """

    def __init__(self, channel: _Channel, tracking_uri: str) -> None:
        self._channel = channel
        self.tracking_uri = tracking_uri

    @classmethod
    def connect(cls, tracking_uri: str, store_file: Path) -> DaemonTracker | None:
        """Reach the daemon serving ``tracking_uri`` with ``store_file`` open; ``None`` if there is none."""
        path = socket_path(tracking_uri)
        identity = _identity(store_file)
        if identity is None or not path.exists() or not _private(path.parent):
            return None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(_CONNECT_TIMEOUT_S)
        channel = _Channel(sock)
        try:
            sock.connect(str(path))
            channel.send({"hello": code_identity(), "uri": tracking_uri, "store": identity})
            answer = channel.receive()
        except (OSError, ValueError):
            channel.close()
            return None
        if not answer or not answer.get("ok"):
            channel.close()
            return None
        sock.settimeout(None)  # a model upload may take long
        return cls(channel, tracking_uri)

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            self._channel.send({"method": method, "args": _encode(list(args)), "kwargs": _encode(kwargs)})
            answer = self._channel.receive()
        except OSError as exc:
            answer, reason = None, str(exc)
        else:
            reason = "connection closed"
        if answer is None:
            raise TrackingError(
                f"the medseg tracking daemon went away during {method} ({reason}); unsent calls are "
                "journalled, `medseg tracking sync` sends them"
            )
        if "error" in answer:
            raise TrackingError(answer["error"])
        return answer.get("result")

    def start_run(
        self,
        *,
        experiment: str,
        name: str,
        parent_run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> str:
        """Open a run and return its id."""
        return str(
            self._call("start_run", experiment=experiment, name=name, parent_run_id=parent_run_id, tags=tags)
        )

    def log_params(self, run_id: str, params: Mapping[str, object]) -> None:
        """Log params."""
        self._call("log_params", run_id, params)

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log metrics at ``step``."""
        self._call("log_metrics", run_id, {key: float(value) for key, value in metrics.items()}, step)

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        """Set tags."""
        self._call("set_tags", run_id, tags)

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file or folder (the daemon reads it from this machine's disk)."""
        self._call("log_artifact", run_id, path.resolve(), artifact_path)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        """Upload ``text``."""
        self._call("log_text", run_id, text, artifact_file)

    def log_dataset(self, run_id: str, dataset: DatasetInfo, context: str) -> None:
        """Record a dataset input."""
        self._call("log_dataset", run_id, dataset, context)

    def log_model(
        self,
        run_id: str,
        model_dir: Path,
        *,
        registered_name: str | None = None,
        aliases: Sequence[str] = (),
        pip_requirements: list[str] | None = None,
    ) -> ModelInfo:
        """Log an export folder as a model (see ``MlflowTracker.log_model``)."""
        info = self._call(
            "log_model",
            run_id,
            model_dir.resolve(),
            registered_name=registered_name,
            aliases=list(aliases),
            pip_requirements=pip_requirements,
        )
        return ModelInfo(**info)

    def resume_run(self, run_id: str, *, parent_run_id: str) -> None:
        """Reopen a run under ``parent_run_id``."""
        self._call("resume_run", run_id, parent_run_id=parent_run_id)

    def end_run(self, run_id: str, status: RunStatus = "FINISHED") -> None:
        """Close a run."""
        self._call("end_run", run_id, status)

    def review_link(self, experiment: str) -> str:
        """The UI address fragment of ``experiment``'s runs table (``MlflowTracker.review_link``)."""
        return str(self._call("review_link", experiment))

    def close(self) -> None:
        """Hang up (the daemon stays for the next run)."""
        self._channel.close()


_METHODS = frozenset(
    {
        "start_run",
        "log_params",
        "log_metrics",
        "set_tags",
        "log_artifact",
        "log_text",
        "log_dataset",
        "log_model",
        "resume_run",
        "end_run",
        "review_link",
    }
)


def start_daemon(tracking_uri: str, store_file: Path, artifact_root: Path, idle_s: float) -> None:
    """Start the daemon for ``tracking_uri`` in the background (it exits at once if one is running)."""
    folder = socket_path(tracking_uri).parent
    if idle_s <= 0 or not _private(folder):
        return
    command = [
        sys.executable,
        "-m",
        "medseg.tracking.daemon",
        "--uri",
        tracking_uri,
        "--store",
        str(store_file.resolve()),
        "--artifact-root",
        str(artifact_root.resolve()),
        "--idle",
        str(idle_s),
    ]
    subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
        cwd=folder,  # holds no user folder open
        env={**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_CONFIGURE_LOGGING": "false"},
    )


class _Daemon:
    """Serves tracking calls for one SQLite store until idle for ``idle_s`` seconds."""

    def __init__(self, tracking_uri: str, store_file: Path, artifact_root: Path, idle_s: float) -> None:
        from medseg.tracking.mlflow import MlflowTracker

        self.tracking_uri = tracking_uri
        self.artifact_root = artifact_root
        self.idle_s = idle_s
        code_identity()  # fixed now, before any file can change under this process's modules
        MlflowTracker(tracking_uri, artifact_root=artifact_root)  # imports MLflow, opens the store
        self.store_file = store_file
        self.identity = _identity(store_file)
        self.active = 0
        self.last_seen = time.monotonic()
        self.stale = False
        self.lock = threading.Lock()

    def handle(self, sock: socket.socket) -> None:
        """Serve one client connection: a hello, then calls until it hangs up."""
        from medseg.tracking.mlflow import MlflowTracker

        channel = _Channel(sock)
        with self.lock:
            self.active += 1
        try:
            hello = channel.receive()
            fresh = _identity(self.store_file) == self.identity
            if not fresh:
                self.stale = True
            accepted = (
                hello is not None
                and fresh
                and hello.get("hello") == code_identity()
                and hello.get("uri") == self.tracking_uri
                and hello.get("store") == self.identity
            )
            channel.send({"ok": accepted})
            if not accepted:
                return
            tracker = MlflowTracker(self.tracking_uri, artifact_root=self.artifact_root)
            while (request := channel.receive()) is not None:
                method = request.get("method")
                if method not in _METHODS:
                    channel.send({"error": f"the tracking daemon does not know the call {method!r}"})
                    continue
                try:
                    result = getattr(tracker, method)(*_decode(request["args"]), **_decode(request["kwargs"]))
                except TrackingError as exc:
                    channel.send({"error": str(exc)})
                    continue
                if isinstance(result, ModelInfo):
                    result = dataclasses.asdict(result)
                channel.send({"result": result})
        except (OSError, ValueError):
            return
        finally:
            channel.close()
            with self.lock:
                self.active -= 1
                self.last_seen = time.monotonic()

    def idle(self) -> bool:
        """Whether to stop: no client for ``idle_s`` seconds, or the store file was replaced."""
        if _identity(self.store_file) != self.identity:
            self.stale = True
        with self.lock:
            return self.active == 0 and (self.stale or time.monotonic() - self.last_seen > self.idle_s)


def serve(tracking_uri: str, store_file: Path, artifact_root: Path, idle_s: float) -> None:
    """Run the daemon in this process until idle (returns at once if another one is listening)."""
    path = socket_path(tracking_uri)
    if not _private(path.parent):
        return
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(path))
    except OSError:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:  # a dead daemon's socket file
            path.unlink(missing_ok=True)
            listener.bind(str(path))
        else:
            probe.close()
            return
    mine = _identity(path)
    daemon = _Daemon(tracking_uri, store_file, artifact_root, idle_s)
    listener.listen(8)
    listener.settimeout(1.0)
    try:
        while not daemon.idle():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            client.settimeout(None)
            threading.Thread(target=daemon.handle, args=(client,), daemon=True).start()
    finally:
        listener.close()
        if _identity(path) == mine:
            path.unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m medseg.tracking.daemon --uri ... --store ... --artifact-root ... --idle ...``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--uri", required=True)
    parser.add_argument("--store", required=True, type=Path)
    parser.add_argument("--artifact-root", required=True, type=Path)
    parser.add_argument("--idle", type=float, default=DEFAULT_IDLE_S)
    arguments = parser.parse_args(argv)
    serve(arguments.uri, arguments.store, arguments.artifact_root, arguments.idle)


if __name__ == "__main__":
    main()
