"""DICOM series: indexing, geometry (known answers and SimpleITK agreement), bad input, privacy."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from bench.bench_dicom import simpleitk_volume
from medseg.errors import DataError
from medseg.io.dicom import SeriesRules, index_dicom, orientation_of, read_series, select_series
from tests.conftest import SHARED_DATA, require

PHI = {
    "PatientName": "Doe^Jane",
    "PatientID": "MRN-4417",
    "AccessionNumber": "ACC-99231",
    "PatientBirthDate": "19610704",
}


def write_slice(
    path: Path,
    pixels: np.ndarray,
    position: tuple[float, float, float],
    *,
    series_uid: str,
    number: int,
    cosines: tuple[float, ...] = (1, 0, 0, 0, 1, 0),
    spacing: tuple[float, float] = (0.5, 0.8),
    slope: float = 1.0,
    intercept: float = 0.0,
    modality: str = "CT",
    description: str = "Body 3mm",
) -> Path:
    """Write one CT slice (int16 pixels ``(rows, columns)``) with the given geometry."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    for keyword, value in PHI.items():
        setattr(ds, keyword, value)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.1", series_uid
    ds.StudyDate, ds.Modality, ds.SeriesDescription = "20240102", modality, description
    ds.InstanceNumber = number
    ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in cosines]
    ds.PixelSpacing = [spacing[0], spacing[1]]
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PixelData = pixels.astype(np.int16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def write_series(
    folder: Path, count: int = 5, *, step: float = 2.0, shape=(6, 4), positions=None, **kwargs
) -> tuple[Path, np.ndarray]:
    """A series of ``count`` slices, files named in reverse slice order; returns (folder, stack z,r,c)."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = kwargs.pop("series_uid", generate_uid())
    stack = np.arange(count * shape[0] * shape[1]).reshape(count, *shape) % 1000
    positions = positions or [(10.0, 20.0, -50.0 + step * index) for index in range(count)]
    for index in range(count):
        name = f"IM{count - index:04d}.dcm"  # file order and InstanceNumber run against the geometry
        write_slice(
            folder / name,
            stack[index],
            positions[index],
            series_uid=series_uid,
            number=count - index,
            **kwargs,
        )
    return folder, stack


def only_series(folder: Path):
    index = index_dicom(folder)
    assert len(index.series) == 1, index
    return index.series[0]


def test_volume_is_sorted_by_position_rescaled_and_in_ras(tmp_path):
    folder, stack = write_series(tmp_path / "s", slope=2.0, intercept=-1024.0)
    volume = read_series(only_series(folder))
    # LPS → RAS flips x and y: array axes (x, y, z) come out reversed in x and y.
    expected = (stack.transpose(2, 1, 0) * 2.0 - 1024.0)[::-1, ::-1, :]
    assert volume.array.shape == (1, 4, 6, 5)
    assert np.array_equal(volume.array[0], expected)
    assert volume.spacing == pytest.approx((0.8, 0.5, 2.0))  # columns 0.8 mm apart, rows 0.5, slices 2
    # Voxel (0, 0, 0) is the last column / last row of the lowest slice: LPS (10+3*0.8, 20+5*0.5, -50).
    assert volume.affine @ np.array([0, 0, 0, 1]) == pytest.approx([-12.4, -22.5, -50.0, 1])
    assert volume.meta == {"modality": "CT", "series": only_series(folder).key, "scaling": "display"}


def test_oblique_series_keeps_its_geometry(tmp_path):
    angle = math.radians(30)
    cosines = (1, 0, 0, 0, math.cos(angle), math.sin(angle))
    normal = np.cross(cosines[:3], cosines[3:])
    positions = [tuple(np.array([0.0, 0.0, 0.0]) + 3.0 * index * normal) for index in range(4)]
    folder, _ = write_series(tmp_path / "s", 4, positions=positions, cosines=cosines)
    series = only_series(folder)
    assert series.orientation == "oblique" and orientation_of(np.array(cosines)) == "oblique"
    volume = read_series(series)
    assert sorted(volume.spacing) == pytest.approx(sorted((0.8, 0.5, 3.0)), rel=1e-4)
    world = volume.affine[:3, :3]
    assert abs(np.linalg.det(world)) == pytest.approx(0.8 * 0.5 * 3.0, rel=1e-4)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("duplicate", r"instance 3 and instance 4 lie at the same position"),
        ("gap", r"2\.000 mm apart but 4\.000 mm .*about 1 missing slice"),
        ("uneven", r"2\.000 mm apart but 2\.500 mm .*non-uniform spacing"),
        ("tilt", r"from instance 5 to instance 1 are stacked 8\.53° off their normal \(gantry tilt\)"),
        ("size", r"file 2: 5x6 pixels where the series has 4x6"),
        ("no pixels", r"file 1: has no pixel data"),
        ("truncated", r"file 1: (pixel data cannot be decoded|cannot be read)"),
        ("nan", r"NaN or infinity"),
    ],
)
def test_broken_series_stop_with_the_series_and_slice(tmp_path, case, message):
    import pydicom

    positions = [(0.0, 0.0, 2.0 * index) for index in range(5)]
    if case == "duplicate":
        positions[2] = positions[1]
    elif case == "gap":
        positions = [(0.0, 0.0, z) for z in (0, 2, 4, 8, 10)]
    elif case == "uneven":
        positions = [(0.0, 0.0, z) for z in (0, 2, 4, 6.5, 8.5)]
    elif case == "tilt":
        positions = [(0.0, 0.3 * index, 2.0 * index) for index in range(5)]
    folder, _ = write_series(tmp_path / "s", 5, positions=positions, slope=math.nan if case == "nan" else 1.0)
    first = folder / "IM0001.dcm"  # InstanceNumber 1, but the highest slice
    if case == "size":
        write_slice(
            folder / "IM0002.dcm",
            np.zeros((6, 5)),
            positions[3],
            series_uid=only_series(folder).uid,
            number=2,
        )
    elif case == "no pixels":
        dataset = pydicom.dcmread(first)
        del dataset.PixelData
        dataset.save_as(first)
    elif case == "truncated":
        first.write_bytes(first.read_bytes()[:-20])
    series = only_series(folder)
    number = {path.name: n for n, path in enumerate(series.files, start=1)}
    assert number["IM0001.dcm"] == 1  # files are numbered in sorted order when they cannot be read
    with pytest.raises(DataError, match=rf"series {series.key}.*{message}") as raised:
        read_series(series)
    assert str(tmp_path) not in str(raised.value) and "Doe" not in str(raised.value)


def test_absurd_header_dimensions_are_refused_before_reading_pixels(tmp_path):
    import pydicom

    folder, _ = write_series(tmp_path / "s", 2)
    for path in folder.iterdir():
        dataset = pydicom.dcmread(path)
        dataset.Rows, dataset.Columns = 65535, 65535
        dataset.save_as(path)
    series = only_series(folder)
    with pytest.raises(DataError, match=r"2 slices of 65535x65535 need 32\.0 GiB, over the 8 GiB limit"):
        read_series(series)


def test_index_skips_and_counts_what_is_not_an_image(tmp_path):
    folder, _ = write_series(tmp_path / "s", 3)
    (folder / "empty.dcm").write_bytes(b"")
    (folder / "notes.txt").write_text("not DICOM at all")
    (folder / "DICOMDIR-like.bin").write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 7)
    (folder / "loop").symlink_to(folder, target_is_directory=True)  # a link loop
    index = index_dicom(tmp_path)
    assert len(index.series) == 1 and index.series[0].frames == 3
    assert index.skipped["empty file"] == 1
    junk = ("not DICOM", "damaged header", "not an image with geometry")
    assert sum(index.skipped[reason] for reason in junk) == 2


def _index_as(uid: int, folder: Path) -> dict[str, int]:
    """``index_dicom(folder)`` in a forked child running as ``uid``; its skip counts and slice total."""
    import json

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop privileges, index, report, exit without cleanup
        try:
            os.setgid(uid)
            os.setuid(uid)
            index = index_dicom(folder)
            report = {**index.skipped, "frames": sum(series.frames for series in index.series)}
            os.write(write, json.dumps(report).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as handle:
        text = handle.read()
    os.waitpid(pid, 0)
    return json.loads(text)


def test_unreadable_files_are_counted(tmp_path):
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="medseg-perm-"))  # /tmp: reachable by an unprivileged user
    try:
        folder.chmod(0o755)
        series, _ = write_series(folder / "s", 3)
        series.chmod(0o755)
        for path in series.iterdir():
            path.chmod(0o644)
        (series / "IM0001.dcm").chmod(0)
        index_dicom(folder)  # load pydicom here: the child may not read the interpreter's folders
        counts = _index_as(65534, folder) if os.geteuid() == 0 else {**index_dicom(folder).skipped}
        assert counts.get("no read permission") == 1
        if "frames" in counts:
            assert counts["frames"] == 2
    finally:
        shutil.rmtree(folder)


def test_listing_and_selection_show_no_phi(tmp_path):
    write_series(tmp_path / "ct", 4)
    write_series(tmp_path / "mr", 2, modality="MR", description="T1 sag")
    index = index_dicom(tmp_path)
    rows = [series.listing() for series in index.series]
    text = repr(rows)
    assert all(value not in text for value in (*PHI.values(), "20240102", str(tmp_path)))
    assert all(series.uid not in text for series in index.series)
    chosen = select_series(index, SeriesRules(modality=("ct",), min_slices=3))
    assert [series.modality for series in chosen] == ["CT"]
    assert select_series(index, SeriesRules(description="^t1")) == [
        s for s in index.series if s.modality == "MR"
    ]
    assert select_series(index, SeriesRules(orientation="sagittal")) == []


CT = SHARED_DATA / "dicom" / "totalsegmentator-example" / "example_ct_dicom"
DCMQI = SHARED_DATA / "dicom" / "dcmqi-segmentations"


@pytest.mark.parametrize(
    "folder", [CT, DCMQI / "ct-3slice", DCMQI / "24x38x3" / "image"], ids=lambda p: p.name
)
def test_real_series_agree_with_simpleitk(folder):
    require(folder)
    volume = read_series(only_series(folder))
    array, affine = simpleitk_volume(folder)  # SimpleITK's reading, independent of medseg
    assert volume.array.shape[1:] == array.shape
    assert np.array_equal(volume.array[0], array)  # values after rescale, voxel for voxel
    assert np.abs(volume.affine - affine).max() < 1e-6  # geometry in mm


def test_real_enhanced_multiframe_equals_its_single_frame_series():
    require(DCMQI)
    single = read_series(only_series(DCMQI / "24x38x3" / "image"))
    multi_series = only_series(DCMQI / "24x38x3" / "multiframe")
    assert multi_series.multiframe and multi_series.frames == 3
    multi = read_series(multi_series)
    assert np.array_equal(single.array, multi.array) and np.allclose(single.affine, multi.affine)


def test_real_thumbnail_slices_are_refused_as_a_gapped_series():
    folder = SHARED_DATA / "dicom" / "monai-testing" / "CT_DICOM"
    require(folder)
    with pytest.raises(DataError, match=r"missing slice"):
        read_series(only_series(folder))


def test_real_dicom_image_and_nrrd_label_share_a_grid_once_both_are_ras():
    from medseg.io.geometry import canonical, check_same_grid
    from medseg.io.readers import read_image

    require(DCMQI)
    image = read_image(DCMQI / "24x38x3" / "image")
    label = read_image(DCMQI / "24x38x3" / "nrrd" / "label.nrrd", kind="label")
    with pytest.raises(DataError, match=r"axis directions differ|origin"):
        check_same_grid(image, label, name="case_0001")  # NRRD keeps its stored LPS order
    label = canonical(label)
    check_same_grid(image, label, name="case_0001")
    assert np.count_nonzero(label.array) > 0


def test_label_on_another_grid_is_refused_with_every_difference():
    from medseg.io.geometry import canonical, check_same_grid
    from medseg.io.readers import read_image

    require(CT)
    image = read_image(CT)
    label = canonical(read_image(CT.parent / "example_seg_roi_subset.nii.gz", kind="label"))
    with pytest.raises(DataError) as raised:
        check_same_grid(image, label, name="case case_0003")
    message = str(raised.value)
    assert message.startswith("case case_0003: the label does not lie on the image grid")
    assert "shape (122, 101, 30) vs image (512, 512, 20)" in message
    assert "spacing (3.000, 3.000, 3.000) mm vs image (0.977, 0.977, 2.000) mm" in message
    assert "origin" in message and "resample it (nearest neighbour)" in message


def test_ingest_list_command_prints_series_without_phi(tmp_path):
    import subprocess
    import sys

    write_series(tmp_path / "patient" / "ct", 4)
    (tmp_path / "patient" / "readme.txt").write_text("not an image")
    listed = subprocess.run(
        [sys.executable, "-m", "medseg.cli", "ingest", "--list", str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        check=False,
    )
    assert listed.returncode == 0, listed.stderr
    output = listed.stdout + listed.stderr
    assert "│ CT " in output and "Body 3mm" in output and "skipped: 1 not DICOM" in output
    series = index_dicom(tmp_path).series[0]
    assert series.key in output and series.uid not in output
    assert all(value not in output for value in (*PHI.values(), "20240102", "patient", str(tmp_path)))
