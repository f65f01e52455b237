"""Stage adapters from the stage contract to the library functions, in an explicit registry.

An installed package adds a stage by declaring its ``Stage`` subclass (or instance) under the
entry-point group ``medseg.stages``, named as the stage's ``name``.
"""

from typing import Any

from medseg.registry import Registry
from medseg.runner.contract import Stage
from medseg.stages import evaluate, export, ingest, pacs, postprocess, predict, train


def _stage(name: str, loaded: Any) -> Stage[Any]:
    """A plugin's stage: a ``Stage`` instance, or a subclass taking no arguments, named ``name``."""
    stage = loaded() if isinstance(loaded, type) and issubclass(loaded, Stage) else loaded
    if not isinstance(stage, Stage):
        raise TypeError(f"expected a medseg Stage subclass, got {type(loaded).__name__}")
    if stage.name != name:
        raise TypeError(f"the entry point is named '{name}' but its stage is named '{stage.name}'")
    return stage


REGISTRY: Registry[Stage[Any]] = Registry("stage", group="medseg.stages", adapt=_stage)
for _builtin in (
    ingest.STAGE,
    train.STAGE,
    postprocess.STAGE,
    evaluate.STAGE,
    export.STAGE,
    predict.INGEST_IMAGES,
    predict.PREDICT,
    predict.WRITE_MASKS,
    pacs.FETCH,
    pacs.STORE,
):
    REGISTRY.register(_builtin.name, _builtin)

__all__ = ["REGISTRY"]
