"""DICOM as archives hold it: every common transfer syntax, and several stacks in one series."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import (
    MPEG2MPML,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from bench.bench_dicom import simpleitk_volume
from medseg.errors import DataError
from medseg.io.dicom import SeriesRules, find_series, find_stacks, index_dicom, read_series, read_stacks
from medseg.io.readers import read_image
from tests.conftest import CT_SERIES, SHARED_DATA, require
from tests.unit.test_dicom import write_series

VENDOR = SHARED_DATA / "dicom" / "dicom2nifti-vendor-series" / "tests" / "data"
SLICES = 5  # the first slices of the real CT: enough for a volume, cheap to re-encode


def _encapsulated(frame_bytes: bytes) -> bytes:
    return encapsulate([frame_bytes])


def _imagecodecs(syntax: UID, pixels: np.ndarray) -> bytes:
    import imagecodecs

    if syntax == HTJ2KLossless:
        return imagecodecs.htj2k_encode(pixels, level=0)
    return imagecodecs.ljpeg_encode(pixels, bitspersample=12)  # JPEG lossless, first-order prediction


def _reencode(source: Path, target: Path, syntax: UID) -> Path:
    """Write the first slices of a series again in transfer syntax ``syntax`` (lossless)."""
    target.mkdir(parents=True)
    for path in sorted(source.iterdir())[:SLICES]:
        dataset = pydicom.dcmread(path)
        pixels = dataset.pixel_array
        if syntax in (ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
            dataset.decompress()
            dataset.file_meta.TransferSyntaxUID = syntax
        elif syntax in (RLELossless, JPEGLSLossless, JPEG2000Lossless):
            dataset.compress(syntax, pixels)
        else:
            dataset.PixelData = _encapsulated(_imagecodecs(syntax, pixels))
            dataset["PixelData"].VR = "OB"
            dataset.file_meta.TransferSyntaxUID = syntax
        dataset.save_as(target / path.name, enforce_file_format=True)
    return target


SYNTAXES = [
    ExplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    RLELossless,
    JPEGLSLossless,
    JPEG2000Lossless,
    HTJ2KLossless,
    JPEGLosslessSV1,
]


@pytest.fixture(scope="module")
def reference_ct(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """The real CT's first slices as stored (JPEG 2000 lossless) and their decoded volume."""
    folder = tmp_path_factory.mktemp("ct") / "j2k"
    folder.mkdir()
    for path in sorted(require(CT_SERIES).iterdir())[:SLICES]:
        (folder / path.name).symlink_to(path)
    return folder, read_series(find_series(folder)).array


@pytest.mark.parametrize("syntax", SYNTAXES, ids=[syntax.name for syntax in SYNTAXES])
def test_every_lossless_syntax_decodes_to_the_same_voxels(tmp_path, reference_ct, syntax):
    source, expected = reference_ct
    folder = _reencode(source, tmp_path / "series", syntax)
    series = find_series(folder)
    assert series.transfer_syntax == syntax.name
    volume = read_series(series)
    assert volume.array.dtype == np.float32 and volume.array.shape == expected.shape
    np.testing.assert_array_equal(volume.array, expected)


def test_real_vendor_compressed_series_decode_like_gdcm():
    generic = require(VENDOR / "generic")
    for name in ("compressed", "compressed_j2k", "compressed_jpeg", "compressed_jpegls", "compressed_rle"):
        folder = generic / name / "001"
        series = find_series(folder)
        array, affine = simpleitk_volume(folder)  # GDCM's decoders, independent of pydicom's plugins
        volume = read_series(series)
        np.testing.assert_array_equal(volume.array[0], array, err_msg=series.transfer_syntax)
        assert np.abs(volume.affine - affine).max() < 1e-6


def test_lossy_jpeg_baseline_decodes_like_libjpeg(tmp_path, reference_ct):
    import imagecodecs

    source, _ = reference_ct
    folder = tmp_path / "baseline"
    folder.mkdir()
    expected = []
    for path in sorted(source.iterdir()):
        dataset = pydicom.dcmread(path)
        pixels = (dataset.pixel_array >> 4).astype(np.uint8)  # 8 bits, as a baseline JPEG holds them
        encoded = imagecodecs.jpeg8_encode(pixels, level=90)
        expected.append(imagecodecs.jpeg8_decode(encoded).astype(np.float32) - 1024)
        dataset.PixelData = _encapsulated(encoded)
        dataset["PixelData"].VR = "OB"
        dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 8, 8, 7
        dataset.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        dataset.save_as(folder / path.name, enforce_file_format=True)
    volume = read_series(find_series(folder)).array[0]
    stack = np.stack(expected)  # (z, rows, columns) as stored; the volume is RAS (x, y, z)
    ours = np.stack([volume[:, :, k].T for k in range(volume.shape[2])])
    assert np.abs(ours[::-1, ::-1, ::-1] - stack).max() <= 1 or np.abs(ours - stack[:, ::-1, ::-1]).max() <= 1


def test_a_syntax_without_decoder_is_named(tmp_path, reference_ct):
    source, _ = reference_ct
    folder = tmp_path / "mpeg2"
    folder.mkdir()
    for path in sorted(source.iterdir()):
        dataset = pydicom.dcmread(path)
        dataset.file_meta.TransferSyntaxUID = MPEG2MPML  # video: no image decoder exists for it
        dataset.save_as(folder / path.name, enforce_file_format=True)
    with pytest.raises(
        DataError,
        match=r"syntax MPEG2 Main Profile / Main Level \(1\.2\.840\.10008\.1\.2\.4\.100\) has no decoder",
    ):
        read_series(find_series(folder))


def test_real_philips_magnitude_and_phase_are_two_stacks():
    folder = require(VENDOR / "philips" / "anatomical" / "002")
    stacks = index_dicom(folder).series
    assert [(s.stack_label, s.frames) for s in stacks] == [("magnitude", 4), ("phase", 4)]
    with pytest.raises(DataError) as error:
        find_series(folder)
    message = str(error.value)
    assert "holds 2 stacks at the same positions" in message and "remove the duplicate" not in message
    assert "magnitude (4 slices): ingest.series.image_type: magnitude" in message
    assert "phase (4 slices): ingest.series.image_type: phase" in message
    magnitude = read_image(folder, series=SeriesRules(image_type="magnitude"))
    phase = read_image(folder, series=SeriesRules(image_type="phase"))
    assert magnitude.array.shape == phase.array.shape == (1, 768, 768, 4)
    assert not np.array_equal(magnitude.array, phase.array)
    both = read_image(folder, series=SeriesRules(channels="image_type"))
    assert both.array.shape == (2, 768, 768, 4)
    np.testing.assert_array_equal(both.array[0], magnitude.array[0])
    np.testing.assert_array_equal(both.array[1], phase.array[0])


def _stacked_series(folder: Path, values: list[dict[str, object]]) -> Path:
    """One series (one UID) holding a stack per entry of ``values`` at the same 4 positions."""
    uid = pydicom.uid.generate_uid()
    for number, attributes in enumerate(values):
        part, _ = write_series(folder / f"part{number}", 4, shape=(6, 4), series_uid=uid)
        for path in part.iterdir():
            dataset = pydicom.dcmread(path)
            for keyword, value in attributes.items():
                setattr(dataset, keyword, value)
            dataset.PixelData = (dataset.pixel_array.astype(np.int16) + 100 * number).tobytes()
            dataset.save_as(path)
    return folder


@pytest.mark.parametrize(
    ("attributes", "rule", "label"),
    [
        ([{"EchoNumbers": 1, "EchoTime": 5}, {"EchoNumbers": 2, "EchoTime": 10}], "echo", "echo 2"),
        ([{"TemporalPositionIdentifier": t} for t in (1, 2, 3)], "temporal_index", "time point 2"),
        ([{"DiffusionBValue": b} for b in (0.0, 1000.0)], "b_value", "b=1000"),
        ([{"AcquisitionNumber": n} for n in (1, 2)], "acquisition", "acquisition 2"),
    ],
    ids=["multi-echo", "dce", "diffusion", "repeated"],
)
def test_stacks_by_echo_time_point_b_value_and_acquisition(tmp_path, attributes, rule, label):
    folder = _stacked_series(tmp_path / "series", attributes)
    stacks = index_dicom(folder).series
    assert len(stacks) == len(attributes) and stacks[-1].stack_label == label
    with pytest.raises(DataError, match=rf"holds {len(attributes)} stacks at the same positions"):
        find_series(folder)
    last = stacks[-1].selector[rule]
    chosen = read_series(find_series(folder, SeriesRules(**{rule: last})))
    first = read_series(find_series(folder, SeriesRules(**{rule: stacks[0].selector[rule]})))
    np.testing.assert_array_equal(chosen.array - first.array, 100 * (len(attributes) - 1))
    channels = read_stacks(find_stacks(folder, SeriesRules(channels=rule)))
    assert channels.array.shape == (len(attributes), *first.spatial_shape)
    np.testing.assert_array_equal(channels.array[-1], chosen.array[0])


def test_a_series_with_a_true_duplicate_slice_still_says_so(tmp_path):
    folder = _stacked_series(tmp_path / "series", [{}, {}])  # same positions, nothing tells them apart
    with pytest.raises(DataError, match="at the same position; remove the duplicate slice"):
        read_series(find_series(folder))


def _shuffled_series(folder: Path, slices: int, syntax: str) -> Path:
    """``slices`` slices of the real CT in ``syntax``, their file names out of position order."""
    from bench.bench_dicom import SYNTAXES, replicate

    require(CT_SERIES)
    source = folder / "ordered"
    source.mkdir(parents=True)
    replicate(source, slices, SYNTAXES[syntax])
    target = folder / "series"
    target.mkdir()
    order = np.random.default_rng(0).permutation(slices)
    for index, path in enumerate(sorted(source.iterdir())):
        path.rename(target / f"IM{order[index]:04d}.dcm")
    return target


def test_large_series_decode_in_worker_processes_to_the_same_voxels(tmp_path, monkeypatch):
    import medseg.io.dicom as dicom

    folder = _shuffled_series(tmp_path, 40, "JPEG-LS")
    series = find_series(folder)
    calls = []
    parallel = dicom._read_frames_parallel
    monkeypatch.setattr(
        dicom, "_read_frames_parallel", lambda *args: calls.append(args[2]) or parallel(*args)
    )
    serial = read_series(series, workers=1)
    assert calls == []
    shared = read_series(series, workers=2)
    assert calls == [2]  # two worker processes decoded the 40 files
    np.testing.assert_array_equal(shared.array, serial.array)
    assert np.array_equal(shared.affine, serial.affine) and shared.array.flags.c_contiguous
    array, affine = simpleitk_volume(folder)
    np.testing.assert_array_equal(shared.array[0], array)
    assert np.abs(shared.affine - affine).max() < 1e-6
    assert dicom._decode_workers(series, 8) == 2  # at least 16 files per worker
    assert dicom._decode_workers(find_series(CT_SERIES), 8) == 1  # 20 files: in-process


def test_a_damaged_file_in_a_worker_is_named(tmp_path):
    folder = _shuffled_series(tmp_path, 32, "RLE")
    series = find_series(folder)
    number = 23
    damaged = series.files[number - 1]
    damaged.write_bytes(damaged.read_bytes()[:-5000])  # cut inside the pixel data element
    with pytest.raises(DataError, match=rf"^series {series.key}, file {number}: has no pixel data"):
        read_series(series, workers=2)


def test_the_fastest_installed_decoder_is_chosen_per_syntax():
    from medseg.io.dicom import _decoding_plugin

    assert _decoding_plugin(str(JPEG2000Lossless)) == "pylibjpeg"  # OpenJPEG: one thread per process
    assert _decoding_plugin(str(JPEGLSLossless)) == "pyjpegls"  # CharLS
    assert _decoding_plugin(str(JPEGLosslessSV1)) == "gdcm"
    assert _decoding_plugin(str(RLELossless)) == ""  # pydicom's own


@pytest.mark.parametrize("order", [(2, 1, 0), (1, 2, 0), (2, 0, 1), (0, 2, 1)])
def test_contiguous_copies_views_plane_by_plane_exactly(order, monkeypatch):
    import medseg.io.geometry as geometry
    from medseg.io.geometry import contiguous

    monkeypatch.setattr(geometry, "_THREADED_COPY_BYTES", 0)  # plane by plane even when small
    source = np.arange(30 * 40 * 50, dtype=np.float32).reshape(30, 40, 50)
    view = source.transpose(order)[::-1, :, ::-1]
    copied = contiguous(view)
    assert copied.flags.c_contiguous and copied.shape == view.shape
    np.testing.assert_array_equal(copied, view)
