"""Inference settings stored in a model card (no torch import: config validation uses it)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

TargetKind = Literal["foreground", "boundary"]
"""What a net predicts: background/object, or background/interior/border."""


@dataclass(frozen=True)
class InferenceSettings:
    """How a model turns an image into instances; stored in the model card.

    Attributes:
        roi_size: sliding-window size in voxels (array axis order).
        overlap: window overlap fraction.
        min_object_size: smallest instance kept, in voxels.
        fill_holes: fill enclosed background before labelling components.
        target: what the net predicts: ``foreground`` (background/object; instances are
            connected components) or ``boundary`` (background/interior/border; instances
            grow from interior seeds, which splits touching objects).
        seed_threshold: ``boundary`` only: seeds are foreground pixels whose interior
            probability is at least this; None takes the argmax's interior class.
        keep_largest: keep only the largest object (one organ / lesion per image).

    """

    roi_size: tuple[int, ...]
    overlap: float
    min_object_size: int
    fill_holes: bool
    target: TargetKind = "foreground"
    seed_threshold: float | None = None
    keep_largest: bool = False

    @classmethod
    def from_card(cls, card: Mapping[str, Any]) -> InferenceSettings:
        """Read the ``inference`` section of a model card."""
        section = card["inference"]
        threshold = section.get("seed_threshold")
        return cls(
            roi_size=tuple(int(size) for size in section["roi_size"]),
            overlap=float(section["overlap"]),
            min_object_size=int(section["min_object_size"]),
            fill_holes=bool(section["fill_holes"]),
            target="boundary" if section.get("target") == "boundary" else "foreground",
            seed_threshold=None if threshold is None else float(threshold),
            keep_largest=bool(section.get("keep_largest", False)),
        )

    def with_postprocessing(
        self, *, min_object_size: int, fill_holes: bool, seed_threshold: float | None, keep_largest: bool
    ) -> InferenceSettings:
        """These settings with other post-processing values."""
        return replace(
            self,
            min_object_size=min_object_size,
            fill_holes=fill_holes,
            seed_threshold=seed_threshold,
            keep_largest=keep_largest,
        )

    def as_card(self) -> dict[str, Any]:
        """The ``inference`` section of a model card."""
        return {**asdict(self), "roi_size": list(self.roi_size)}
