"""``Segmenter``: load an exported model and segment images in their own geometry."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg.errors import DataError
from medseg.inference.model import network_from_card
from medseg.inference.predict import segment_instances
from medseg.inference.settings import InferenceSettings
from medseg.io.geometry import canonical, resample_to_grid, resample_to_spacing
from medseg.io.ingest import NormalizeParams, normalize_intensity
from medseg.io.readers import read_image
from medseg.io.volume import Volume, affine_from_spacing

_RUN_ID = re.compile(r"[0-9a-f]{32}")


EXPORT_FILES = ("weights.pt", "model_card.json")
"""What ``Segmenter.from_export`` reads from an export folder (``model.ts``/``model.onnx`` sit beside)."""


class Segmenter:
    """Segment images with an exported medseg model.

    The preprocessing (orientation, spacing, intensity normalisation) and the
    post-processing (instances from the net's classes) come from the model card, not from
    the caller. ``predict`` keeps no state between calls and may be called from several
    threads at once.

    Args:
        module: the network, ``(N, C, *spatial)`` float32 → logits ``(N, classes, *spatial)``.
        card: the model card (``model_card.json`` of an export).
        device: ``cpu``, ``cuda``, ``cuda:1``...

    """

    def __init__(self, module: torch.nn.Module, card: dict[str, Any], device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.module = module.to(self.device).eval()
        self.card = card

    @classmethod
    def load(cls, source: str | Path, *, tracking_uri: str | None = None, device: str = "cpu") -> Segmenter:
        """Load from an export folder, an MLflow model URI or a run id.

        ``source`` is an export folder, ``models:/name/version``, ``models:/name@alias``,
        ``runs:/<run id>/model`` or a run id (a workflow's parent run or its export run).
        MLflow sources are downloaded from ``tracking_uri`` (required for them) into a
        temporary folder and loaded like an export folder.

        Raises:
            DataError: the source is not a medseg export, or its card or weights are unusable.
            TrackingError: the model or run cannot be found or fetched from the store.

        """
        path = Path(source)
        if path.is_dir():
            return cls.from_export(path, device=device)
        text = str(source)
        if not (text.startswith(("models:/", "runs:/")) or _RUN_ID.fullmatch(text)):
            raise DataError(
                f"no export folder at '{path.name}', and it is not a models:/ or runs:/ URI or a run id; "
                "point at an export folder or a registered model"
            )
        if tracking_uri is None:
            raise DataError(f"loading '{text}' needs the MLflow tracking URI (tracking_uri=...)")
        from medseg.tracking.mlflow import download_model

        with tempfile.TemporaryDirectory(prefix="medseg-model-") as folder:
            return cls.from_export(download_model(text, tracking_uri, Path(folder)), device=device)

    @classmethod
    def from_export(cls, folder: str | Path, *, device: str = "cpu") -> Segmenter:
        """Load from an export folder: the net rebuilt from its card, weights loaded weights-only.

        No pickled Python object is ever executed: ``weights.pt`` is read with
        ``torch.load(weights_only=True)`` (tensors only) and the network is built by medseg
        from the card's ``net`` section.

        Raises:
            DataError: the folder lacks ``weights.pt`` or ``model_card.json``, or they disagree.

        """
        folder = Path(folder)
        if not all((folder / name).is_file() for name in EXPORT_FILES):
            raise DataError(
                f"'{folder.name}' is not a medseg export ({' and '.join(EXPORT_FILES)} needed); "
                "point at the export stage's output folder"
            )
        card = json.loads((folder / "model_card.json").read_text())
        net = network_from_card(card, folder / "weights.pt", fix="re-export the model")
        return cls(net, card, device)

    def predict(
        self,
        image: Volume | np.ndarray | str | Path,
        *,
        spacing: tuple[float, ...] | None = None,
        flip_tta: bool = False,
    ) -> Volume:
        """Segment one image; return an int32 instance label ``Volume`` in its geometry.

        3D images are first brought into the training geometry recorded in the model card
        (RAS+ orientation, ingest spacing) and the labels are mapped back onto the input's
        voxel grid, so the result has the input's shape and affine.

        Args:
            image: a ``Volume`` ``(C, *spatial)``, an array ``(*spatial)`` or ``(C, *spatial)``
                (with ``spacing`` in mm), or a path to a TIFF/PNG/NIfTI/NRRD file or a DICOM
                series folder.
            spacing: voxel spacing in mm for array input.
            flip_tta: average the predictions of the image mirrored along every
                combination of axes (2^spatial_dims passes).

        Raises:
            DataError: the image's dimensionality or channel count does not fit the model.

        """
        volume = self._as_volume(image, spacing)
        spatial_dims, channels = int(self.card["spatial_dims"]), int(self.card["in_channels"])
        if volume.spatial_dims != spatial_dims or volume.array.shape[0] != channels:
            raise DataError(
                f"image of shape {volume.array.shape} does not fit the model "
                f"({channels} channel(s), {spatial_dims}D); pass a {spatial_dims}D image"
            )
        work = self._training_geometry(volume)
        intensity = NormalizeParams.model_validate(self.card["intensity"])
        data = (
            normalize_intensity(work.array[0], intensity)[None]  # no stacking copy for one channel
            if channels == 1
            else np.stack([normalize_intensity(channel, intensity) for channel in work.array])
        )
        labels = segment_instances(
            self.module, data, InferenceSettings.from_card(self.card), device=self.device, flip_tta=flip_tta
        )
        result = Volume(labels[None], work.affine, kind="label", meta=dict(volume.meta))
        if work is not volume:  # back onto the caller's voxel grid (nearest neighbour, exact if equal)
            result = resample_to_grid(result, volume.spatial_shape, volume.affine, order=0)
        return result

    def write_dicom_seg(self, labels: Volume, source: str | Path, path: str | Path) -> Path:
        """Write ``labels`` (from ``predict`` on the series in ``source``) as a DICOM SEG.

        The SEG references the source series and describes its segment from the model card
        (``segments``), with medseg as the automatic algorithm.

        Raises:
            DataError: ``source`` is not one referenceable DICOM series, or the labels are not
                on its grid.

        """
        from medseg.inference.cohort import write_labels
        from medseg.io.dicom import find_series

        return write_labels(labels, Path(path), "dicom-seg", card=self.card, series=find_series(Path(source)))

    def _training_geometry(self, volume: Volume) -> Volume:
        """The image in the geometry the model was trained in: RAS+ and the ingest spacing (3D)."""
        if volume.spatial_dims != 3:
            return volume
        steps = self.card.get("preprocessing", {})
        work = canonical(volume) if steps.get("orientation") == "RAS" else volume
        if steps.get("spacing"):
            work = resample_to_spacing(work, tuple(float(v) for v in steps["spacing"]), order=1)
        return work

    @staticmethod
    def _as_volume(image: Volume | np.ndarray | str | Path, spacing: tuple[float, ...] | None) -> Volume:
        if isinstance(image, Volume):
            return image
        if isinstance(image, str | Path):
            return read_image(image)
        array = np.asarray(image)
        if spacing is not None and array.ndim == len(spacing):
            array = array[None]
        dims = array.ndim - 1
        return Volume(array, affine_from_spacing(spacing or (1.0,) * dims))
