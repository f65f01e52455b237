"""Shared fixtures: paths to the real data beside the project, and a phantom dataset."""

from __future__ import annotations

from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT.parent / "shared" / "data"
GOWT1 = SHARED_DATA / "ctc" / "Fluo-N2DH-GOWT1"
CTC_FIXTURE = SHARED_DATA / "ctc" / "java-ctcmetrics-fixture" / "test_data"


def require(path: Path) -> Path:
    """Skip the test when a real-data folder is not beside the project."""
    if not path.exists():
        pytest.skip(f"real data not available: {path}")
    return path


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small phantom in CTC layout (12 frames of 64×64)."""
    from medseg.demo import write_phantom_ctc

    return write_phantom_ctc(tmp_path_factory.mktemp("phantom"), frames=12, size=64, seed=3)
