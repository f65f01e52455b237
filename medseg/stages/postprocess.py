"""Postprocess stage: trained model + dataset → the same model with post-processing chosen on validation.

The network is not changed. Its weights are linked (or copied): the training's best validation
weights, or its last epoch's where those score higher on validation once each has its own
post-processing chosen (the training's own validation scores fixed post-processing, a noisy
guide on a few validation frames). Each weights' post-processing is chosen on its class
probabilities as predicted and smoothed (``tuning.SMOOTHINGS``), from the image alone and
averaged over its mirrors (``tuning.MIRRORS``), and the best of every (weights, mirroring,
smoothing) triple is kept. The card's ``inference`` section gets the chosen values,
with a ``postprocessing`` section saying how they were chosen and which weights were kept.
The evaluate stage, the export (and so ``Segmenter``, ``medseg predict`` and the MLflow model)
read them from the card, so every consumer applies the same post-processing.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal, cast

import numpy as np
from pydantic import Field

from medseg.params import Params
from medseg.runner.contract import Kind, Stage, StageContext, ports

if TYPE_CHECKING:
    import torch

    from medseg.inference.card import ModelCard, WeightsName
    from medseg.inference.settings import InferenceSettings
    from medseg.inference.tuning import PostprocessingChoice, ValidationCase
    from medseg.io.dataset import CaseRecord
    from medseg.nets.ensemble import FoldEnsemble


class PostprocessParams(Params):
    """Whether and on which split post-processing is chosen.

    ``search: false`` keeps the train stage's values (``train.min_object_size``,
    ``train.fill_holes``) and records that they were set by hand. For a fold ensemble
    (``train.folds``) the choice is made on the out-of-fold predictions of every train and
    val case (each predicted by the fold model that did not train on it); ``split`` is unused.
    ``mirror``: whether test-time mirroring (2^dims passes of the net per image) is chosen on
    validation like the rest (``choose``), or always or never used.
    """

    search: bool = True
    split: Literal["val", "train"] = "val"
    mirror: Literal["choose", "always", "never"] = "choose"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    sw_batch_size: int = Field(4, ge=1)


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard-link ``source`` to ``target`` (same filesystem: no copy of the weights), else copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _out_of_fold(model: Path, folds: int) -> dict[str, int] | None:
    """A fold ensemble's ``case id → fold`` map (each case predicted by the fold that never saw it)."""
    from medseg.inference.model import FOLDS_FILE

    path = model / FOLDS_FILE
    if folds == 1 or not path.is_file():
        return None
    return {case: int(fold) for case, fold in json.loads(path.read_text())["cases"].items()}


class Postprocess(Stage[PostprocessParams]):
    """The ``postprocess`` stage (see ``execute``)."""

    name = "postprocess"
    version = 13
    params = PostprocessParams
    inputs = ports(dataset=Kind.DATASET, model=Kind.MODEL)
    outputs = ports(model=Kind.MODEL)
    description = (
        "choose on validation the weights (best or last epoch) and post-processing: smoothing, object "
        "size, holes, seeds, splits, largest object, edges"
    )

    def execute(
        self,
        context: StageContext,
        params: PostprocessParams,
        inputs: Mapping[str, Path],
        outputs: Mapping[str, Path],
    ) -> dict[str, float]:
        """Choose weights and post-processing on the split; write the model with its updated card."""
        from medseg.inference.card import PostprocessingRecord
        from medseg.inference.model import CARD_FILE, LAST_WEIGHTS_FILE, WEIGHTS_FILE, load_model
        from medseg.inference.tuning import (
            MIRRORS,
            best_candidate,
            choose_postprocessing,
            training_object_sizes,
        )
        from medseg.io.dataset import read_index
        from medseg.io.readers import read_image
        from medseg.runner.cache import ARTIFACT_FILE
        from medseg.training.loop import resolve_device

        folder, model_in, model_out = inputs["dataset"], inputs["model"], outputs["model"]
        index = read_index(folder)
        device = resolve_device(params.device)
        net, card = load_model(model_in, device)
        assignment = _out_of_fold(model_in, card.folds)
        records = (
            index.split(params.split)
            if assignment is None
            else [record for record in index.cases if record.case_id in assignment]
        )
        current = card.inference
        for path in model_in.iterdir():
            if path.is_file() and path.name not in (CARD_FILE, ARTIFACT_FILE):
                _link_or_copy(path, model_out / path.name)
        if not params.search or not records:
            reason = (
                "search disabled (postprocess.search)" if not params.search else f"empty {params.split} split"
            )
            chosen_by = PostprocessingRecord(chosen_by=f"train params ({reason})")
            card.model_copy(update={"postprocessing": chosen_by}).write(model_out / CARD_FILE)
            return {}
        sizes = training_object_sizes(
            [read_image(folder / record.label, kind="label").array[0] for record in index.split("train")],
            instance_labels=index.instance_labels,
        )
        mirrors = {"choose": MIRRORS, "always": (True,), "never": (False,)}[params.mirror]
        choices: dict[tuple[WeightsName, bool, float], PostprocessingChoice] = {}
        for name, candidate in _candidate_weights(net, card, model_in / LAST_WEIGHTS_FILE, device).items():
            for mirror in mirrors:
                trial = replace(current, mirror=mirror)
                sets = _validation_cases(
                    context, candidate, folder, records, assignment, trial, device, params.sw_batch_size, name
                )
                for smoothing, cases in sets.items():
                    choices[name, mirror, smoothing] = choose_postprocessing(
                        cases,
                        replace(trial, smoothing=smoothing),
                        object_sizes=sizes,
                        instance_labels=index.instance_labels,
                    )
                del sets, cases  # one (weights, mirroring)'s validation maps in memory at a time
        weights, mirror, smoothing = _best_choice(choices)
        choice = choices[weights, mirror, smoothing]
        if weights == "last":
            (model_out / WEIGHTS_FILE).unlink()
            _link_or_copy(model_in / LAST_WEIGHTS_FILE, model_out / WEIGHTS_FILE)
        where = (
            f"validation ({params.split} split, {len(records)} cases)"
            if assignment is None
            else f"out-of-fold predictions ({card.folds} folds, {len(records)} cases)"
        )
        kept = {(own, sigma): other for (name, own, sigma), other in choices.items() if name == weights}
        baseline = next(iter(kept.values())).baseline  # the train params: no smoothing, mirroring as asked
        candidates = [candidate for other in kept.values() for candidate in other.candidates]
        weights_scores = {
            name: best_candidate([other.chosen for (own, *_), other in choices.items() if own == name]).score
            for name in dict.fromkeys(name for name, _, _ in choices)
        }
        smoothing_scores = {
            f"{sigma:g}": other.chosen.score for (own, sigma), other in kept.items() if own == mirror
        }
        mirror_scores = {
            _on_off(own): best_candidate([other.chosen for (m, _), other in kept.items() if m == own]).score
            for own in dict.fromkeys(own for own, _ in kept)
        }
        record = PostprocessingRecord(
            chosen_by=where,
            measure=choice.measure,
            score=choice.chosen.score,
            baseline_score=baseline.score,
            candidates=len(candidates),
            median_training_object_size=float(np.median(sizes)) if sizes.size else None,
            weights=weights,
            weights_epoch=_weights_epoch(card, weights),
            weights_scores=weights_scores,
            smoothing_scores=smoothing_scores,
            mirror_scores=mirror_scores,
        )
        card.model_copy(update={"inference": choice.settings, "postprocessing": record}).write(
            model_out / CARD_FILE
        )
        table = model_out / "postprocessing_candidates.csv"
        with table.open("w", newline="") as handle:
            rows = [candidate.as_row() for candidate in candidates]
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        context.log_artifact(table, "postprocessing")
        chosen = choice.chosen.as_row()  # the candidates table's own spelling ("argmax" seeds)
        context.log_params(
            {
                **{
                    f"postprocess.chosen.{name}": chosen[name]
                    for name in (
                        "min_object_size",
                        "fill_holes",
                        "seed_threshold",
                        "keep_largest",
                        "split_level",
                        "foreground_threshold",
                        "edge_shift",
                        "seed_split_size",
                        "smoothing",
                        "mirror",
                    )
                },
                "postprocess.chosen.weights": weights,
                "postprocess.measure": choice.measure,
            }
        )
        measure = choice.measure
        return {
            f"postprocess/val_{measure}": choice.chosen.score,
            f"postprocess/baseline_val_{measure}": baseline.score,
            "postprocess/val_objects_per_case": choice.chosen.objects_per_case,
            "postprocess/baseline_val_objects_per_case": baseline.objects_per_case,
            "postprocess/candidates": float(len(candidates)),
            **({"postprocess/weights_epoch": float(record.weights_epoch)} if record.weights_epoch else {}),
            **{f"postprocess/val_{measure}_{name}_weights": score for name, score in weights_scores.items()},
            **{f"postprocess/val_{measure}_smoothing_{sigma}": v for sigma, v in smoothing_scores.items()},
            **{f"postprocess/val_{measure}_mirror_{state}": v for state, v in mirror_scores.items()},
        }


def _candidate_weights(
    net: torch.nn.Module, card: ModelCard, last_path: Path, device: torch.device
) -> dict[WeightsName, torch.nn.Module]:
    """The nets to choose between: the best validation weights and, where they differ, the last epoch's."""
    import torch

    from medseg.inference.model import network_from_card

    nets: dict[WeightsName, torch.nn.Module] = {"best": net}
    if last_path.is_file():
        last = network_from_card(card, last_path, fix="retrain the model").to(device)
        if any(
            not torch.equal(mine, theirs)
            for mine, theirs in zip(net.state_dict().values(), last.state_dict().values(), strict=True)
        ):
            nets["last"] = last
    return nets


def _weights_epoch(card: ModelCard, weights: WeightsName) -> int | None:
    """The epoch whose weights were kept; None for a fold ensemble (each fold has its own best epoch)."""
    if card.folds > 1:
        return None
    return card.training.best_epoch if weights == "best" else card.training.epochs_run


def _on_off(mirror: bool) -> str:
    """How a mirroring choice is spelt in the card's ``mirror_scores`` and in metric names."""
    return "on" if mirror else "off"


def _best_choice(
    choices: Mapping[tuple[WeightsName, bool, float], PostprocessingChoice],
) -> tuple[WeightsName, bool, float]:
    """The (weights, mirroring, smoothing) whose chosen post-processing scores highest.

    The first on ties and NaN: ``choices`` are in trial order, best weights before last, no
    mirroring before mirroring, no smoothing before smoothing.
    """
    from medseg.inference.tuning import best_candidate

    winner = best_candidate([choice.chosen for choice in choices.values()])
    return next(key for key, choice in choices.items() if choice.chosen is winner)


def _validation_cases(
    context: StageContext,
    net: torch.nn.Module,
    folder: Path,
    records: Sequence[CaseRecord],
    assignment: Mapping[str, int] | None,
    current: InferenceSettings,
    device: torch.device,
    sw_batch_size: int,
    weights: WeightsName,
) -> dict[float, list[ValidationCase]]:
    """Predict every record (a fold ensemble: by the fold that did not train on it) for the choice.

    Each image is predicted as it is, or averaged over its mirrors where ``current.mirror`` says.

    Returns:
        For each of ``tuning.SMOOTHINGS``, the cases' maps from probabilities smoothed by it.

    """
    from medseg.inference.predict import (
        class_map,
        class_probability,
        object_class_map,
        predict_logits,
        smoothed_logits,
    )
    from medseg.inference.tuning import SMOOTHINGS, ValidationCase
    from medseg.io.dataset import load_case, load_ignore, load_markers

    sets: dict[float, list[ValidationCase]] = {sigma: [] for sigma in SMOOTHINGS}
    for number, record in enumerate(records, start=1):
        image, label = load_case(folder, record)
        markers = load_markers(folder, record)
        ignore = load_ignore(folder, record) if markers is None else None  # as evaluate does
        member = net if assignment is None else cast("FoldEnsemble", net).members[assignment[record.case_id]]
        predicted = predict_logits(
            member,
            image.array,
            roi_size=current.roi_size,
            overlap=current.overlap,
            device=device,
            sw_batch_size=sw_batch_size,
            flip_tta=current.mirror,
        )
        for sigma, cases in sets.items():
            logits = smoothed_logits(predicted, sigma)
            cases.append(
                ValidationCase(
                    case_id=record.case_id,
                    classes=class_map(logits),
                    interior=class_probability(logits, 1) if current.target == "boundary" else None,
                    reference=label.array[0],
                    markers=markers.array[0] if markers is not None else None,
                    fully_annotated=record.fully_annotated,
                    ignore=ignore,
                    foreground=class_probability(logits, 0, complement=True),
                    object_classes=object_class_map(logits),
                )
            )
        mirrored = ", mirrored" if current.mirror else ""
        context.progress(f"postprocess: predict ({weights} weights{mirrored})", number, len(records))
    return sets


STAGE = Postprocess()
