"""The dataset fingerprint: what planning needs to know about a dataset, gathered once at ingest.

Ingest reads every case anyway; it feeds each one to a ``FingerprintBuilder`` and writes the
result as ``fingerprint.json`` beside ``dataset.json``. Nothing here identifies a patient:
shapes, spacings, intensity statistics, class frequencies and object sizes only.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from pydantic import Field
from scipy import ndimage

from medseg.errors import DataError
from medseg.params import Params

FINGERPRINT_FILE = "fingerprint.json"
_SAMPLES_PER_CASE = 10_000  # intensity samples per case and region (nnU-Net draws 10 000 too)


class IntensityStats(Params):
    """Intensity statistics of one image channel in one region, before normalisation.

    Percentiles come from at most 10 000 seeded samples per case; ``mean``/``std`` are over
    the same samples of every case.
    """

    mean: float
    std: float
    p00_5: float
    p50: float
    p99_5: float


RIM_WIDTHS = (1, 2, 3, 4)
"""Rim widths (voxels) ``ObjectStats.rim_split`` is measured at: the border widths a plan picks from
(consecutive from 1: ``rim_split_objects`` grows the rim a voxel at a time)."""


class ObjectStats(Params):
    """Sizes of the labelled objects (instances, or connected components of binary labels).

    Sizes are in voxels of the ingested grid; ``diameter_median`` is the diameter (voxels) of a
    disc (2D) or ball (3D) of the median size. ``rim_split`` (instance labels only, else empty)
    holds, for each rim width of ``RIM_WIDTHS``, the fraction of objects whose inner part
    (:func:`inner_voxels`) is not one connected piece: thin parts (necks, protrusions narrower
    than twice the rim) cut it into several, or the object is all rim. Such objects lose their
    shape under a target that marks every object edge as border (``train.borders``).
    """

    count: int
    per_case_median: float
    size_p05: float
    size_median: float
    size_p95: float
    diameter_median: float
    rim_split: tuple[float, ...] = ()


class Fingerprint(Params):
    """What a dataset is like, as ingested (spacings and shapes on the ingested grid).

    ``instance_labels``: label values are object ids (else classes).
    ``anisotropy`` is the largest median spacing over the smallest (1 = isotropic).
    ``class_fraction`` is each label value's share of all labelled voxels (``"0"`` =
    background). ``intensity_foreground`` / ``intensity_background`` hold one entry per
    channel, of the source intensities inside / outside the labels.
    """

    spatial_dims: int
    channels: int
    cases: int
    trainable_cases: int
    instance_labels: bool
    modality: str | None = None
    spacing_median: tuple[float, ...]
    spacing_min: tuple[float, ...]
    spacing_max: tuple[float, ...]
    anisotropy: float
    shape_median: tuple[int, ...]
    shape_min: tuple[int, ...]
    shape_max: tuple[int, ...]
    intensity_foreground: tuple[IntensityStats, ...] = ()
    intensity_background: tuple[IntensityStats, ...] = ()
    class_fraction: dict[str, float] = Field(default_factory=dict)
    objects: ObjectStats | None = None


def inner_voxels(instances: np.ndarray, width: int) -> np.ndarray:
    """Object voxels with no other label (background or another object) within ``width`` voxels.

    The window is a cube (square in 2D) of side 2 · ``width`` + 1, clipped at the array's edge
    (``nearest``: the edge itself is no boundary).

    Args:
        instances: integer labels ``(*spatial)``, 0 background.
        width: rim width in voxels (≥ 1).

    Returns:
        bool ``(*spatial)``.

    """
    size = 2 * width + 1
    highest = ndimage.maximum_filter(instances, size=size, mode="nearest")
    lowest = ndimage.minimum_filter(instances, size=size, mode="nearest")
    return (instances > 0) & (highest == lowest)


def rim_split_objects(instances: np.ndarray) -> list[int]:
    """Per rim width of ``RIM_WIDTHS``, how many objects' inner voxels are not one connected piece.

    The rims grow one voxel at a time (a 3-wide filter applied again gives the next width's
    window: the same as :func:`inner_voxels` at each width, for a fraction of the cost).

    Args:
        instances: integer labels ``(*spatial)``, 0 background.

    Returns:
        For each width of ``RIM_WIDTHS`` (1, 2, 3, 4), the number of objects with no inner voxel
        or with several inner pieces.

    """
    inside = instances > 0
    objects = np.unique(instances[inside])
    highest = lowest = instances
    counts = []
    for _ in RIM_WIDTHS:
        highest = ndimage.maximum_filter(highest, size=3, mode="nearest")
        lowest = ndimage.minimum_filter(lowest, size=3, mode="nearest")
        inner = inside & (highest == lowest)
        pieces, count = ndimage.label(inner)
        # A piece lies inside one object (inner voxels of two objects are never neighbours):
        # each of its voxels names the same owner.
        owners = np.zeros(count + 1, np.int64)
        owners[pieces[inner]] = instances[inner]
        per_object = np.bincount(owners[1:], minlength=int(instances.max()) + 1)
        counts.append(int(np.count_nonzero(per_object[objects] != 1)))
    return counts


def _stats(samples: list[np.ndarray]) -> IntensityStats | None:
    values = np.concatenate(samples) if samples else np.empty(0)
    if values.size == 0:
        return None
    low, mid, high = (float(v) for v in np.percentile(values, [0.5, 50, 99.5]))
    return IntensityStats(mean=float(values.mean()), std=float(values.std()), p00_5=low, p50=mid, p99_5=high)


class FingerprintBuilder:
    """Accumulates the fingerprint case by case (seeded intensity sampling)."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.shapes: list[tuple[int, ...]] = []
        self.spacings: list[tuple[float, ...]] = []
        self.foreground: list[list[np.ndarray]] = []
        self.background: list[list[np.ndarray]] = []
        self.class_voxels: dict[int, int] = {}
        self.object_sizes: list[np.ndarray] = []
        self.rim_split = np.zeros(len(RIM_WIDTHS), np.int64)
        self.objects_per_case: list[int] = []
        self.channels = 0
        self.modality: str | None = None
        self.instances = False

    def _sample(self, values: np.ndarray) -> np.ndarray:
        if values.size <= _SAMPLES_PER_CASE:
            return values.astype(np.float64)
        return self.rng.choice(values, _SAMPLES_PER_CASE, replace=False).astype(np.float64)

    def add_intensities(self, image: np.ndarray, label: np.ndarray, modality: str | None) -> None:
        """Sample the source intensities of one case inside and outside its labels.

        Args:
            image: ``(C, *spatial)`` source intensities on the label's grid.
            label: ``(*spatial)`` integer label (0 = background).
            modality: the DICOM modality (``CT``, ``MR``) when the source says so.

        """
        self.channels = image.shape[0]
        self.modality = self.modality or modality
        inside = label > 0
        while len(self.foreground) < self.channels:
            self.foreground.append([])
            self.background.append([])
        for channel in range(self.channels):
            self.foreground[channel].append(self._sample(image[channel][inside]))
            self.background[channel].append(self._sample(image[channel][~inside]))

    def add_labels(self, label: np.ndarray, spacing: tuple[float, ...], *, instances: bool) -> None:
        """Count one case's classes and objects on the ingested grid.

        Args:
            label: ``(*spatial)`` ingested label (instance ids, or classes).
            spacing: voxel spacing in mm (array axis order).
            instances: label values are object ids (else objects are connected components).

        """
        self.instances = instances
        self.shapes.append(tuple(int(s) for s in label.shape))
        self.spacings.append(tuple(float(s) for s in spacing))
        values, counts = np.unique(label if not instances else (label > 0), return_counts=True)
        for value, count in zip(values.tolist(), counts.tolist(), strict=True):
            self.class_voxels[int(value)] = self.class_voxels.get(int(value), 0) + int(count)
        objects = label if instances else ndimage.label(label > 0)[0]
        sizes = np.bincount(objects.ravel().astype(np.int64))[1:]
        sizes = sizes[sizes > 0]
        self.object_sizes.append(sizes)
        self.objects_per_case.append(int(sizes.size))
        if instances and sizes.size:
            self.rim_split += rim_split_objects(label)

    def foreground_stats(self) -> IntensityStats | None:
        """Statistics of the first channel's labelled voxels over every case so far (None: none)."""
        return _stats(self.foreground[0]) if self.foreground else None

    def build(self, *, spatial_dims: int, trainable_cases: int) -> Fingerprint:
        """The fingerprint of every case added so far.

        Raises:
            DataError: no case was added.

        """
        if not self.shapes:
            raise DataError("the dataset has no case to fingerprint; check the data input")
        spacings, shapes = np.array(self.spacings), np.array(self.shapes)
        median_spacing = tuple(float(v) for v in np.median(spacings, axis=0))
        sizes = np.concatenate(self.object_sizes) if self.object_sizes else np.empty(0)
        objects = None
        if sizes.size:
            median = float(np.median(sizes))
            diameter = (
                2 * math.sqrt(median / math.pi)
                if spatial_dims == 2
                else 2 * (3 * median / (4 * math.pi)) ** (1 / 3)
            )
            objects = ObjectStats(
                count=int(sizes.size),
                per_case_median=float(np.median(self.objects_per_case)),
                size_p05=float(np.percentile(sizes, 5)),
                size_median=median,
                size_p95=float(np.percentile(sizes, 95)),
                diameter_median=round(diameter, 2),
                rim_split=tuple(round(float(n) / sizes.size, 4) for n in self.rim_split)
                if self.instances
                else (),
            )
        total = sum(self.class_voxels.values())
        fore = [_stats(samples) for samples in self.foreground]
        back = [_stats(samples) for samples in self.background]
        return Fingerprint(
            spatial_dims=spatial_dims,
            channels=self.channels,
            cases=len(self.shapes),
            trainable_cases=trainable_cases,
            instance_labels=self.instances,
            modality=self.modality,
            spacing_median=median_spacing,
            spacing_min=tuple(float(v) for v in spacings.min(axis=0)),
            spacing_max=tuple(float(v) for v in spacings.max(axis=0)),
            anisotropy=round(max(median_spacing) / max(min(median_spacing), 1e-9), 3),
            shape_median=tuple(int(v) for v in np.median(shapes, axis=0)),
            shape_min=tuple(int(v) for v in shapes.min(axis=0)),
            shape_max=tuple(int(v) for v in shapes.max(axis=0)),
            intensity_foreground=tuple(s for s in fore if s is not None),
            intensity_background=tuple(s for s in back if s is not None),
            class_fraction={str(k): round(v / total, 6) for k, v in sorted(self.class_voxels.items())},
            objects=objects,
        )


def write_fingerprint(folder: Path, fingerprint: Fingerprint) -> Path:
    """Write ``fingerprint.json`` into a dataset folder and return its path."""
    path = folder / FINGERPRINT_FILE
    path.write_text(json.dumps(fingerprint.model_dump(mode="json"), indent=2))
    return path


def read_fingerprint(folder: Path) -> Fingerprint:
    """Read the fingerprint of an ingested dataset.

    Raises:
        DataError: the dataset predates fingerprints (rerun ingest) or the file is damaged.

    """
    path = folder / FINGERPRINT_FILE
    if not path.is_file():
        raise DataError(f"{FINGERPRINT_FILE} not found in the dataset input; rerun the ingest stage")
    try:
        return Fingerprint.model_validate_json(path.read_text())
    except ValueError as exc:
        raise DataError(f"{FINGERPRINT_FILE} of the dataset input is damaged ({exc}); rerun ingest") from exc
