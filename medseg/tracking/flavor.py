"""The ``medseg`` MLflow model flavor: an export folder as an MLflow model that loads back as a ``Segmenter``.

A logged model has two flavors side by side in its ``MLmodel`` file:

- ``python_function``: the whole ``Segmenter`` as a model from code (``mlflow_pyfunc.py``, the
  medseg package shipped as its code) that ``mlflow.pyfunc`` and ``mlflow models serve`` load
  where medseg is not installed: images of any size in, instance labels out;
- ``medseg``: the medseg version, the folder of the export files (``artifacts``) and the whole
  model card, so ``load_card`` reads the card from the registry by fetching ``MLmodel`` alone
  (no weights), and ``load_model`` rebuilds the ``Segmenter`` (weights loaded weights-only).

Used by ``medseg.mlflow`` (the public functions) and by the export stage's tracker. This module
and ``tracking/mlflow.py`` are the only ones importing mlflow.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medseg._version import __version__
from medseg.errors import DataError
from medseg.inference.card import ModelCard

if TYPE_CHECKING:
    import numpy as np
    from mlflow.models import Model, ModelInfo, ModelSignature

    from medseg.inference.segmenter import Segmenter

FLAVOR_NAME = "medseg"
PYFUNC_SOURCE = Path(__file__).with_name("mlflow_pyfunc.py")
MEDSEG_PACKAGE = Path(__file__).resolve().parents[1]
"""The medseg package, shipped inside each model as its code (``code/medseg``)."""
EXPORT_FILES = {"torchscript": "model.ts", "weights": "weights.pt", "card": "model_card.json"}
"""The export files the model carries (pyfunc artifact name → file); pyfunc copies them to ``artifacts/``."""
_EXPORT_FOLDER = "artifacts"


def segmenter_signature(card: ModelCard) -> ModelSignature:
    """The pyfunc's signature: images of any size in, instance labels out, a ``spacing`` param.

    Input ``(-1, C, -1, ...)`` float32, output ``(-1, -1, ...)`` int32; ``spacing`` (mm, array
    axis order) defaults to the card's training spacing, else 1 mm.
    """
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    free = (-1,) * card.spatial_dims
    spacing = [float(value) for value in card.spacing] or [1.0] * card.spatial_dims
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, card.in_channels, *free))]),
        outputs=Schema([TensorSpec(np.dtype(np.int32), (-1, *free))]),
        params=ParamSchema([ParamSpec("spacing", "double", spacing, (-1,))]),
    )


def segmenter_requirements() -> list[str]:
    """Pip requirements of the pyfunc: medseg's own dependencies, pinned to the installed versions."""
    import re
    from importlib import metadata

    pinned = []
    for requirement in metadata.requires("medseg") or []:
        if "extra ==" in requirement:
            continue
        name = re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0]
        try:
            pinned.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pinned.append(requirement.split(";")[0].strip())
    return pinned


def save_model(
    export_dir: str | Path,
    path: str | Path,
    *,
    mlflow_model: Model | None = None,
    signature: ModelSignature | None = None,
    input_example: np.ndarray | None = None,
    pip_requirements: list[str] | None = None,
) -> None:
    """Write the export folder ``export_dir`` as an MLflow model at ``path`` (medseg + pyfunc flavors).

    The pyfunc is the whole ``Segmenter`` (``mlflow_pyfunc.py``, with the medseg package as its
    code); ``signature`` defaults to ``segmenter_signature`` of the card, ``pip_requirements``
    to ``segmenter_requirements``.

    Raises:
        DataError: ``export_dir`` lacks an export file (``model.ts``, ``weights.pt``, ``model_card.json``).

    """
    import mlflow
    from mlflow.models import Model

    export_dir = Path(export_dir)
    missing = [file for file in EXPORT_FILES.values() if not (export_dir / file).is_file()]
    if missing:
        raise DataError(
            f"{export_dir.name}: not a medseg export folder, missing {', '.join(missing)}; "
            "pass the export stage's output (or `medseg export`)"
        )
    card = ModelCard.read(export_dir / EXPORT_FILES["card"])
    mlflow_model = mlflow_model if mlflow_model is not None else Model()
    with tempfile.TemporaryDirectory() as staging:
        code = Path(staging) / "medseg"  # the sources only: compiled files embed the install path
        shutil.copytree(MEDSEG_PACKAGE, code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        mlflow.pyfunc.save_model(
            path,
            python_model=str(PYFUNC_SOURCE),
            artifacts={name: str(export_dir / file) for name, file in EXPORT_FILES.items()},
            code_paths=[str(code)],
            signature=signature if signature is not None else segmenter_signature(card),
            input_example=input_example,
            pip_requirements=pip_requirements if pip_requirements is not None else segmenter_requirements(),
            mlflow_model=mlflow_model,
        )
    mlflow_model.add_flavor(
        FLAVOR_NAME,
        medseg_version=__version__,
        export=_EXPORT_FOLDER,
        card=card.model_dump(mode="json"),
    )
    mlflow_model.save(str(Path(path) / "MLmodel"))


def log_model(
    export_dir: str | Path,
    name: str = "model",
    *,
    run_id: str | None = None,
    registered_model_name: str | None = None,
    signature: ModelSignature | None = None,
    input_example: np.ndarray | None = None,
    pip_requirements: list[str] | None = None,
) -> ModelInfo:
    """Log the export folder ``export_dir`` to run ``run_id`` (default: the active run); register if named."""
    from mlflow.models import Model
    from mlflow.tracking import MlflowClient

    model_id = None
    if run_id is not None:  # in the run's experiment, whatever experiment the caller made active
        client = MlflowClient()
        experiment = client.get_run(run_id).info.experiment_id
        model_id = client.create_logged_model(experiment, name=name, source_run_id=run_id).model_id
    return Model.log(
        artifact_path=None,
        name=name,
        flavor=sys.modules[__name__],
        flavor_name=FLAVOR_NAME,
        run_id=run_id,
        model_id=model_id,
        registered_model_name=registered_model_name,
        export_dir=export_dir,
        signature=signature,
        input_example=input_example,
        pip_requirements=pip_requirements,
    )


def flavor_configuration(flavors: Mapping[str, Any], model_uri: str) -> dict[str, Any]:
    """The ``medseg`` section of a model's ``MLmodel`` flavors.

    Raises:
        DataError: the model was not logged by medseg (no ``medseg`` flavor).

    """
    if FLAVOR_NAME not in flavors:
        raise DataError(
            f"{model_uri}: not a medseg model (its flavors: {', '.join(sorted(flavors))}); "
            "log it with medseg.mlflow.log_model or the export stage"
        )
    return dict(flavors[FLAVOR_NAME])


def load_model(model_uri: str, dst_path: str | Path | None = None, *, device: str = "cpu") -> Segmenter:
    """Load a logged medseg model (``models:/name@alias``, ``runs:/id/model``, ...) as a ``Segmenter``."""
    import mlflow
    from mlflow.models import Model

    from medseg.inference.segmenter import Segmenter

    local = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=model_uri, dst_path=str(dst_path) if dst_path is not None else None
        )
    )
    configuration = flavor_configuration(Model.load(str(local)).flavors, model_uri)
    return Segmenter.from_export(local / configuration["export"], device=device)


def load_card(model_uri: str) -> ModelCard:
    """The model card of a logged medseg model, read from its ``MLmodel`` file (no weights fetched)."""
    from mlflow.models import get_model_info

    configuration = flavor_configuration(get_model_info(model_uri).flavors, model_uri)
    return ModelCard.model_validate(configuration["card"])
