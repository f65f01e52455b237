"""The canonical ingested dataset: ``dataset.json`` plus one folder per case.

::

    dataset.json
    cases/case_0001/image.nii.gz     float32, normalised, shape (*spatial)
    cases/case_0001/label.nii.gz     int32 instance (or class) labels, same shape

``dataset.json`` holds pseudonymous case ids only; the map to the sources is kept apart, in
the workspace's private folder.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from medseg.errors import DataError
from medseg.io.preprocessing import Preprocessing
from medseg.io.readers import read_image
from medseg.io.volume import Volume

DATASET_FILE = "dataset.json"
FORMAT = "medseg-dataset/2"
"""Version 2: ``preprocessing`` is the whole ``Preprocessing`` (it replaced ``intensity``)."""
SplitName = Literal["train", "val", "test"]


@dataclass(frozen=True)
class CaseRecord:
    """One case of a canonical dataset (paths relative to the dataset folder).

    ``frame`` is the CTC time-point number, for writing results in the CTC layout;
    ``markers`` the CTC ``TRA`` marker image of the frame (one label per cell), for DET.
    ``ignore`` a uint8 mask ``(1, *spatial)`` of voxels whose label is unknown (an
    ``ignore_label`` region, or an unannotated cell of a sparse CTC frame): left out of the
    loss and of overlap metrics.
    """

    case_id: str
    image: str
    label: str
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    fully_annotated: bool = True
    frame: int | None = None
    markers: str | None = None
    ignore: str | None = None


@dataclass(frozen=True)
class DatasetIndex:
    """The content of ``dataset.json``.

    ``preprocessing`` is what ingest applied to every image (orientation, spacing,
    normalisation, DICOM stack rules); training copies it into the model card and inference
    applies it to new images.
    """

    spatial_dims: int
    channels: int
    labels: dict[str, str]
    instance_labels: bool
    cases: tuple[CaseRecord, ...]
    splits: dict[str, list[str]] = field(default_factory=dict)
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    format: str = FORMAT

    def split(self, name: SplitName) -> list[CaseRecord]:
        """Cases of split ``name``, in dataset order."""
        wanted = set(self.splits.get(name, []))
        return [case for case in self.cases if case.case_id in wanted]


def write_index(folder: Path, index: DatasetIndex) -> Path:
    """Write ``dataset.json`` into ``folder`` and return its path."""
    path = folder / DATASET_FILE
    document = {**asdict(index), "preprocessing": index.preprocessing.model_dump(mode="json")}
    path.write_text(json.dumps(document, indent=2))
    return path


def read_index(folder: Path) -> DatasetIndex:
    """Read ``dataset.json`` from an ingested dataset folder.

    Raises:
        DataError: the file is missing or not a medseg dataset.

    """
    path = folder / DATASET_FILE
    if not path.is_file():
        raise DataError(f"{DATASET_FILE} not found in the dataset input; run the ingest stage first")
    document = json.loads(path.read_text())
    if document.get("format") != FORMAT:
        raise DataError(f"{DATASET_FILE}: format '{document.get('format')}' is not {FORMAT}; re-ingest")
    cases = tuple(
        CaseRecord(**{**case, "shape": tuple(case["shape"]), "spacing": tuple(case["spacing"])})
        for case in document.pop("cases")
    )
    preprocessing = Preprocessing.model_validate(document.pop("preprocessing"))
    return DatasetIndex(cases=cases, preprocessing=preprocessing, **document)


def load_case(folder: Path, case: CaseRecord) -> tuple[Volume, Volume]:
    """Read a case's image ``(1, *spatial)`` float32 and label ``(1, *spatial)`` int32."""
    return read_image(folder / case.image), read_image(folder / case.label, kind="label")


def load_ignore(folder: Path, case: CaseRecord) -> np.ndarray | None:
    """A case's ignore mask ``(*spatial)`` bool (True: label unknown there), or None when it has none."""
    if not case.ignore:
        return None
    return read_image(folder / case.ignore, kind="label").array[0] > 0


def load_markers(folder: Path, case: CaseRecord) -> Volume | None:
    """Read a case's CTC marker labels ``(1, *spatial)``, or None when it has none."""
    return read_image(folder / case.markers, kind="label") if case.markers else None
