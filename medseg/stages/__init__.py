"""Stage adapters from the stage contract to the library functions, in an explicit registry."""

from typing import Any

from medseg.runner.contract import Stage
from medseg.stages import evaluate, export, ingest, pacs, postprocess, predict, train

REGISTRY: dict[str, Stage[Any]] = {
    stage.name: stage
    for stage in (
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
    )
}

__all__ = ["REGISTRY"]
