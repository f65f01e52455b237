"""The shipped example workflows as the accuracy benchmarks run them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from medseg.resources import shipped_dir

WEIGHTS_EXPORT = {"mlflow_model": False, "torch_export": False}
"""Export params of a benchmark run: the scores come from the weights and card, so no MLflow
model and no ``torch.export`` program (each costs seconds per run and changes no figure)."""


def example_workflow(
    example: str, data: Path, train: dict[str, object] | None = None, **changes: Any
) -> dict[str, Any]:
    """The shipped ``example`` (a file in ``workflows/examples``) reading ``data``.

    ``train`` is merged into its train params, ``changes`` replace top-level keys, and the export
    is ``WEIGHTS_EXPORT``.
    """
    document = yaml.safe_load((shipped_dir("workflows") / example).read_text())
    params = document["params"]
    document = {**document, **changes, "inputs": {"data": str(data)}}
    document["params"] = {
        **params,
        "train": {**params.get("train", {}), **(train or {})},
        "export": WEIGHTS_EXPORT,
    }
    return document
