"""Stages that talk to a PACS through DICOMweb: fetch series (impure) and store results.

``dicomweb_fetch`` is not pure — the archive changes — so it runs on every workflow run, but
its output (the retrieved files and ``retrieved.json``: instance UIDs and content digests) is
digested like any output, so the stages after it stay cached while the PACS returns the same
content. ``dicomweb_store`` sends the objects of its input (e.g. DICOM SEG) back (STOW-RS).
Neither logs UIDs, descriptions or credentials to MLflow.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from medseg.errors import DataError
from medseg.io.dicomweb import DicomwebEndpoint, DicomwebQuery
from medseg.params import Params
from medseg.runner.contract import Kind, Stage, StageContext, ports


class FetchParams(Params):
    """The DICOMweb service and the query selecting the series to retrieve."""

    endpoint: DicomwebEndpoint
    query: DicomwebQuery


class StoreParams(Params):
    """The DICOMweb service to store into."""

    endpoint: DicomwebEndpoint


class DicomwebFetch(Stage[FetchParams]):
    """The ``dicomweb_fetch`` stage (see ``execute``)."""

    name = "dicomweb_fetch"
    version = 1
    params = FetchParams
    outputs = ports(dicom=Kind.SOURCE)
    pure = False
    description = "query and retrieve series from a PACS (DICOMweb QIDO-RS/WADO-RS); runs every time"

    def execute(
        self,
        context: StageContext,
        params: FetchParams,
        inputs: Mapping[str, Path],
        outputs: Mapping[str, Path],
    ) -> dict[str, float]:
        """Query (QIDO-RS) and retrieve (WADO-RS) the series into ``dicom/<series key>/``."""
        from medseg.io.dicomweb import query_series, retrieve_series

        del inputs
        series = query_series(params.endpoint, params.query)
        context.progress("fetch", 0, len(series))
        instances = retrieve_series(params.endpoint, series, outputs["dicom"])
        record = [
            {
                "series": item.series,
                "sop_instance_uid": item.sop_instance_uid,
                "sha256": item.sha256,
                "file": f"{item.series}/{item.path.name}",
            }
            for item in instances
        ]
        (outputs["dicom"] / "retrieved.json").write_text(json.dumps(record, indent=2))
        context.progress("fetch", len(series), len(series))
        return {"fetch/series": float(len(series)), "fetch/instances": float(len(instances))}


FETCH = DicomwebFetch()


class DicomwebStore(Stage[StoreParams]):
    """The ``dicomweb_store`` stage (see ``execute``)."""

    name = "dicomweb_store"
    version = 1
    params = StoreParams
    inputs = ports(objects=Kind.MASKS)
    outputs = ports(receipt=Kind.RECEIPT)
    pure = False
    description = "store DICOM objects (e.g. SEG) in a PACS (DICOMweb STOW-RS); runs every time"

    def execute(
        self,
        context: StageContext,
        params: StoreParams,
        inputs: Mapping[str, Path],
        outputs: Mapping[str, Path],
    ) -> dict[str, float]:
        """Store every ``.dcm`` file of the ``objects`` input (STOW-RS); record what was stored."""
        from medseg.io.dicomweb import store_instances

        files = sorted(inputs["objects"].glob("*.dcm"))
        if not files:
            raise DataError(
                "the objects input holds no .dcm file to store; write DICOM SEG first (write.format)"
            )
        stored = store_instances(params.endpoint, files)
        (outputs["receipt"] / "stored.json").write_text(
            json.dumps(
                [
                    {"file": path.name, "sop_instance_uid": uid}
                    for path, uid in zip(files, stored, strict=True)
                ],
                indent=2,
            )
        )
        context.progress("store", len(files), len(files))
        return {"store/instances": float(len(stored))}


STORE = DicomwebStore()
