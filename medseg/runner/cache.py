"""Content-addressed stage cache: digests, cache keys and atomic commits.

Layout of ``<workspace>/cache`` (the memo of file digests, keyed by source path, size and
mtime_ns, is ``<workspace>/private/digests.sqlite``: source paths stay private)::

    tmp/<key>.<random>/       outputs being written by a running stage
    <key>/manifest.json       written last: its presence marks the commit
    <key>/<output>/...        one directory per named output, with ``_artifact.json``
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from medseg._version import __version__
from medseg.errors import CacheError, DataError

ARTIFACT_FILE = "_artifact.json"
MANIFEST_FILE = "manifest.json"
_CHUNK = 1 << 20


def canonical_json(value: Any) -> str:
    """Serialise ``value`` as canonical JSON (sorted keys, no whitespace)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour can change a stage's outputs."""
    versions = {"medseg": __version__}
    for name in ("monai", "torch"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def cache_key(
    *,
    stage: str,
    version: int,
    params: Mapping[str, Any],
    input_digests: Mapping[str, str],
    seed: int,
    versions: Mapping[str, str],
) -> str:
    """Return the sha256 cache key of one stage execution.

    The key covers the stage type and version, its params, the content digests of its
    inputs, the workflow seed and the library versions; nothing else (no paths, no times).
    """
    payload = {
        "stage": stage,
        "version": version,
        "params": params,
        "inputs": dict(input_digests),
        "seed": seed,
        "versions": dict(versions),
    }
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


class DigestMemo:
    """sha256 file digests memoised by ``(path, size, mtime_ns)`` in a SQLite table.

    A large tree is read once; later digests cost one ``stat`` per file.
    """

    def __init__(self, database: Path | None) -> None:
        """Open the memo at ``database``; ``None`` keeps it in memory for this process only."""
        if database is not None:
            database.parent.mkdir(parents=True, exist_ok=True)
        self._connection = sqlite3.connect(database or ":memory:", timeout=30)
        self._connection.execute(
            "CREATE TABLE IF NOT EXISTS digests (path TEXT PRIMARY KEY, size INTEGER, "
            "mtime_ns INTEGER, digest TEXT)"
        )
        self.files_hashed = 0

    def close(self) -> None:
        """Commit pending rows and close the database."""
        self._connection.commit()
        self._connection.close()

    def file_digest(self, path: Path) -> str:
        """Return the sha256 hex digest of the file at ``path``."""
        stat = path.stat()
        key = str(path.resolve())
        row = self._connection.execute(
            "SELECT size, mtime_ns, digest FROM digests WHERE path = ?", (key,)
        ).fetchone()
        if row is not None and row[0] == stat.st_size and row[1] == stat.st_mtime_ns:
            return str(row[2])
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
        self.files_hashed += 1
        value = digest.hexdigest()
        self._connection.execute(
            "INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?)",
            (key, stat.st_size, stat.st_mtime_ns, value),
        )
        return value

    def tree_digest(self, root: Path) -> str:
        """Digest of a file or a directory tree: relative paths and file contents.

        ``_artifact.json`` bookkeeping files are excluded. Symbolic links to directories
        are not followed, so a link loop cannot hang hashing.

        Raises:
            DataError: ``root`` does not exist or a file cannot be read.

        """
        if root.is_file():
            return self.file_digest(root)
        if not root.is_dir():
            raise DataError(f"input '{root.name}' does not exist; check the path bound in the workflow")
        digest = hashlib.sha256()
        try:
            for relative in sorted(_walk_files(root)):
                line = f"{relative}\0{self.file_digest(root / relative)}\n"
                digest.update(line.encode())
        except PermissionError as exc:
            raise DataError(
                f"cannot read '{Path(exc.filename or '').name}' in input '{root.name}': "
                "permission denied; make it readable"
            ) from exc
        return digest.hexdigest()


def _walk_files(root: Path) -> Iterator[str]:
    for directory, _subdirs, files in os.walk(root, followlinks=False):
        for name in files:
            if name == ARTIFACT_FILE:
                continue
            full = Path(directory) / name
            if full.is_file():
                yield full.relative_to(root).as_posix()


@dataclass(frozen=True)
class Manifest:
    """The committed record of one stage execution."""

    key: str
    stage: str
    version: int
    params: dict[str, Any]
    input_digests: dict[str, str]
    output_digests: dict[str, str]
    metrics: dict[str, float]
    run_id: str
    versions: dict[str, str]

    def to_json(self) -> str:
        """Return the manifest as indented JSON."""
        return json.dumps(self.__dict__, indent=2, sort_keys=True)


class StageCache:
    """The committed stage outputs of one workspace."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def entry(self, key: str) -> Path:
        """Directory of the committed entry ``key`` (it may not exist)."""
        return self.root / key

    def manifest(self, key: str) -> Manifest | None:
        """Return the manifest of a committed entry, or ``None`` when not committed."""
        path = self.entry(key) / MANIFEST_FILE
        if not path.is_file():
            return None
        try:
            return Manifest(**json.loads(path.read_text()))
        except (ValueError, TypeError) as exc:
            raise CacheError(
                f"cache entry {key[:12]} has a damaged manifest; run 'medseg cache gc' or "
                "delete that folder from the workspace cache"
            ) from exc

    @contextmanager
    def staging(self, key: str, outputs: Iterable[str]) -> Iterator[dict[str, Path]]:
        """Yield fresh output directories (name → dir) in one temp dir, removed on exit.

        The caller commits with :meth:`commit` inside the block; whatever is not committed
        (the block raised) is deleted, so no half-written output survives. Temp dirs that a
        killed run of the same key left behind are removed first.
        """
        tmp_root = self.root / "tmp"
        tmp_root.mkdir(exist_ok=True)
        for leftover in tmp_root.glob(f"{key[:16]}.*"):
            shutil.rmtree(leftover, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{key[:16]}.", dir=tmp_root))
        try:
            directories = {name: staging / name for name in outputs}
            for directory in directories.values():
                directory.mkdir()
            yield directories
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def commit(self, staged: Mapping[str, Path], manifest: Manifest) -> Path:
        """Move staged outputs into ``<key>/`` atomically; the manifest is written last."""
        staging = next(iter(staged.values())).parent
        for name, directory in staged.items():
            record = {
                "stage": manifest.stage,
                "output": name,
                "key": manifest.key,
                "digest": manifest.output_digests[name],
            }
            path = directory / ARTIFACT_FILE
            path.unlink(missing_ok=True)  # a hard link to an input's record must not be written through
            path.write_text(json.dumps(record, indent=2))
        (staging / MANIFEST_FILE).write_text(manifest.to_json())
        target = self.entry(manifest.key)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
        return target

    def gc(self, keep: set[str]) -> int:
        """Delete committed entries not in ``keep`` and stale temp dirs; return entries removed."""
        removed = 0
        for child in self.root.iterdir():
            if child.name == "tmp":
                shutil.rmtree(child, ignore_errors=True)
            elif child.is_dir() and child.name not in keep:
                shutil.rmtree(child)
                removed += 1
        return removed
