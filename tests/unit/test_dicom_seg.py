"""DICOM SEG output on real CT series: source geometry round trip, references, dciodvfy validity."""

from __future__ import annotations

import shutil
import subprocess

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest

import medseg
from medseg.inference.cohort import predict_cohort
from medseg.io.cohort import discover_images, write_labels
from medseg.io.dicom import find_series, read_dicom_seg
from medseg.io.geometry import resample_to_grid
from medseg.io.readers import read_image
from tests.conftest import CT_SERIES, SHARED_DATA, require, write_ct_export
from tests.integration.helpers import run_cli
from tests.unit.test_segmenter import threshold_segmenter

CT_3SLICE = SHARED_DATA / "dicom" / "dcmqi-segmentations" / "ct-3slice"


def test_labels_round_trip_through_dicom_seg_and_nifti_in_source_geometry(identified_ct, tmp_path):
    folder, series_uid = identified_ct
    source = read_image(folder)
    segmenter = threshold_segmenter(None, name="body", segments=[{"number": 1, "label": "body"}])
    labels = segmenter.predict(folder)  # body (> -500 HU): a known answer
    assert labels.spatial_shape == source.spatial_shape == (512, 512, 20)
    np.testing.assert_array_equal(labels.affine, source.affine)
    np.testing.assert_array_equal(labels.array[0] > 0, source.array[0] > -500)

    seg_path = segmenter.write_dicom_seg(labels, folder, tmp_path / "body.dcm")
    back = read_dicom_seg(seg_path)  # highdicom
    np.testing.assert_allclose(back.affine, labels.affine, atol=1e-6)
    placed = resample_to_grid(back, labels.spatial_shape, labels.affine, order=0)
    np.testing.assert_array_equal(placed.array[0], (labels.array[0] > 0).astype(np.int32))

    dataset = pydicom.dcmread(seg_path)  # pydicom: what the SEG says about itself and its source
    assert dataset.Modality == "SEG" and dataset.NumberOfFrames == 20
    assert dataset.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    referenced = {
        item.ReferencedSOPInstanceUID
        for item in dataset.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    }
    assert referenced == {pydicom.dcmread(path).SOPInstanceUID for path in folder.iterdir()}
    segment = dataset.SegmentSequence[0]
    assert segment.SegmentLabel == "body" and segment.SegmentAlgorithmType == "AUTOMATIC"
    assert segment.SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == "medseg body"
    assert dataset.Manufacturer == "medseg"
    assert hd.seg.segread(seg_path).number_of_segments == 1

    nifti = segmenter.write_labels(labels, tmp_path / "body.nii.gz", "nifti")
    image = nib.load(nifti)
    np.testing.assert_allclose(image.affine, labels.affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(image.dataobj), labels.array[0])


@pytest.mark.skipif(
    shutil.which("dciodvfy") is None, reason="dicom3tools not installed (tests/system-packages.sh)"
)
@pytest.mark.parametrize("series", ["identified", "3slice"])
def test_written_seg_is_valid_for_dciodvfy(identified_ct, series, tmp_path):
    folder = identified_ct[0] if series == "identified" else require(CT_3SLICE)
    segmenter = threshold_segmenter(None, roi=(32, 32, 3))
    results = predict_cohort(segmenter, discover_images(folder), tmp_path / "out", "dicom-seg")
    assert results[0].error is None and results[0].voxels > 0
    check = subprocess.run(["dciodvfy", str(results[0].path)], capture_output=True, text=True, check=False)
    report = check.stdout + check.stderr
    assert "Segmentation" in report
    errors = [line for line in report.splitlines() if line.startswith("Error")]
    assert errors == []


def test_anonymised_series_without_uids_is_refused_before_writing(tmp_path):
    labels = threshold_segmenter(None).predict(require(CT_SERIES))
    with pytest.raises(medseg.DataError, match="StudyInstanceUID is empty"):
        write_labels(labels, tmp_path / "x.dcm", "dicom-seg", series=find_series(CT_SERIES))
    assert not list(tmp_path.iterdir())


def test_labels_off_the_source_grid_are_refused(identified_ct, tmp_path):
    folder, _ = identified_ct
    labels = threshold_segmenter(None).predict(folder)
    shifted = medseg.Volume(labels.array, labels.affine + np.pad(np.eye(3)[:, :1] * 5, ((0, 1), (3, 0))))
    with pytest.raises(medseg.DataError, match="origin"):
        write_labels(shifted, tmp_path / "x.dcm", "dicom-seg", series=find_series(folder))


def test_predict_cli_writes_dicom_seg_for_a_series(identified_ct, tmp_path):
    folder, series_uid = identified_ct
    export = write_ct_export(tmp_path / "export")
    out = tmp_path / "seg"
    done = run_cli("predict", str(export), str(folder), str(out), "--format", "dicom-seg")
    assert done.returncode == 0, done.stdout + done.stderr
    written = out / "series.dcm"
    dataset = pydicom.dcmread(written)
    assert dataset.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    assert dataset.SegmentSequence[0].SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"
    expected = medseg.Segmenter.from_export(export).predict(folder)
    placed = resample_to_grid(read_dicom_seg(written), expected.spatial_shape, expected.affine, order=0)
    np.testing.assert_array_equal(placed.array[0], (expected.array[0] > 0).astype(np.int32))
    assert not list(out.glob(".*partial*"))
