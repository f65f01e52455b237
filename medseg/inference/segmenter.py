"""``Segmenter``: load an exported model and segment images in their own geometry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg.errors import DataError
from medseg.inference.predict import segment_instances
from medseg.inference.settings import InferenceSettings
from medseg.io.geometry import canonical, resample_to_grid, resample_to_spacing
from medseg.io.ingest import NormalizeParams, normalize_intensity
from medseg.io.readers import read_image
from medseg.io.volume import Volume, affine_from_spacing


class Segmenter:
    """Segment images with an exported medseg model (``model.ts`` + ``model_card.json``).

    The preprocessing (intensity normalisation) and post-processing (instances from
    connected components) come from the model card, not from the caller. ``predict`` keeps
    no state between calls and may be called from several threads at once.
    """

    def __init__(self, module: torch.jit.ScriptModule, card: dict[str, Any], device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.module = module.to(self.device).eval()
        self.card = card

    @classmethod
    def from_export(cls, folder: str | Path, *, device: str = "cpu") -> Segmenter:
        """Load from an export folder written by the export stage.

        Raises:
            DataError: the folder lacks ``model.ts`` or ``model_card.json``.

        """
        folder = Path(folder)
        module_path, card_path = folder / "model.ts", folder / "model_card.json"
        if not module_path.is_file() or not card_path.is_file():
            raise DataError(
                f"'{folder.name}' is not a medseg export (model.ts and model_card.json needed); "
                "point at the export stage's output folder"
            )
        card = json.loads(card_path.read_text())
        return cls(torch.jit.load(str(module_path), map_location="cpu"), card, device)

    def predict(
        self, image: Volume | np.ndarray | str | Path, *, spacing: tuple[float, ...] | None = None
    ) -> Volume:
        """Segment one image; return an int32 instance label ``Volume`` in its geometry.

        3D images are first brought into the training geometry recorded in the model card
        (RAS+ orientation, ingest spacing) and the labels are mapped back onto the input's
        voxel grid, so the result has the input's shape and affine.

        Args:
            image: a ``Volume`` ``(C, *spatial)``, an array ``(*spatial)`` or ``(C, *spatial)``
                (with ``spacing`` in mm), or a path to a TIFF/PNG/NIfTI file.
            spacing: voxel spacing in mm for array input.

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
        data = np.stack([normalize_intensity(channel, intensity) for channel in work.array])
        labels = segment_instances(
            self.module, data, InferenceSettings.from_card(self.card), device=self.device
        )
        result = Volume(labels[None], work.affine, kind="label", meta=dict(volume.meta))
        if work is not volume:  # back onto the caller's voxel grid (nearest neighbour, exact if equal)
            result = resample_to_grid(result, volume.spatial_shape, volume.affine, order=0)
        return result

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
