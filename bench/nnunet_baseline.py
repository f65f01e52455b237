"""nnU-Net v2 (2d configuration, CPU) on a medseg-ingested 2D dataset for a wall-clock budget.

Run by ``bench_accuracy`` with the interpreter named by ``NNUNET_PYTHON`` (a separate venv:
``python3 -m venv nnunet && nnunet/bin/pip install torch==2.13.0 nnunetv2``), because nnU-Net
pins its own dependencies. It imports nothing from medseg.

Usage: ``python nnunet_baseline.py DATASET WORKDIR SECONDS``. DATASET is an ingested dataset
(``dataset.json`` + ``cases/*/image.nii.gz, label.nii.gz``); nnU-Net gets the train and val
splits as PNG (images scaled to uint16, labels foreground 0/1, unknown voxels its ignore label 2;
fold ``all`` needs no validation split of its own), plans and preprocesses the ``2d``
configuration with its defaults, trains fold ``all`` for SECONDS of wall clock (its own loop:
epochs of 250 iterations are cut to 5, and the clock is read after each epoch, so at least one
epoch runs), and predicts the test split with its default inference (Gaussian tiles,
mirroring) into ``WORKDIR/pred/<case>.png``.
``WORKDIR/nnunet.json`` records iterations, epochs, patch and batch size.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

DATASET_ID, DATASET_NAME = 777, "Dataset777_MedsegBench"
IGNORE = 2


def write_png(array: np.ndarray, path: Path) -> None:
    """Save a 2D array as PNG (uint16 for images, uint8 for labels)."""
    Image.fromarray(array).save(path)


def export_raw(dataset: Path, raw: Path) -> list[str]:
    """Write the nnU-Net raw dataset (train and val splits) and the test images; return test ids.

    A case's unknown voxels (medseg's ``ignore`` mask: the left-out regions around unannotated
    cells of a sparse CTC frame) get nnU-Net v2's ignore label, its own way of training on
    sparse annotation.
    """
    index = json.loads((dataset / "dataset.json").read_text())
    cases = {case["case_id"]: case for case in index["cases"]}
    folder = raw / DATASET_NAME
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    training = [*index["splits"]["train"], *index["splits"]["val"]]
    partial = False
    for case_id in [*training, *index["splits"]["test"]]:
        record = cases[case_id]
        image = np.asarray(nib.load(dataset / record["image"]).dataobj, dtype=np.float32)
        scaled = np.clip(image * 10000, 0, 65535).astype(np.uint16)
        write_png(
            scaled, folder / ("imagesTr" if case_id in training else "imagesTs") / f"{case_id}_0000.png"
        )
        if case_id in training:
            label = (np.asarray(nib.load(dataset / record["label"]).dataobj) > 0).astype(np.uint8)
            if record.get("ignore"):
                unknown = np.asarray(nib.load(dataset / record["ignore"]).dataobj).reshape(label.shape) > 0
                label[unknown & (label == 0)] = IGNORE
                partial = True
            write_png(label, folder / "labelsTr" / f"{case_id}.png")
    labels = {"background": 0, "cell": 1, **({"ignore": IGNORE} if partial else {})}
    meta = {
        "channel_names": {"0": "fluorescence"},
        "labels": labels,
        "numTraining": len(training),
        "file_ending": ".png",
    }
    (folder / "dataset.json").write_text(json.dumps(meta))
    return list(index["splits"]["test"])


def main() -> None:
    """Export, plan, preprocess, train for the budget, predict; see the module docstring."""
    dataset, work, seconds = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
    for name in ("raw", "preprocessed", "results"):
        (work / name).mkdir(parents=True, exist_ok=True)
        os.environ[f"nnUNet_{name}"] = str(work / name)
    os.environ.setdefault("nnUNet_n_proc_DA", "2")
    export_raw(dataset, work / "raw")

    import torch
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.run.run_training import get_trainer_from_args

    extract_fingerprints([DATASET_ID], num_processes=2, verbose=False, show_progress_bar=False)
    plan_experiments([DATASET_ID])
    preprocess([DATASET_ID], configurations=("2d",), num_processes=(2,), show_progress_bar=False)

    trainer = get_trainer_from_args(str(DATASET_ID), "2d", "all", device=torch.device("cpu"))
    trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = 5, 1
    trainer.on_train_start()
    deadline, iterations, epochs = time.perf_counter() + seconds, 0, 0
    while time.perf_counter() < deadline:
        trainer.on_epoch_start()
        trainer.on_train_epoch_start()
        outputs = []
        for _ in range(trainer.num_iterations_per_epoch):
            outputs.append(trainer.train_step(next(trainer.dataloader_train)))
            iterations += 1
        trainer.on_train_epoch_end(outputs)
        with torch.no_grad():
            trainer.on_validation_epoch_start()
            trainer.on_validation_epoch_end([trainer.validation_step(next(trainer.dataloader_val))])
        trainer.on_epoch_end()
        epochs += 1
    trainer.on_train_end()
    configuration = trainer.configuration_manager

    predictor = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(trainer.output_folder_base, use_folds=("all",))
    started = time.perf_counter()
    predictor.predict_from_files(
        str(work / "raw" / DATASET_NAME / "imagesTs"),
        str(work / "pred"),
        save_probabilities=False,
        overwrite=True,
        num_processes_preprocessing=1,
        num_processes_segmentation_export=1,
    )
    summary = {
        "iterations": iterations,
        "epochs": epochs,
        "patch_size": list(configuration.patch_size),
        "batch_size": configuration.batch_size,
        "predict_s": round(time.perf_counter() - started, 1),
    }
    (work / "nnunet.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main()
