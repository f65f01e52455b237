"""DICOM series → volume: medseg vs SimpleITK's ImageSeriesReader on the real CT series.

The 20-slice CT series of ``../shared/data/dicom/totalsegmentator-example`` (512×512, JPEG 2000
lossless as stored) is re-encoded losslessly in each benchmarked transfer syntax (JPEG 2000 as
it is; JPEG-LS, RLE and uncompressed through pydicom) and replicated to ``slices`` slices in a
temporary folder: each copy keeps its encoded pixel data and gets a new SOP Instance UID,
InstanceNumber and position 2 mm further along the slice normal. Both readers index the folder
and build the volume (rescaled to HU); the figure is the median wall time over repetitions, and
the check is voxel equality and the largest difference of the affines (after putting
SimpleITK's LPS image in RAS+ order). SimpleITK decodes with GDCM, whose JPEG 2000 decoder runs
on several threads; medseg decodes files in parallel processes (``medseg.io.dicom.read_series``).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

SERIES = (
    Path(__file__).resolve().parents[2]
    / "shared"
    / "data"
    / "dicom"
    / "totalsegmentator-example"
    / "example_ct_dicom"
)


SYNTAXES = {
    "JPEG 2000": "1.2.840.10008.1.2.4.90",
    "JPEG-LS": "1.2.840.10008.1.2.4.80",
    "RLE": "1.2.840.10008.1.2.5",
    "uncompressed": "1.2.840.10008.1.2.1",
}
"""Benchmarked transfer syntaxes (all lossless) by the name a row shows."""


def replicate(folder: Path, slices: int, syntax: str = SYNTAXES["JPEG 2000"]) -> None:
    """Write ``slices`` slices made from the real series, in transfer syntax ``syntax``, into ``folder``."""
    import pydicom
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    originals = sorted(
        (pydicom.dcmread(path) for path in SERIES.iterdir()), key=lambda ds: float(ds.ImagePositionPatient[2])
    )
    for dataset in originals:
        if dataset.file_meta.TransferSyntaxUID != syntax:
            dataset.decompress()
            if UID(syntax) != ExplicitVRLittleEndian:
                dataset.compress(syntax)
    bottom = [float(value) for value in originals[0].ImagePositionPatient]
    for index in range(slices):
        dataset = originals[index % len(originals)]
        dataset.SOPInstanceUID = generate_uid()
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        dataset.InstanceNumber = index + 1
        dataset.ImagePositionPatient = [bottom[0], bottom[1], bottom[2] + 2.0 * index]
        dataset.save_as(folder / f"slice{index:04d}.dcm")


def simpleitk_volume(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """SimpleITK's volume of ``folder`` as (array ``(x, y, z)`` in RAS+ order, affine)."""
    import nibabel as nib
    import SimpleITK as sitk  # noqa: N813

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    image = reader.Execute()
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    affine = np.eye(4)
    affine[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    canonical = nib.as_closest_canonical(nib.Nifti1Image(array, np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine))
    return np.asarray(canonical.dataobj), canonical.affine


def run(
    *, slices: int = 300, repetitions: int = 3, syntaxes: tuple[str, ...] = tuple(SYNTAXES)
) -> list[dict[str, object]]:
    """One row per transfer syntax: seconds for medseg and SimpleITK, ratio, voxel equality, affine Δ."""
    return [_row(syntax, slices, repetitions) for syntax in syntaxes]


def _row(syntax: str, slices: int, repetitions: int) -> dict[str, object]:
    from medseg.io.dicom import index_dicom, read_series

    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        replicate(folder, slices, SYNTAXES[syntax])
        timings: dict[str, list[float]] = {"medseg": [], "simpleitk": []}
        for _ in range(repetitions):
            start = time.perf_counter()
            (series,) = index_dicom(folder).series
            volume = read_series(series)
            timings["medseg"].append(time.perf_counter() - start)
            start = time.perf_counter()
            array, affine = simpleitk_volume(folder)
            timings["simpleitk"].append(time.perf_counter() - start)
    same_voxels = volume.array.shape[1:] == array.shape and np.array_equal(volume.array[0], array)
    medseg_s, baseline_s = statistics.median(timings["medseg"]), statistics.median(timings["simpleitk"])
    return {
        "benchmark": f"CT series → volume, {slices} slices 512² ({syntax})",
        "medseg_s": round(medseg_s, 3),
        "simpleitk_s": round(baseline_s, 3),
        "speed_ratio": round(baseline_s / medseg_s, 2),
        "voxels_equal": bool(same_voxels),
        "max_affine_difference_mm": f"{np.abs(volume.affine - affine).max():.1e}",
    }


if __name__ == "__main__":
    for row in run():
        print(row)
