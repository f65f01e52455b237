"""Stages of the predict pipeline: images in → labels by an exported model → masks written.

``ingest_images`` reads a cohort (image files or DICOM series folders) into pseudonymous
cases, ``predict`` segments them with the ``Segmenter`` (preprocessing from the model card,
labels in each case's geometry), ``write_masks`` writes them as NIfTI, TIFF or DICOM SEG
referencing the source series.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path

from medseg.errors import DataError
from medseg.inference.executors import ExecutorParams, executor_field
from medseg.io.cohort import OutputFormat
from medseg.io.dicom import SeriesRules
from medseg.params import Params
from medseg.runner.contract import Kind, Stage, StageContext, ports

IMAGES_FILE = "images.json"


class IngestImagesParams(Params):
    """Which series to take from DICOM folders (all image series by default)."""

    series: SeriesRules = SeriesRules()


class PredictParams(Params):
    """How each case is segmented: mirroring, device and executor.

    ``flip_tta`` mirrors each image along every axis combination (true), never (false), or as
    the model card's ``inference.mirror`` says (null, the default); ``device``: cpu, cuda...

    ``executor`` says where the cases are segmented: this process (``kind: local``, the default)
    or a Ray cluster (``kind: ray``, see ``ExecutorParams``); the outputs are the same, and the
    executor is not part of the cache key.
    """

    flip_tta: bool | None = None
    device: str = "cpu"
    executor: ExecutorParams = executor_field()


class WriteParams(Params):
    """Output format of the masks: ``nifti`` (instances), ``tiff`` (instances, 2D) or ``dicom-seg``."""

    format: OutputFormat = "nifti"


def _records(images: Path) -> list[dict[str, object]]:
    path = images / IMAGES_FILE
    if not path.is_file():
        raise DataError(f"{IMAGES_FILE} not found in the images input; run the ingest_images stage first")
    return list(json.loads(path.read_text())["cases"])


class IngestImages(Stage[IngestImagesParams]):
    """The ``ingest_images`` stage (see ``execute``)."""

    name = "ingest_images"
    version = 2
    params = IngestImagesParams
    inputs = ports(source=Kind.SOURCE)
    outputs = ports(images=Kind.IMAGES)
    description = "read a cohort (image files or DICOM series folders) into pseudonymous cases, no labels"

    def execute(
        self,
        context: StageContext,
        params: IngestImagesParams,
        inputs: Mapping[str, Path],
        outputs: Mapping[str, Path],
    ) -> dict[str, float]:
        """Read every case of the ``source`` input into ``cases/case_XXXX/image.nii.gz`` (no labels)."""
        from medseg.io.cohort import discover_images
        from medseg.io.readers import read_image, write_image

        found = discover_images(inputs["source"])
        ids = [f"case_{number:04d}" for number in range(1, len(found) + 1)]
        context.keep_private(
            {
                case: str(path.relative_to(inputs["source"]))
                for case, (_, path) in zip(ids, found, strict=True)
            }
        )
        records = []
        for number, (case_id, (_, path)) in enumerate(zip(ids, found, strict=True), start=1):
            try:
                volume = read_image(path, series=params.series)
            except DataError as exc:
                raise DataError(
                    f"case {case_id}: {exc} (its source is in the workspace's private/ case map)"
                ) from exc
            folder = outputs["images"] / "cases" / case_id
            folder.mkdir(parents=True)
            write_image(volume, folder / "image.nii.gz")
            records.append(
                {
                    "case_id": case_id,
                    "image": f"cases/{case_id}/image.nii.gz",
                    "shape": list(volume.spatial_shape),
                    "spacing": list(volume.spacing),
                    "series": volume.meta.get("series"),
                }
            )
            context.progress("ingest", number, len(found))
        (outputs["images"] / IMAGES_FILE).write_text(json.dumps({"cases": records}, indent=2))
        dicom = sum(record["series"] is not None for record in records)
        return {"ingest/cases": float(len(records)), "ingest/dicom_series": float(dicom)}


INGEST_IMAGES = IngestImages()


class Predict(Stage[PredictParams]):
    """The ``predict`` stage (see ``execute``)."""

    name = "predict"
    version = 2
    params = PredictParams
    inputs = ports(images=Kind.IMAGES, model=Kind.EXPORT)
    outputs = ports(labels=Kind.LABELS)
    description = "segment every case with an exported model, labels in each case's geometry"

    def execute(
        self,
        context: StageContext,
        params: PredictParams,
        inputs: Mapping[str, Path],
        outputs: Mapping[str, Path],
    ) -> dict[str, float]:
        """Segment every case with the exported model; write labels and ``predictions.csv``.

        Every case is attempted; a case that fails is named with its cause after the others
        are done, and the stage fails (nothing is cached).
        """
        import numpy as np

        from medseg.inference.executors import CaseJob, CaseOutcome, segment_cases
        from medseg.io.cohort import label_summary
        from medseg.io.readers import write_image

        records = _records(inputs["images"])
        jobs = [CaseJob(record["case_id"], inputs["images"] / record["image"]) for record in records]
        summaries: dict[str, dict[str, object]] = {}
        failures: dict[str, str] = {}

        def write(outcome: CaseOutcome) -> None:
            if outcome.labels is None:
                failures[outcome.case_id] = outcome.error or "not segmented"
            else:
                folder = outputs["labels"] / "cases" / outcome.case_id
                folder.mkdir(parents=True)
                write_image(outcome.labels, folder / "label.nii.gz")
                summaries[outcome.case_id] = label_summary(outcome.labels)
            context.progress("predict", len(summaries) + len(failures), len(records))

        segment_cases(
            inputs["model"], jobs, params.executor, write, device=params.device, flip_tta=params.flip_tta
        )
        if failures:
            listed = "; ".join(f"case {case_id}: {error}" for case_id, error in sorted(failures.items()))
            raise DataError(f"{len(failures)} of {len(records)} case(s) failed ({listed})")
        rows = [{"case_id": record["case_id"], **summaries[record["case_id"]]} for record in records]
        table = outputs["labels"] / "predictions.csv"
        with table.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        context.log_artifact(table, "predictions")
        return {
            "predict/cases": float(len(rows)),
            "predict/mean_objects": float(np.mean([row["objects"] for row in rows])),
            "predict/mean_volume_ml": float(np.mean([row["volume_ml"] for row in rows])),
        }


PREDICT = Predict()


class WriteMasks(Stage[WriteParams]):
    """The ``write_masks`` stage (see ``execute``)."""

    name = "write_masks"
    version = 1
    params = WriteParams
    inputs = ports(labels=Kind.LABELS, images=Kind.IMAGES, model=Kind.EXPORT, source=Kind.SOURCE)
    outputs = ports(masks=Kind.MASKS)
    description = "write predicted labels as NIfTI, TIFF or DICOM SEG referencing the source series"

    def execute(
        self,
        context: StageContext,
        params: WriteParams,
        inputs: Mapping[str, Path],
        outputs: Mapping[str, Path],
    ) -> dict[str, float]:
        """Write each case's labels as ``case_XXXX<suffix>``; DICOM SEG references its source series."""
        from medseg.inference.card import ModelCard
        from medseg.io.cohort import OUTPUT_SUFFIX
        from medseg.io.dicom import index_dicom
        from medseg.io.readers import read_image

        card = ModelCard.read(inputs["model"] / "model_card.json")
        records = _records(inputs["images"])
        series = {}
        if params.format == "dicom-seg":
            series = {item.key: item for item in index_dicom(inputs["source"]).series}
        suffix = OUTPUT_SUFFIX[params.format]
        for number, record in enumerate(records, start=1):
            case_id = record["case_id"]
            labels = read_image(inputs["labels"] / "cases" / case_id / "label.nii.gz", kind="label")
            if params.format == "dicom-seg" and record["series"] not in series:
                raise DataError(
                    f"case {case_id}: no DICOM series in the source to reference (it was not read from "
                    "DICOM, or the source changed); write.format: nifti writes any case"
                )
            try:
                card.write_labels(
                    labels,
                    outputs["masks"] / f"{case_id}{suffix}",
                    params.format,
                    series=series.get(str(record["series"])),
                )
            except DataError as exc:
                raise DataError(f"case {case_id}: {exc}") from exc
            context.progress("write", number, len(records))
        return {"write/files": float(len(records))}


WRITE_MASKS = WriteMasks()
