"""Locate the pipeline and example-workflow folders shipped with medseg.

In a source checkout (editable install) they are the repository's ``pipelines/`` and
``workflows/examples/``; in a wheel they are bundled under ``medseg/_bundled/``.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
_FOLDERS = {
    "pipelines": (_PACKAGE.parent / "pipelines", _PACKAGE / "_bundled" / "pipelines"),
    "workflows": (_PACKAGE.parent / "workflows" / "examples", _PACKAGE / "_bundled" / "workflows"),
}


def shipped_dir(kind: str) -> Path:
    """The folder of shipped ``pipelines`` or example ``workflows`` (source tree first)."""
    source, bundled = _FOLDERS[kind]
    return source if source.is_dir() else bundled
