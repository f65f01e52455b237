"""The redaction boundary: every string bound for tracking passes one :class:`Redactor`.

Source folders and file names may identify patients (a folder named after a patient ID, a file
named after a patient), and third-party libraries quote whole paths in their exception texts.
:class:`RedactingTracker` wraps any tracker so that run names, tags, params, metric names,
logged text and the text files of artifacts and models reach it only after

1. absolute paths are replaced: ``<input:data>`` for a path under a workflow input, ``<path>``
   for any other (a library's temp file, a home folder);
2. the known source names of the current run — every folder and file name under the workflow's
   inputs, and the private case map's source names — become ``<source>`` (a source name of a
   case becomes its case id), matched as whole tokens.

Names that are structure, not identity, stay: medseg's own file names, layout folders
(``images``, ``labelsTr``, ``SEG``), CTC frame names (``t003``, ``man_seg003``) and names under
four characters.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from medseg.tracking.base import DatasetInfo, ModelInfo, RunStatus, Tracker

_KEEP = frozenset(
    name.lower()
    for name in (
        # layouts and medseg's own files
        "images", "labels", "image", "label", "imagesTr", "labelsTr", "imagesTs", "dataset",
        "cases", "SEG", "TRA", "data", "dicom", "series", "weights", "last_weights", "model",
        "model_card", "history", "predictions", "retrieved", "report", "export", "markers",
        "nifti", "tiff", "README", "PROVENANCE", "man_track",
        # medseg's vocabulary: stage names and metric prefixes must survive
        "ingest", "train", "postprocess", "evaluate", "predict", "write", "fetch", "store",
        "test", "eval", "loss", "dice", "none", "true", "false",
    )
)  # fmt: skip
_STRUCTURED = re.compile(r"^(t\d+|man_seg\d+|man_track\d+|mask\d+|case_\d+|\d{1,3}(_GT)?)$", re.IGNORECASE)
_ABSOLUTE_PATH = re.compile(r"(?<![\w:/.\\-])(?:[A-Za-z]:[\\/]|/)[^\s'\"<>|,;()\[\]{}]*")
_FILE_SUFFIX = re.compile(r"(\.(nii|gz|tiff?|png|nrrd|nhdr|dcm|json|csv|txt|mha|mhd))+$", re.IGNORECASE)
_TEXT_SUFFIXES = frozenset({".json", ".csv", ".html", ".txt", ".yaml", ".yml", ".md", ".py", ".log"})
_MIN_NAME = 4


def _stems(name: str) -> Iterator[str]:
    """``name`` and its stems: ``a.nii.gz`` → ``a.nii.gz``, ``a.nii``, ``a``."""
    yield name
    while "." in name.strip("."):
        name = name.rsplit(".", 1)[0]
        yield name


class Redactor:
    """Replaces known source names and absolute paths in text bound for tracking."""

    def __init__(self) -> None:
        self._roots: dict[str, str] = {}
        self._names: dict[str, str] = {}
        self._pattern: re.Pattern[str] | None = None

    def add_input(self, name: str, path: Path) -> None:
        """Know workflow input ``name``: its absolute path and every name below it."""
        root = path.resolve()
        self._roots[str(root)] = f"<input:{name}>"
        self._roots.setdefault(str(path.absolute()), f"<input:{name}>")
        self._add_name(root.name, "<source>")
        if root.is_dir():
            for folder, dirs, files in os.walk(root):
                for entry in (*dirs, *files):
                    self._add_name(entry, "<source>")
                del folder
        self._pattern = None

    def add_sources(self, source_map: Mapping[str, str]) -> None:
        """Know a private map ``case id → source name`` (relative path): each name → its case id.

        Source names made of structure only (a CTC frame ``01/t003``) are left as they are.
        """
        for case_id, source in source_map.items():
            parts = Path(source).parts
            if all(self._is_structure(part) for part in parts):
                continue
            for stem in _stems(source):
                self._names[stem] = case_id
            for part in parts:
                self._add_name(part, "<source>")
        self._pattern = None

    @staticmethod
    def _is_structure(name: str) -> bool:
        """Layout and frame names (with any suffix: ``t003.tif``, ``image.nii.gz``) and short names."""
        base = _FILE_SUFFIX.sub("", name)
        return base.lower() in _KEEP or bool(_STRUCTURED.match(base)) or len(name) < _MIN_NAME

    def _add_name(self, name: str, replacement: str) -> None:
        for stem in _stems(name):
            if not self._is_structure(stem):
                self._names.setdefault(stem, replacement)

    def text(self, text: str) -> str:
        """``text`` with absolute paths and known source names replaced."""
        if not text:
            return text
        text = _ABSOLUTE_PATH.sub(self._path, text)
        if self._names:
            if self._pattern is None:
                names = sorted(self._names, key=len, reverse=True)
                alternation = "|".join(re.escape(name) for name in names)
                self._pattern = re.compile(rf"(?<![A-Za-z0-9])(?:{alternation})(?![A-Za-z0-9])")
            text = self._pattern.sub(lambda match: self._names[match.group(0)], text)
        return text

    def _path(self, match: re.Match[str]) -> str:
        path = match.group(0)
        for root in sorted(self._roots, key=len, reverse=True):
            if path == root or path.startswith(root.rstrip("/") + "/"):
                return self._roots[root]
        return "<path>"

    def value(self, value: object) -> object:
        """A param or tag value: strings redacted, other values as they are."""
        return self.text(value) if isinstance(value, str) else value

    @contextmanager
    def redacted_copy(self, path: Path) -> Iterator[Path]:
        """``path`` itself when nothing in it needs redaction, else a redacted copy (a temp folder).

        Text files (JSON, CSV, HTML, YAML, ...) have their content redacted; every file name is
        redacted too. Binary files are copied as they are.
        """
        if not self._needs_redaction(path):
            yield path
            return
        with tempfile.TemporaryDirectory(prefix="medseg-redacted-") as scratch:
            target = Path(scratch) / self.text(path.name)
            if path.is_dir():
                for source in sorted(path.rglob("*")):
                    relative = Path(*(self.text(part) for part in source.relative_to(path).parts))
                    if source.is_dir():
                        (target / relative).mkdir(parents=True, exist_ok=True)
                    else:
                        self._copy(source, target / relative)
            else:
                self._copy(path, target)
            yield target

    def _needs_redaction(self, path: Path) -> bool:
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for file in files:
            relative = file.name if file == path else str(file.relative_to(path))
            if self.text(relative) != relative:
                return True
            if file.suffix.lower() in _TEXT_SUFFIXES:
                content = file.read_text(errors="replace")
                if self.text(content) != content:
                    return True
        return False

    def _copy(self, source: Path, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.suffix.lower() in _TEXT_SUFFIXES:
            target.write_text(self.text(source.read_text(errors="replace")))
        else:
            shutil.copy2(source, target)


class RedactingTracker:
    """A :class:`Tracker` that passes everything through a :class:`Redactor` before ``inner``."""

    def __init__(self, inner: Tracker, redactor: Redactor) -> None:
        self.inner = inner
        self.redactor = redactor

    def start_run(
        self,
        *,
        experiment: str,
        name: str,
        parent_run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> str:
        """Open a run with a redacted name and tags."""
        return self.inner.start_run(
            experiment=self.redactor.text(experiment),
            name=self.redactor.text(name),
            parent_run_id=parent_run_id,
            tags=self._tags(tags or {}),
        )

    def _tags(self, tags: Mapping[str, str]) -> dict[str, str]:
        return {self.redactor.text(key): self.redactor.text(str(value)) for key, value in tags.items()}

    def log_params(self, run_id: str, params: Mapping[str, object]) -> None:
        """Log params with redacted keys and string values."""
        self.inner.log_params(
            run_id, {self.redactor.text(key): self.redactor.value(value) for key, value in params.items()}
        )

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log metrics under redacted names."""
        self.inner.log_metrics(
            run_id, {self.redactor.text(key): value for key, value in metrics.items()}, step
        )

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        """Set redacted tags (an error message quoting a path included)."""
        self.inner.set_tags(run_id, self._tags(tags))

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        """Upload the file or folder, or its redacted copy."""
        with self.redactor.redacted_copy(path) as upload:
            self.inner.log_artifact(run_id, upload, artifact_path)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        """Upload redacted text."""
        self.inner.log_text(run_id, self.redactor.text(text), self.redactor.text(artifact_file))

    def log_dataset(self, run_id: str, dataset: DatasetInfo, context: str) -> None:
        """Record a dataset input with redacted name, source and profile values."""
        redacted = DatasetInfo(
            name=self.redactor.text(dataset.name),
            digest=dataset.digest,
            source=self.redactor.text(dataset.source),
            profile={
                self.redactor.text(key): self.redactor.value(value) for key, value in dataset.profile.items()
            },
        )
        self.inner.log_dataset(run_id, redacted, self.redactor.text(context))

    def log_model(
        self,
        run_id: str,
        model_dir: Path,
        *,
        registered_name: str | None = None,
        aliases: Sequence[str] = (),
        pip_requirements: list[str] | None = None,
    ) -> ModelInfo:
        """Log the model folder (its card redacted)."""
        with self.redactor.redacted_copy(model_dir) as upload:
            return self.inner.log_model(
                run_id,
                upload,
                registered_name=registered_name,
                aliases=aliases,
                pip_requirements=pip_requirements,
            )

    def resume_run(self, run_id: str, *, parent_run_id: str) -> None:
        """Reopen the run under ``parent_run_id``."""
        self.inner.resume_run(run_id, parent_run_id=parent_run_id)

    def end_run(self, run_id: str, status: RunStatus = "FINISHED") -> None:
        """Close the run."""
        self.inner.end_run(run_id, status)
