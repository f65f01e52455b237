import numpy as np
import pytest

from medseg.errors import DataError
from medseg.io.ingest import SplitParams, split_cases
from medseg.io.layouts import discover_ctc, discover_paired, is_fully_annotated
from medseg.io.preprocessing import NormalizeParams, normalize_intensity
from medseg.io.readers import read_image, write_image
from medseg.io.volume import Volume, affine_from_spacing
from tests.conftest import GOWT1, require


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".tif"])
def test_label_round_trip_keeps_values_and_geometry(tmp_path, suffix):
    labels = np.arange(60, dtype=np.int32).reshape(1, 6, 10) % 7
    affine = affine_from_spacing((0.5, 0.25)) if suffix != ".tif" else np.eye(4)
    written = write_image(Volume(labels, affine, kind="label"), tmp_path / f"mask{suffix}")
    back = read_image(written, kind="label")
    np.testing.assert_array_equal(back.array, labels)
    assert back.array.flags.c_contiguous  # NIfTI holds Fortran order: a ravel would copy it every time
    np.testing.assert_allclose(back.affine, affine)
    if suffix != ".tif":
        assert back.spacing == (0.5, 0.25)


def test_nifti_3d_image_keeps_affine(tmp_path):
    affine = np.array([[-0.8, 0, 0, 10], [0, 0.8, 0, -5], [0, 0, 3.0, 2], [0, 0, 0, 1]])
    image = np.random.default_rng(0).normal(size=(1, 4, 5, 6)).astype(np.float32)
    back = read_image(write_image(Volume(image, affine), tmp_path / "ct.nii.gz"))
    assert back.spatial_dims == 3 and back.spacing == pytest.approx((0.8, 0.8, 3.0))
    np.testing.assert_allclose(back.affine, affine)
    np.testing.assert_array_equal(back.array, image)


def test_read_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match=r"^missing\.tif: file not found"):
        read_image(tmp_path / "missing.tif")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"notes\.txt: unsupported image type '\.txt'"):
        read_image(tmp_path / "notes.txt")
    (tmp_path / "bad.nii.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(DataError, match=r"^bad\.nii\.gz: cannot read image"):
        read_image(tmp_path / "bad.nii.gz")
    write_image(Volume(np.full((1, 2, 2), 0.5, np.float32)), tmp_path / "float.nii")
    with pytest.raises(DataError, match="non-integer values"):
        read_image(tmp_path / "float.nii", kind="label")


def test_fully_annotated_when_every_marker_lies_on_an_object():
    label = np.zeros((6, 6), int)
    label[0:2, 0:2] = 1
    markers = np.zeros_like(label)
    markers[0, 0] = 5
    assert is_fully_annotated(label, markers)
    markers[4, 4] = 6  # a cell nobody outlined
    assert not is_fully_annotated(label, markers)
    assert is_fully_annotated(label, None)


def test_gowt1_ctc_layout_and_its_fully_annotated_frames():
    root = require(GOWT1)
    cases = discover_ctc(root, "01")
    assert len(cases) == 30
    full = []
    for case in cases:
        label = read_image(case.label, kind="label").array[0]
        markers = read_image(case.marker, kind="label").array[0]
        if is_fully_annotated(label, markers):
            full.append(case.source_name)
    assert full == ["01/t021", "01/t031", "01/t033", "01/t039"]  # as the data's README says


def test_ctc_layout_errors(tmp_path):
    with pytest.raises(DataError, match=r"folder '01' not found"):
        discover_ctc(tmp_path, "01")
    (tmp_path / "01").mkdir()
    (tmp_path / "01_GT" / "SEG").mkdir(parents=True)
    (tmp_path / "01_GT" / "SEG" / "man_seg007.tif").write_bytes(b"x")
    with pytest.raises(DataError, match=r"man_seg007\.tif has no frame t007\.tif"):
        discover_ctc(tmp_path, "01")


def test_paired_layout_requires_a_label_per_image(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for name in ("a", "b"):
        (tmp_path / "images" / f"{name}.png").write_bytes(b"")
    (tmp_path / "labels" / "a.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"the image of case_0002 .* has no label of the same name") as error:
        discover_paired(tmp_path, "images", "labels")
    assert "b.png" not in str(error.value) and error.value.local_detail == "case_0002 is 'b.png' in 'images/'"


def test_percentile_normalisation_known_answer():
    image = np.arange(101, dtype=np.uint16)
    out = normalize_intensity(image, NormalizeParams(lower=0, upper=100))
    assert out.dtype == np.float32 and out[0] == 0.0 and out[-1] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="NaN"):
        normalize_intensity(np.array([1.0, np.nan]), NormalizeParams())


def test_splits_are_seeded_and_keep_sparse_cases_in_test():
    ids = [f"case_{i:04d}" for i in range(1, 11)]
    trainable = [True] * 8 + [False] * 2
    split = split_cases(ids, trainable, SplitParams(val_fraction=0.25, test_fraction=0.25), seed=0)
    assert (len(split["train"]), len(split["val"]), len(split["test"])) == (4, 2, 4)
    assert {"case_0009", "case_0010"} <= set(split["test"])
    assert split == split_cases(ids, trainable, SplitParams(val_fraction=0.25, test_fraction=0.25), seed=0)
    assert split != split_cases(ids, trainable, SplitParams(val_fraction=0.25, test_fraction=0.25), seed=1)
    with pytest.raises(DataError, match="only 2 trainable case"):
        split_cases(ids[:2], [True, True], SplitParams(val_fraction=0.5, test_fraction=0.5), seed=0)


def test_png_and_paired_layout(tmp_path):
    from PIL import Image

    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    grey = (np.arange(48).reshape(6, 8) * 5).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "images" / "slide.png")
    Image.fromarray(np.dstack([grey] * 3)).save(tmp_path / "images" / "rgb.png")
    labels = (grey > 100).astype(np.uint8)
    for name in ("slide", "rgb"):
        Image.fromarray(labels).save(tmp_path / "labels" / f"{name}.png")
    cases = discover_paired(tmp_path, "images", "labels")
    assert [case.source_name for case in cases] == ["rgb", "slide"]
    np.testing.assert_array_equal(read_image(cases[1].image).array[0], grey)
    np.testing.assert_allclose(read_image(cases[0].image).array[0], grey)  # RGB → grey
    np.testing.assert_array_equal(read_image(cases[1].label, kind="label").array[0], labels)
