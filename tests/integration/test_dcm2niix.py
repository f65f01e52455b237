"""Agreement with dcm2niix, the converter the field trusts, on every real series in ../shared/data/dicom.

Each image series (each stack of a multi-stack series) is converted by ``dcm2niix`` (Debian
package, installed by ``tests/system-packages.sh``) and read by medseg; both are compared in
world space (RAS+): voxel values and affine. Intended differences are asserted as such:

- a series with missing slices (``monai-testing/CT_DICOM``: 4 slices of a 160-slice range)
  is refused by medseg, naming the gap, where dcm2niix only warns and writes a volume whose
  spacing (202.5 mm) is wrong;
- Philips' private scaling: medseg's default is the display values (``dcm2niix -p n``), its
  ``philips_scaling: precise`` the precise values (dcm2niix's default ``-p y``);
- Debian's dcm2niix is built without JPEG-LS: that series is compared with SimpleITK (GDCM).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bench.bench_dicom import simpleitk_volume
from medseg.errors import DataError
from medseg.io.dicom import LABEL_MODALITIES, DicomSeries, index_dicom, read_series
from tests.conftest import SHARED_DATA, require

pytestmark = pytest.mark.integration

DICOM = SHARED_DATA / "dicom"
MISSING_SLICES = "monai-testing/CT_DICOM"


def _series_folders() -> list[Path]:
    """Every folder under ``../shared/data/dicom`` holding DICOM files (indexed one at a time:
    the vendor set re-encodes one series, with its UID, into several folders)."""
    if not DICOM.is_dir():
        return []
    skipped = {".gz", ".txt", ".nrrd"}
    folders = {path.parent for path in DICOM.rglob("*") if path.is_file() and path.suffix not in skipped}
    return sorted(folder for folder in folders if index_dicom(folder).series)


def _dcm2niix(series: DicomSeries, out: Path, *, precise: bool = False) -> tuple[list[Path], str]:
    source = out / "in"
    source.mkdir(parents=True)
    for number, path in enumerate(series.files):
        (source / f"{number:04d}_{path.name}").symlink_to(path)
    options = ["-z", "n", "-b", "n", "-p", "y" if precise else "n", "-f", "%s", "-o", str(out)]
    result = subprocess.run(["dcm2niix", *options, str(source)], capture_output=True, text=True, check=False)
    return sorted(out.glob("*.nii")), result.stdout


def _world(path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = nib.as_closest_canonical(nib.load(path))
    array = np.asarray(image.get_fdata())
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return (array[..., None] if array.ndim == 2 else array), image.affine


def test_every_real_series_agrees_with_dcm2niix(tmp_path):
    if shutil.which("dcm2niix") is None:
        pytest.skip("dcm2niix not installed (tests/system-packages.sh)")
    folders = _series_folders() or [require(DICOM)]
    table = []
    for folder in folders:
        name = str(folder.relative_to(DICOM))
        for number, series in enumerate(index_dicom(folder).series):
            if series.modality in LABEL_MODALITIES or series.files[0].parent != folder:
                continue  # labels, and series of subfolders (indexed with their own folder)
            out = tmp_path / f"{len(table):03d}"
            written, log = _dcm2niix(series, out)
            row = (name, series.stack_label or "-", series.transfer_syntax, "dcm2niix")
            if name == MISSING_SLICES:
                with pytest.raises(DataError, match="missing slice"):
                    read_series(series)
                assert "Missing images" in log  # dcm2niix converts anyway, with a wrong spacing
                table.append((*row, "refused: missing slices (dcm2niix warns, writes 202.5 mm spacing)"))
                continue
            volume = read_series(series)
            if "Unsupported transfer syntax" in log:  # Debian's dcm2niix is built without JPEG-LS
                array, affine = simpleitk_volume(folder)
                row = (*row[:3], "dcm2niix cannot decode it: compared with SimpleITK/GDCM")
            else:
                assert len(written) == 1, (name, number, log)
                array, affine = _world(written[0])
            assert volume.array.shape[1:] == array.shape, name
            np.testing.assert_allclose(volume.array[0], array, rtol=1e-5, atol=1e-4, err_msg=name)
            assert np.abs(volume.affine - affine).max() < 1e-3, (name, volume.affine, affine)
            if series.philips:  # the precise values agree with dcm2niix's precise ones
                (precise,) = _dcm2niix(series, tmp_path / f"{len(table):03d}p", precise=True)[0]
                np.testing.assert_allclose(
                    read_series(series, scaling="precise").array[0],
                    _world(precise)[0],
                    rtol=1e-5,
                    err_msg=name,
                )
                assert not np.allclose(volume.array[0], _world(precise)[0])
            table.append((*row, "equal"))
    assert len(table) >= 17, table  # every real image series and stack
    assert sum(row[-1] == "equal" for row in table) == len(table) - 1
    (jpegls,) = [row for row in table if row[2] == "JPEG-LS Lossless Image Compression"]
    assert jpegls[3].startswith("dcm2niix cannot decode it")
    assert {row[2] for row in table} >= {
        "JPEG 2000 Image Compression (Lossless Only)",
        "JPEG Lossless, Non-Hierarchical, First-Order Prediction (Process 14 [Selection Value 1])",
        "JPEG-LS Lossless Image Compression",
        "RLE Lossless",
    }
    assert next(row[:2] for row in table if row[1] == "phase") == (
        "dicom2nifti-vendor-series/tests/data/philips/anatomical/002",
        "phase",
    )
