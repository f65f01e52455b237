"""``Segmenter``: load an exported model and segment images in their own geometry."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from medseg.errors import DataError
from medseg.inference.card import ModelCard
from medseg.inference.model import network_from_card
from medseg.inference.predict import segment_instances
from medseg.io.volume import Volume, affine_from_spacing

if TYPE_CHECKING:
    from medseg.io.cohort import OutputFormat
    from medseg.io.dicom import DicomSeries

_RUN_ID = re.compile(r"[0-9a-f]{32}")


EXPORT_FILES = ("weights.pt", "model_card.json")
"""What ``Segmenter.from_export`` reads from an export folder (``model.ts``/``model.onnx`` sit beside)."""


class ModelResolver(Protocol):
    """``resolve(source, destination) -> export folder``: fetch a model named by a registry URI.

    ``medseg.model_registry(tracking_uri)`` is MLflow's; any registry can be plugged in.
    """

    def __call__(self, source: str, destination: Path) -> Path:
        """Download ``source`` (``models:/...``, ``runs:/...``, a run id) into ``destination``."""


def fetch_export(source: str | Path, resolver: ModelResolver | None, destination: Path) -> Path:
    """The export folder ``source`` names: itself, or fetched by ``resolver`` into ``destination``.

    ``source`` is an export folder, ``models:/name/version``, ``models:/name@alias``,
    ``runs:/<run id>/model`` or a run id.

    Raises:
        DataError: ``source`` is none of these, or a registry source comes without ``resolver``.
        TrackingError: the model or run cannot be found or fetched from the store.

    """
    path = Path(source)
    if path.is_dir():
        return path
    text = str(source)
    if not (text.startswith(("models:/", "runs:/")) or _RUN_ID.fullmatch(text)):
        raise DataError(
            f"no export folder at '{path.name}', and it is not a models:/ or runs:/ URI or a run id; "
            "point at an export folder or a registered model"
        )
    if resolver is None:
        raise DataError(f"loading '{text}' needs a model registry: resolver=medseg.model_registry(uri)")
    return resolver(text, destination)


class Segmenter:
    """Segment images with an exported medseg model.

    The preprocessing (orientation, spacing, intensity normalisation) and the
    post-processing (instances from the net's classes) come from the model card, not from
    the caller. ``predict`` keeps no state between calls and may be called from several
    threads at once.

    Args:
        module: the network, ``(N, C, *spatial)`` float32 → logits ``(N, classes, *spatial)``.
        card: the model card (``model_card.json`` of an export, as ``ModelCard.read`` gives it).
        device: ``cpu``, ``cuda``, ``cuda:1``...

    """

    def __init__(self, module: torch.nn.Module, card: ModelCard, device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.module = module.to(self.device).eval()
        self.card = card

    @classmethod
    def load(
        cls, source: str | Path, *, resolver: ModelResolver | None = None, device: str = "cpu"
    ) -> Segmenter:
        """Load from an export folder, a registry URI or a run id.

        ``source`` is an export folder, ``models:/name/version``, ``models:/name@alias``,
        ``runs:/<run id>/model`` or a run id (a workflow's parent run or its export run).
        Registry sources are fetched by ``resolver`` (required for them; e.g.
        ``medseg.model_registry(tracking_uri)``) into a temporary folder and loaded like an
        export folder.

        Raises:
            DataError: the source is not a medseg export, or its card or weights are unusable.
            TrackingError: the model or run cannot be found or fetched from the store.

        """
        with tempfile.TemporaryDirectory(prefix="medseg-model-") as folder:
            return cls.from_export(fetch_export(source, resolver, Path(folder)), device=device)

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
        card = ModelCard.read(folder / "model_card.json")
        net = network_from_card(card, folder / "weights.pt", fix="re-export the model")
        return cls(net, card, device)

    def predict(
        self,
        image: Volume | np.ndarray | str | Path,
        *,
        spacing: tuple[float, ...] | None = None,
        flip_tta: bool | None = None,
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
                combination of axes (2^spatial_dims passes) when True, never when False; None
                (the default) does what the card's ``inference.mirror`` says (chosen on
                validation by the postprocess stage).

        Raises:
            DataError: the image's dimensionality or channel count does not fit the model.

        """
        preprocessing = self.card.preprocessing
        volume = self._as_volume(image, spacing)
        preprocessing.check(volume)
        work = preprocessing.apply(volume)
        labels = segment_instances(
            self.module, work.array, self.card.inference, device=self.device, flip_tta=flip_tta
        )
        result = Volume(labels[None], work.affine, kind="label", meta=dict(volume.meta))
        return preprocessing.restore(result, volume)

    def write_dicom_seg(self, labels: Volume, source: str | Path, path: str | Path) -> Path:
        """Write ``labels`` (from ``predict`` on the series in ``source``) as a DICOM SEG.

        The SEG references the source series and describes its segment from the model card
        (``segments``), with medseg as the automatic algorithm.

        Raises:
            DataError: ``source`` is not one referenceable DICOM series, or the labels are not
                on its grid.

        """
        from medseg.io.dicom import find_series

        return self.write_labels(labels, Path(path), "dicom-seg", series=find_series(Path(source)))

    def write_labels(
        self, labels: Volume, path: Path, output_format: OutputFormat, *, series: DicomSeries | None = None
    ) -> Path:
        """Write ``labels`` as NIfTI, TIFF or DICOM SEG (the card's segment; ``series``: its source)."""
        return self.card.write_labels(labels, path, output_format, series=series)

    def _as_volume(
        self, image: Volume | np.ndarray | str | Path, spacing: tuple[float, ...] | None
    ) -> Volume:
        if isinstance(image, Volume):
            return image
        if isinstance(image, str | Path):
            return self.card.preprocessing.read(Path(image))
        array = np.asarray(image)
        if spacing is not None and array.ndim == len(spacing):
            array = array[None]
        dims = array.ndim - 1
        return Volume(array, affine_from_spacing(spacing or (1.0,) * dims))
