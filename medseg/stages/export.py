"""Export stage: trained model → TorchScript + model card, logged as an MLflow model."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated

from pydantic import Field, model_validator

from medseg.params import Params
from medseg.runner.contract import Kind, Stage, StageContext, ports

PORTABLE_FORMATS = {
    "model.pt2": (
        "torch.export ExportedProgram (PyTorch's current format): "
        "torch.export.load(path).module()(image); batch and spatial sizes dynamic"
    ),
    "model.onnx": "ONNX: input 'image' → output 'logits'; batch and spatial sizes dynamic",
    "model.ts": "TorchScript; deprecated from PyTorch 2.9, kept while PyTorch supports it",
    "weights.pt": "tensors only: Segmenter rebuilds the net from this card (weights_only)",
}
"""The export's files and how to run each, as the model card lists them."""
_RESERVED_ALIAS = re.compile(r"latest|[vV][0-9]+")
"""Alias names MLflow reserves (``latest``, ``v<number>``)."""


class SegmentParams(Params):
    """What the predicted objects are, for DICOM SEG segment descriptions and the model card.

    ``category`` and ``property_type`` are SNOMED CT codes (code value, meaning); the
    defaults say "Tissue", which fits any object. Example: ``{label: liver, category:
    ["123037004", "Anatomical Structure"], property_type: ["10200004", "Liver"]}``.
    """

    label: str = Field("foreground", min_length=1, max_length=64)
    category: tuple[str, str] = ("85756007", "Tissue")
    property_type: tuple[str, str] = ("85756007", "Tissue")


class ExportParams(Params):
    """What to export.

    ``torch_export``: also write ``model.pt2``, a ``torch.export`` program (PyTorch's successor
    to TorchScript; about 2-4 s per export on a CPU).

    ``register_as`` names a model in the MLflow registry (a new version per export);
    ``aliases`` (e.g. ``champion``) are pointed at that version.
    """

    mlflow_model: bool = True
    torch_export: bool = True
    register_as: str | None = Field(None, min_length=1, max_length=256)
    aliases: tuple[Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,255}$")], ...] = ()
    segment: SegmentParams = SegmentParams()

    @model_validator(mode="after")
    def _aliases_need_registration(self) -> ExportParams:
        if self.aliases and not (self.register_as and self.mlflow_model):
            raise ValueError("aliases need register_as (and mlflow_model: true); name the registered model")
        reserved = [alias for alias in self.aliases if _RESERVED_ALIAS.fullmatch(alias)]
        if reserved:
            raise ValueError(f"aliases {reserved} are reserved by MLflow; pick names such as 'champion'")
        return self


class Export(Stage[ExportParams]):
    """The ``export`` stage (see ``execute``)."""

    name = "export"
    version = 8
    params = ExportParams
    inputs = ports(model=Kind.MODEL, dataset=Kind.DATASET, report=Kind.REPORT)
    outputs = ports(export=Kind.EXPORT)
    description = (
        "torch.export, ONNX and TorchScript export (parity checked), model card, MLflow model, registry"
    )

    def execute(
        self,
        context: StageContext,
        params: ExportParams,
        inputs: Mapping[str, Path],
        outputs: Mapping[str, Path],
    ) -> dict[str, float]:
        """Write weights, TorchScript, ONNX and the model card; log (and register) the MLflow model."""
        import shutil

        import torch

        from medseg._version import __version__
        from medseg.export.onnx import ONNX_EXPORTERS, export_onnx, onnx_parity
        from medseg.export.program import export_program, program_parity
        from medseg.export.torchscript import export_torchscript, max_abs_difference
        from medseg.inference.card import SegmentRecord
        from medseg.inference.model import load_model
        from medseg.io.dataset import load_case, read_index
        from medseg.runner.cache import library_versions

        folder, target = inputs["dataset"], outputs["export"]
        net, card = load_model(inputs["model"], torch.device("cpu"))
        index = read_index(folder)
        record = (index.split("test") or list(index.cases))[0]
        image, _ = load_case(folder, record)
        settings = card.inference
        roi = settings.roi_size
        divisors = card.net.size_divisors(card.spatial_dims)
        corner = tuple(
            slice(0, min(size, extent)) for size, extent in zip(roi, image.spatial_shape, strict=True)
        )
        example = torch.as_tensor(image.array[(slice(None), *corner)][None], dtype=torch.float32)
        module = export_torchscript(net, example, target / "model.ts")
        parity = max_abs_difference(net, module, example)  # a window: whole images need not fit the strides
        shutil.copyfile(inputs["model"] / "weights.pt", target / "weights.pt")
        # Real windows of the test image: the export size, and a batch of two at another size.
        other = tuple(
            slice(0, max(divisor, (extent // 2) // divisor * divisor))
            for extent, divisor in zip(image.spatial_shape, divisors, strict=True)
        )
        second = torch.as_tensor(image.array[(slice(None), *other)][None], dtype=torch.float32).repeat(
            2, 1, *[1] * len(other)
        )
        formats = dict(PORTABLE_FORMATS)
        metrics = {"export/torchscript_max_abs_diff": parity}
        program = None
        if params.torch_export:
            program = export_program(net, example, divisors, target / "model.pt2")
            metrics["export/pt2_max_abs_diff"] = program_parity(net, target / "model.pt2", [example, second])
        else:
            del formats["model.pt2"]
        exporter, fallback = export_onnx(net, example, target / "model.onnx", program=program)
        metrics["export/onnx_max_abs_diff"] = onnx_parity(net, target / "model.onnx", [example, second])
        written_by = ONNX_EXPORTERS[exporter] + (f" ({fallback})" if fallback else "")
        formats["model.onnx"] += f"; written by the {written_by}"

        summary_path = inputs["report"] / "summary.json"
        exported = card.model_copy(
            update={
                "name": params.register_as or context.stage,
                "intended_use": (
                    "research use: segmentation of images like the training data; "
                    "not a medical device, not for diagnosis"
                ),
                "segments": (SegmentRecord(**params.segment.model_dump()),),
                "input": "float32 (N, C, *spatial), preprocessed as 'preprocessing' says",
                "output": "int64 (N, *spatial) class labels (see 'labels'); instances as 'task' says",
                "formats": formats,
                "evaluation": json.loads(summary_path.read_text()),
                "versions": library_versions(),
                "medseg_version": __version__,
            }
        )
        exported.write(target / "model_card.json")
        context.log_artifact(target / "model_card.json")
        if params.mlflow_model:
            info = context.log_model(target, registered_name=params.register_as, aliases=params.aliases)
            (target / "mlflow_model.json").write_text(
                json.dumps({"registered_name": info.registered_name, "version": info.registered_version})
            )
        return metrics


STAGE = Export()
