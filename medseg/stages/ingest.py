"""Ingest stage: source folder → canonical dataset (``dataset`` output)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from medseg.io.ingest import IngestParams, ingest_dataset
from medseg.runner.contract import Kind, Stage, StageContext, ports


class Ingest(Stage[IngestParams]):
    """The ``ingest`` stage (see ``execute``)."""

    name = "ingest"
    version = 11
    params = IngestParams
    inputs = ports(source=Kind.SOURCE)
    outputs = ports(dataset=Kind.DATASET)
    data_seeded = True
    description = "read a source folder into the canonical dataset with seeded splits"

    def execute(
        self,
        context: StageContext,
        params: IngestParams,
        inputs: Mapping[str, Path],
        outputs: Mapping[str, Path],
    ) -> dict[str, float]:
        """Read, check, normalise and split the cases of the ``source`` input; write its fingerprint.

        The map from case ids to sources goes to ``<workspace>/private/<key>.json`` before any
        case is read, so an error naming ``case_0007`` can be traced there; it is never logged.
        """
        index, _ = ingest_dataset(
            inputs["source"],
            params,
            outputs["dataset"],
            seed=context.seed,
            progress=context.progress,
            on_discovered=context.keep_private,
        )
        decided = index.preprocessing.normalize
        logged: dict[str, object] = {"plan.normalize": decided.method}
        if decided.method == "ct_zscore":  # dataset constants: window (HU), mean, std
            logged |= {
                "plan.normalize_window": list(decided.window),
                "plan.normalize_mean": decided.mean,
                "plan.normalize_std": decided.std,
            }
        context.log_params(logged)
        counts = {name: len(ids) for name, ids in index.splits.items()}
        full = sum(case.fully_annotated for case in index.cases)
        return {
            "ingest/cases": float(len(index.cases)),
            "ingest/fully_annotated": float(full),
            **{f"ingest/{name}_cases": float(count) for name, count in counts.items()},
        }


STAGE = Ingest()
