"""One preprocessing for training and inference: read, reorient, resample, normalise.

Ingest builds a ``Preprocessing`` from its params, applies it to every case and stores it in
``dataset.json``; training copies it into the model card; ``Segmenter.predict`` applies the
same object to a new image. There is no second implementation to drift from this one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from medseg.errors import DataError
from medseg.io.dicom import SeriesRules
from medseg.io.geometry import canonical, resample_to_grid, resample_to_spacing
from medseg.io.readers import read_image
from medseg.io.volume import Volume
from medseg.params import Params


class NormalizeParams(Params):
    """Deterministic intensity normalisation, applied per image and channel.

    - ``percentile`` maps the ``lower``/``upper`` percentiles of each image to 0/1 (microscopy);
    - ``ct`` clips to the ``window`` in Hounsfield units and maps it to 0/1;
    - ``ct_zscore`` clips to the ``window`` and subtracts ``mean``, divides by ``std`` — dataset
      constants (nnU-Net's CT scheme: the 0.5 / 99.5 percentiles, mean and standard deviation of
      the labelled voxels of all training images);
    - ``zscore`` subtracts the mean and divides by the standard deviation of each image (MR);
    - ``none`` keeps the values;
    - ``auto`` is decided by ingest from the data: CT (DICOM modality) → ``ct_zscore`` with
      the dataset's foreground statistics, MR or other 3D volumes → ``zscore``, 2D images
      (microscopy) → ``percentile``. The decided scheme is what ``dataset.json`` and the model
      card hold.
    """

    method: Literal["auto", "percentile", "ct", "ct_zscore", "zscore", "none"] = "percentile"
    lower: float = Field(1.0, ge=0, lt=100)
    upper: float = Field(99.8, gt=0, le=100)
    window: tuple[float, float] = (-1000.0, 1000.0)
    mean: float = 0.0
    std: float = Field(1.0, gt=0)


def normalize_intensity(image: np.ndarray, params: NormalizeParams) -> np.ndarray:
    """Normalise an image array to float32 (any shape) as ``params`` says (one float32 copy).

    Raises:
        ValueError: the image holds NaN or infinite values.

    """
    data = image.astype(np.float32)  # the only copy: the steps below work in place
    if not np.isfinite(data).all():
        raise ValueError("image has NaN or infinite values")
    if params.method == "auto":
        raise ValueError("normalisation 'auto' must be decided by ingest before it is applied")
    if params.method == "none":
        return data
    if params.method == "ct_zscore":
        np.clip(data, *params.window, out=data)
        data -= np.float32(params.mean)
        data /= np.float32(params.std)
        return data
    if params.method == "zscore":
        scale = max(float(data.std()), 1e-6)
        data -= data.mean()
    else:
        if params.method == "ct":
            low, high = params.window
            np.clip(data, low, high, out=data)
        else:
            low, high = (float(v) for v in np.percentile(data, [params.lower, params.upper]))
        scale = max(high - low, 1e-6)
        data -= np.float32(low)
    data /= np.float32(scale)
    return data


class Preprocessing(Params):
    """What turns a source image into what the net sees (and the labels back into source space).

    Attributes:
        spatial_dims: 2 or 3; None until ingest has read the first case.
        channels: image channels; None until ingest has read the first case.
        orientation: ``RAS``: 3D volumes are reoriented to RAS+ (2D images stay as stored).
        spacing: target voxel spacing in mm (array axis order) for 3D volumes, or None (kept).
        normalize: the intensity normalisation, per channel.
        series: which stacks of a DICOM folder make the image (and its channels).

    """

    spatial_dims: Literal[2, 3] | None = None
    channels: int | None = Field(None, ge=1)
    orientation: Literal["RAS", "as stored"] = "RAS"
    spacing: tuple[float, ...] | None = None
    normalize: NormalizeParams = NormalizeParams()
    series: SeriesRules = SeriesRules()

    def read(self, source: Path) -> Volume:
        """Read an image file or DICOM series folder (stacks chosen by ``series``)."""
        return read_image(source, series=self.series)

    def check(self, volume: Volume) -> None:
        """Refuse an image of another dimensionality or channel count than the training data.

        Raises:
            DataError: naming the shape found and the one expected.

        """
        channels = volume.array.shape[0]
        if volume.spatial_dims != self.spatial_dims or (
            self.channels is not None and channels != self.channels
        ):
            raise DataError(
                f"image of shape {volume.array.shape} does not fit the model "
                f"({self.channels} channel(s), {self.spatial_dims}D); pass a {self.spatial_dims}D image"
            )

    def orient(self, volume: Volume) -> Volume:
        """A 3D volume in RAS+ when ``orientation`` says so; otherwise ``volume`` itself."""
        return canonical(volume) if self.orientation == "RAS" and volume.spatial_dims == 3 else volume

    def resample(self, volume: Volume, *, order: int) -> Volume:
        """A 3D volume at ``spacing`` (``order`` 1 for images, 0 for labels); otherwise itself."""
        if self.spacing is None or volume.spatial_dims != 3:
            return volume
        return resample_to_spacing(volume, self.spacing, order=order)

    def normalize_image(self, volume: Volume) -> Volume:
        """The image with every channel normalised (float32).

        Raises:
            DataError: the image holds NaN or infinite values.

        """
        try:
            if volume.array.shape[0] == 1:  # no stacking copy for one channel
                data = normalize_intensity(volume.array[0], self.normalize)[None]
            else:
                data = np.stack([normalize_intensity(channel, self.normalize) for channel in volume.array])
        except ValueError as exc:
            raise DataError(f"image: {exc}; fix or remove the image") from exc
        return Volume(data, volume.affine, kind="image", meta=dict(volume.meta))

    def finish(self, oriented: Volume) -> Volume:
        """Resample and normalise an image already passed through ``orient``."""
        return self.normalize_image(self.resample(oriented, order=1))

    def apply(self, image: Volume) -> Volume:
        """The image as the net sees it: ``orient``, ``resample``, ``normalize_image``."""
        return self.finish(self.orient(image))

    def restore(self, labels: Volume, source: Volume) -> Volume:
        """Labels predicted on ``apply(source)`` put back onto ``source``'s voxel grid (nearest)."""
        if labels.spatial_shape == source.spatial_shape and np.allclose(labels.affine, source.affine):
            return labels
        return resample_to_grid(labels, source.spatial_shape, source.affine, order=0)
