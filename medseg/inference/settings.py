"""Inference settings stored in a model card (no torch import: config validation uses it)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

TargetKind = Literal["foreground", "boundary"]
"""What a net predicts: background/object, or background/interior/border."""

BorderKind = Literal["all", "touching"]
"""Which object pixels a ``boundary`` target marks as border (``training.targets.boundary_target``)."""


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
        split_level: divide an object whose core — voxels deeper (distance to its edge) than
            this fraction of its greatest depth — is several pieces among them, each voxel to its
            nearest piece: two touching round objects that came out as one
            (``split_touching``); None leaves objects whole.
        foreground_threshold: voxels whose foreground probability (1 − the background's) is at
            least this are objects, each of its most probable object class; None takes the
            argmax over all classes. Moves every object's edge: a net whose objects come out
            a little small or large is corrected on validation data (``inference.tuning``).
        edge_shift: voxels every object's surface moves once objects are labelled and
            filtered by size: inward when negative, outward into background when positive, 0
            leaves them (``predict.shift_edges``). Corrects a net that draws objects a voxel fat or
            thin all round with probabilities too confident for ``foreground_threshold`` to move
            the edge; chosen on validation data.
        seed_split_size: ``boundary`` seeds only: a seed that breaks, at a higher interior
            probability, into two or more pieces of at least this many voxels is one seed per
            piece (``predict.layered_seeds``): two touching objects whose shared border the net
            draws faintly. None (cards before post-processing v9) keeps each seed whole.
        smoothing: Gaussian σ in voxels, along every spatial axis, applied to the class
            probabilities before anything is read from them (``predict.smoothed_logits``): a
            net's voxel-to-voxel noise on faint, noisy images leaves ragged edges and specks;
            0 (cards before post-processing v12) leaves the probabilities as predicted.
        mirror: predict the image and its mirrors along every combination of spatial axes
            (4 passes in 2D, 8 in 3D: nnU-Net's test-time mirroring) and average their class
            probabilities (``predict.predict_logits``) before anything else; chosen on validation
            data (post-processing v13; False in earlier cards).

    """

    roi_size: tuple[int, ...]
    overlap: float
    min_object_size: int
    fill_holes: bool
    target: TargetKind = "foreground"
    seed_threshold: float | None = None
    keep_largest: bool = False
    split_level: float | None = None
    foreground_threshold: float | None = None
    edge_shift: int = 0
    seed_split_size: int | None = None
    smoothing: float = 0.0
    mirror: bool = False

    def with_postprocessing(
        self,
        *,
        min_object_size: int,
        fill_holes: bool,
        seed_threshold: float | None,
        keep_largest: bool,
        split_level: float | None,
        foreground_threshold: float | None,
        edge_shift: int,
    ) -> InferenceSettings:
        """These settings with other post-processing values."""
        return replace(
            self,
            min_object_size=min_object_size,
            fill_holes=fill_holes,
            seed_threshold=seed_threshold,
            keep_largest=keep_largest,
            split_level=split_level,
            foreground_threshold=foreground_threshold,
            edge_shift=edge_shift,
        )
