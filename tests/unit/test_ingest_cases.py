"""Ingest of 3D cases: DICOM/NRRD/NIfTI per case folder, grids, label rules, normalisation, spacing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medseg.errors import DataError
from medseg.io.dataset import load_case
from medseg.io.geometry import resample_to_spacing
from medseg.io.ingest import IngestParams, ingest_dataset
from medseg.io.preprocessing import NormalizeParams, normalize_intensity
from medseg.io.readers import write_image
from medseg.io.volume import Volume, affine_from_spacing
from tests.conftest import SHARED_DATA, require

DCMQI = SHARED_DATA / "dicom" / "dcmqi-segmentations" / "24x38x3"
TOTALSEG = SHARED_DATA / "dicom" / "totalsegmentator-example"


def params(**overrides) -> IngestParams:
    return IngestParams.model_validate(
        {"layout": "cases", "train_on": "all", "split": {"val_fraction": 0, "test_fraction": 0}, **overrides}
    )


def ingest(source: Path, out: Path, **overrides):
    out.mkdir()
    return ingest_dataset(source, params(**overrides), out, seed=0, progress=lambda *a: None)


def link_case(root: Path, name: str, image: Path, label: Path) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "image").symlink_to(image, target_is_directory=image.is_dir())
    (folder / f"label{''.join(label.suffixes)}").symlink_to(label)


def test_real_dicom_series_with_nrrd_label_ingests_in_ras(tmp_path):
    require(DCMQI)
    link_case(tmp_path / "src", "Smith^John", DCMQI / "image", DCMQI / "nrrd" / "label.nrrd")
    index, source_map = ingest(tmp_path / "src", tmp_path / "out", normalize={"method": "none"})
    assert index.spatial_dims == 3 and source_map == {"case_0001": "Smith^John"}
    image, label = load_case(tmp_path / "out", index.cases[0])
    assert image.spatial_shape == label.spatial_shape == (24, 38, 3)
    assert np.allclose(np.diag(image.affine)[:3], [0.7, 0.7, 2.5])  # RAS+: positive diagonal
    assert np.array_equal(image.affine, label.affine) and label.array.max() == 1
    assert "Smith" not in (tmp_path / "out" / "dataset.json").read_text()


def test_real_ct_series_and_its_flipped_nifti_seg_line_up_in_ras(tmp_path):
    """The seg NIfTI is stored flipped against the DICOM pixel order; in RAS+ both share one grid."""
    require(TOTALSEG)
    link_case(
        tmp_path / "src", "MRN-0001", TOTALSEG / "example_ct_dicom", TOTALSEG / "example_seg_dicom.nii.gz"
    )
    index, _ = ingest(tmp_path / "src", tmp_path / "out", normalize={"method": "none"})
    image, label = load_case(tmp_path / "out", index.cases[0])
    assert image.spatial_shape == label.spatial_shape == (512, 512, 20)
    hu = image.array[0]
    assert float(hu[label.array[0] == 5].mean()) == pytest.approx(89, abs=5)  # liver, HU
    assert float(hu[label.array[0] == 52].mean()) == pytest.approx(177, abs=10)  # aorta, HU


def test_label_on_another_grid_is_refused_or_resampled(tmp_path):
    require(TOTALSEG)
    link_case(
        tmp_path / "src",
        "MRN-0001",
        TOTALSEG / "example_ct_dicom",
        TOTALSEG / "example_seg_roi_subset.nii.gz",
    )
    with pytest.raises(DataError) as raised:
        ingest(tmp_path / "src", tmp_path / "refused")
    message = str(raised.value)
    assert message.startswith("case case_0001: label: the label does not lie on the image grid")
    assert "shape (122, 101, 30) vs image (512, 512, 20)" in message and "MRN" not in message
    assert "spacing (3.000, 3.000, 3.000) mm vs image (0.977, 0.977, 2.000) mm" in message
    assert not any((tmp_path / "refused").iterdir())  # nothing half-written

    coarse = tmp_path / "coarse"
    link_case(coarse, "MRN-0001", TOTALSEG / "example_ct_dicom", TOTALSEG / "example_seg_dicom.nii.gz")
    index, _ = ingest(
        coarse,
        tmp_path / "out",
        label_grid="resample",
        spacing=[3.0, 3.0, 3.0],
        normalize={"method": "ct", "window": [-200, 300]},
    )
    image, label = load_case(tmp_path / "out", index.cases[0])
    assert label.spatial_shape == image.spatial_shape == (167, 167, 13)
    assert image.array.min() >= 0 and image.array.max() <= 1  # the CT window maps to [0, 1]
    liver = image.array[0][label.array[0] == 5]
    assert float(liver.mean()) * 500 - 200 == pytest.approx(89, abs=8)  # still liver HU after resampling


def synthetic_cases(root: Path, values=(1, 2), count=3) -> Path:
    for number in range(count):
        image = np.random.default_rng(number).normal(100, 20, (16, 16, 8)).astype(np.float32)
        label = np.zeros((16, 16, 8), np.int32)
        label[4:8, 4:8, 2:4], label[10:14, 10:14, 4:6] = values
        affine = affine_from_spacing((1.0, 1.0, 2.0))
        folder = root / f"patient-{number}"
        folder.mkdir(parents=True)
        write_image(Volume(image[None], affine), folder / "image.nii.gz")
        write_image(Volume(label[None], affine, kind="label"), folder / "label.nii.gz")
    return root


def test_label_values_are_checked_and_classes_can_be_merged(tmp_path):
    source = synthetic_cases(tmp_path / "src", values=(1, 7))
    with pytest.raises(DataError, match=r"case case_0001: label: values \[7\] are not among"):
        ingest(source, tmp_path / "a", label_values=[1, 2])
    index, _ = ingest(source, tmp_path / "b", labels="binary", label_values=[1, 7])
    _, label = load_case(tmp_path / "b", index.cases[0])
    assert np.unique(label.array).tolist() == [0, 1] and int(label.array.sum()) == 2 * 4 * 4 * 2


def test_spacing_resamples_images_linearly_and_labels_by_nearest(tmp_path):
    source = synthetic_cases(tmp_path / "src")
    index, _ = ingest(source, tmp_path / "out", spacing=[2.0, 2.0, 2.0], normalize={"method": "zscore"})
    image, label = load_case(tmp_path / "out", index.cases[0])
    assert image.spatial_shape == label.spatial_shape == (8, 8, 8)
    assert image.spacing == pytest.approx((2.0, 2.0, 2.0))
    assert set(np.unique(label.array).tolist()) <= {0, 1, 2}
    assert abs(float(image.array.mean())) < 0.2  # z-scored before resampling


def test_resample_to_spacing_keeps_world_positions():
    labels = np.zeros((10, 10, 10), np.int32)
    labels[4:6, 4:6, 4:6] = 1
    volume = Volume(labels[None], affine_from_spacing((1.0, 1.0, 1.0)), kind="label")
    coarse = resample_to_spacing(volume, (2.0, 2.0, 2.0), order=0)
    assert coarse.spatial_shape == (5, 5, 5)
    centre = coarse.affine @ np.append(np.argwhere(coarse.array[0]).mean(0), 1)
    assert centre[:3] == pytest.approx([4.5, 4.5, 4.5], abs=0.6)


def test_normalisation_presets_known_answers():
    data = np.array([-2000.0, -1000.0, 0.0, 1000.0, 3000.0])
    assert normalize_intensity(data, NormalizeParams(method="ct", window=(-1000, 1000))).tolist() == [
        0.0,
        0.0,
        0.5,
        1.0,
        1.0,
    ]
    z = normalize_intensity(np.array([1.0, 2.0, 3.0]), NormalizeParams(method="zscore"))
    assert z.tolist() == pytest.approx([-1.2247449, 0.0, 1.2247449])


def test_case_folder_patterns_must_match_once(tmp_path):
    source = synthetic_cases(tmp_path / "src", count=2)
    (source / "patient-1" / "image-copy.nii.gz").write_bytes(b"")
    with pytest.raises(
        DataError, match=r"case 2 of 2 has 2 entries matching ingest.image 'image\*'"
    ) as raised:
        ingest(source, tmp_path / "out")
    assert "patient" not in str(raised.value)


SEGS = SHARED_DATA / "dicom" / "dcmqi-segmentations"


@pytest.mark.parametrize(
    ("image", "seg", "nrrd"),
    [
        ("ct-3slice", "liver.dcm", "liver_seg.nrrd"),
        ("24x38x3/image", "24x38x3/seg/label.seg", "24x38x3/nrrd/label.nrrd"),
        ("24x38x3/image", "sparse-labelmap-noppv.dcm", "sparse_labelmap_noppv_seg.nrrd"),
        ("ct-3slice", "liver_spine_gapped_seg.nrrd", "liver_spine_gapped_seg.nrrd"),  # gapped label map
    ],
)
def test_real_dicom_seg_labels_match_their_nrrd_label_maps(tmp_path, image, seg, nrrd):
    from medseg.io.geometry import canonical
    from medseg.io.readers import read_image

    require(SEGS)
    link_case(tmp_path / "src", "ACC-1", SEGS / image, SEGS / seg)
    index, _ = ingest(tmp_path / "src", tmp_path / "out", normalize={"method": "none"})
    _, label = load_case(tmp_path / "out", index.cases[0])
    expected = canonical(read_image(SEGS / nrrd, kind="label"))
    assert np.count_nonzero(label.array) > 0
    assert np.array_equal(label.array, expected.array)  # voxel for voxel, segment numbers as values


def test_overlapping_dicom_seg_segments_are_refused_or_resolved(tmp_path):
    from medseg.io.geometry import canonical
    from medseg.io.readers import read_image

    require(SEGS)
    link_case(tmp_path / "src", "ACC-1", SEGS / "ct-3slice", SEGS / "partial_overlaps.dcm")
    with pytest.raises(
        DataError, match=r"case case_0001: label.dcm: segments overlap.*segment_overlap: highest"
    ):
        ingest(tmp_path / "src", tmp_path / "refused")
    index, _ = ingest(tmp_path / "src", tmp_path / "out", segment_overlap="highest")
    _, label = load_case(tmp_path / "out", index.cases[0])
    # dcmqi's maps: segments 1, 4, 5 in the first, 2 and 3 in the others; the highest number wins.
    maps = [canonical(read_image(SEGS / f"partial_overlaps-{i}.nrrd", kind="label")).array for i in (1, 2, 3)]
    assert np.array_equal(label.array, np.maximum.reduce(maps))
    assert np.unique(label.array).tolist() == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("flavour", ["msd", "nnunet"])
def test_msd_and_nnunet_layouts_with_declared_labels(tmp_path, flavour):
    import json

    source = synthetic_cases(tmp_path / "cases", values=(1, 2))
    root = tmp_path / "Dataset001_Test"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    for number, folder in enumerate(sorted(source.iterdir())):
        name = f"test_{number:03d}"
        image = root / "imagesTr" / (f"{name}_0000.nii.gz" if flavour == "nnunet" else f"{name}.nii.gz")
        image.symlink_to(folder / "image.nii.gz")
        (root / "labelsTr" / f"{name}.nii.gz").symlink_to(folder / "label.nii.gz")
        training.append({"image": f"./imagesTr/{image.name}", "label": f"./labelsTr/{name}.nii.gz"})
    if flavour == "msd":
        document = {
            "modality": {"0": "CT"},
            "labels": {"0": "background", "1": "liver"},
            "training": training,
        }
    else:
        document = {
            "channel_names": {"0": "CT"},
            "labels": {"background": 0, "liver": 1},
            "file_ending": ".nii.gz",
        }
    (root / "dataset.json").write_text(json.dumps(document))
    with pytest.raises(
        DataError, match=r"label: values \[2\] are not among the declared ingest.label_values \[0, 1\]"
    ):
        ingest(root, tmp_path / "strict", layout="msd")
    index, source_map = ingest(root, tmp_path / "out", layout="msd", label_values=[1, 2])
    assert len(index.cases) == 3 and sorted(source_map.values()) == ["test_000", "test_001", "test_002"]


def test_nifti_header_announcing_absurd_size_is_refused_before_reading(tmp_path):
    import nibabel as nib

    from medseg.io.readers import read_image

    header = nib.Nifti1Header()
    header.set_data_shape((30000, 30000, 3000))
    header.set_data_dtype(np.int16)
    path = tmp_path / "huge.nii"
    with path.open("wb") as handle:  # a header and no data: a damaged or hostile file
        header.write_to(handle)
    with pytest.raises(
        DataError,
        match=r"huge.nii: the header announces 30000x30000x3000 voxels, 10058.3 GiB, over the 8 GiB limit",
    ):
        read_image(path)
