"""Read and write single images: TIFF/PNG microscopy, NIfTI, NRRD and DICOM series folders."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medseg.errors import DataError
from medseg.io.geometry import LPS_TO_RAS
from medseg.io.volume import Volume, VolumeKind, affine_from_spacing

if TYPE_CHECKING:
    from medseg.io.dicom import SeriesRules

TIFF_SUFFIXES = (".tif", ".tiff")
PNG_SUFFIXES = (".png",)
NIFTI_SUFFIXES = (".nii", ".nii.gz")
NRRD_SUFFIXES = (".nrrd", ".nhdr")
DICOM_SEG_SUFFIXES = (".dcm", ".seg")
IMAGE_SUFFIXES = TIFF_SUFFIXES + PNG_SUFFIXES + NIFTI_SUFFIXES + NRRD_SUFFIXES + DICOM_SEG_SUFFIXES


def image_suffix(path: Path) -> str:
    """Return the lower-case image suffix of ``path`` (``.nii.gz`` counted as one)."""
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return path.suffix.lower()


def image_stem(path: Path) -> str:
    """A file's name without its image suffix (``ct.nii.gz`` → ``ct``); a folder's name as is."""
    suffix = image_suffix(path)
    return path.name[: -len(suffix)] if suffix and not path.is_dir() else path.name


def read_image(path: str | Path, *, kind: VolumeKind = "image", series: SeriesRules | None = None) -> Volume:
    """Read a TIFF, PNG, NIfTI or NRRD file, or a folder holding one DICOM series.

    2D microscopy files give shape ``(1, H, W)`` with unit spacing; NIfTI and NRRD give
    ``(1, I, J[, K])`` with the file's geometry as a RAS affine (mm); a DICOM folder gives
    ``(1, X, Y, Z)`` reoriented to RAS+ (see ``medseg.io.dicom``), the one image series that
    ``series`` selects (default: any image modality); a ``.dcm``/``.seg`` file must be a
    DICOM SEG label (segment numbers as label values). Labels are int32. The array is
    C-contiguous: NIfTI holds Fortran order, and every ``ravel`` of a Fortran-ordered label
    (each score of each post-processing candidate) would copy it.

    Raises:
        DataError: the file is missing, of an unknown type, or unreadable; a folder holds
            no DICOM series or several.

    """
    path = Path(path)
    suffix = image_suffix(path)
    if path.is_dir():
        return _read_dicom_folder(path, kind, series)
    if not path.is_file():
        raise DataError(f"{path.name}: file not found in {path.parent.name}/; check the input path")
    if path.stat().st_size == 0:
        raise DataError(f"{path.name}: file is empty (0 bytes); replace it with a valid image")
    if suffix in DICOM_SEG_SUFFIXES:
        from medseg.io.dicom import read_dicom_seg

        if kind != "label":
            raise DataError(
                f"{path.name}: a single DICOM file is read as a SEG label; point images at a series folder"
            )
        return read_dicom_seg(path)
    try:
        if suffix in TIFF_SUFFIXES:
            array, affine = _read_tiff(path)
        elif suffix in PNG_SUFFIXES:
            array, affine = _read_png(path)
        elif suffix in NIFTI_SUFFIXES:
            array, affine = _read_nifti(path)
            if array.ndim == 4 and kind == "image":  # channels last (x, y, z, c): channel-first
                return Volume(array=np.ascontiguousarray(np.moveaxis(array, -1, 0)), affine=affine, kind=kind)
        elif suffix in NRRD_SUFFIXES:
            array, affine = _read_nrrd(path)
        else:
            raise DataError(
                f"{path.name}: unsupported image type '{suffix}'; use one of {', '.join(IMAGE_SUFFIXES)}"
            )
    except DataError:
        raise
    except Exception as exc:
        raise DataError(
            f"{path.name}: cannot read image ({type(exc).__name__}: {exc}); "
            "the file is damaged or not a valid image"
        ) from exc
    if array.size == 0:
        raise DataError(
            f"{path.name}: cannot read image (no pixel data found); the file is damaged or not a valid image"
        )
    if kind == "label":
        if np.issubdtype(array.dtype, np.floating) and not np.all(np.mod(array, 1) == 0):
            raise DataError(f"{path.name}: label image has non-integer values; labels must be integers")
        array = array.astype(np.int32, order="C")  # one copy, already in the order returned
    return Volume(array=np.ascontiguousarray(array[None]), affine=affine, kind=kind)


def _read_tiff(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import tifffile

    array = np.asarray(tifffile.imread(path))
    return _squeeze_2d(array, path), affine_from_spacing((1.0, 1.0))


def _read_png(path: Path) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    with Image.open(path) as handle:
        array = np.asarray(handle)
    return _squeeze_2d(array, path), affine_from_spacing((1.0, 1.0))


def _squeeze_2d(array: np.ndarray, path: Path) -> np.ndarray:
    if array.size == 0:
        return array
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        array = array[..., :3].mean(axis=-1)
    if array.ndim != 2:
        raise DataError(
            f"{path.name}: expected a single-plane 2D image, got shape {array.shape}; "
            "split stacks into one file per frame"
        )
    return array


MAX_GIB = 8.0
"""Largest image a header may announce (GiB as float32); larger ones are refused before reading."""


def _refuse_absurd(path: Path, shape: tuple[int, ...]) -> None:
    needed = float(np.prod(np.asarray(shape, dtype=np.float64))) * 4 / 2**30
    if needed > MAX_GIB:
        raise DataError(
            f"{path.name}: the header announces {'x'.join(str(s) for s in shape)} voxels, {needed:.1f} GiB, "
            f"over the {MAX_GIB:g} GiB limit; the header is damaged or the image must be cropped first"
        )


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    image = nib.load(str(path))
    _refuse_absurd(path, tuple(int(size) for size in image.shape))
    array = np.asanyarray(image.dataobj)
    if array.ndim > 4:
        array = np.squeeze(array, axis=tuple(range(4, array.ndim)))
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    return np.asarray(array), np.asarray(image.affine, dtype=np.float64)


def _read_nrrd(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """NRRD through SimpleITK: array ``(x, y[, z])`` and its LPS geometry turned into RAS."""
    import SimpleITK as sitk  # noqa: N813

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    _refuse_absurd(path, tuple(int(size) for size in reader.GetSize()))
    image = reader.Execute()
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(
            f"{path.name}: has {image.GetNumberOfComponentsPerPixel()} components per voxel; expected 1"
        )
    array = sitk.GetArrayFromImage(image).T  # SimpleITK gives (z, y, x)
    dims = image.GetDimension()
    affine = np.eye(4)
    affine[:dims, :dims] = np.array(image.GetDirection()).reshape(dims, dims) * np.array(image.GetSpacing())
    affine[:dims, 3] = image.GetOrigin()
    return array, LPS_TO_RAS @ affine


def _read_dicom_folder(path: Path, kind: VolumeKind, rules: SeriesRules | None) -> Volume:
    from medseg.io.dicom import find_series, find_stacks, read_series, read_stacks

    scaling = rules.philips_scaling if rules is not None else "display"
    if rules is not None and rules.channels != "none" and kind == "image":
        return read_stacks(find_stacks(path, rules), scaling=scaling)
    volume = read_series(find_series(path, rules), scaling=scaling)
    if kind == "label":
        return Volume(np.rint(volume.array).astype(np.int32), volume.affine, kind="label", meta=volume.meta)
    return volume


def write_image(volume: Volume, path: str | Path) -> Path:
    """Write a ``Volume`` as NIfTI (``.nii``/``.nii.gz``) or TIFF.

    Labels are written as int32 (NIfTI) or uint16 (TIFF, the CTC convention); images keep
    their dtype. A 3D image of several channels is written as a 4D NIfTI, channels last
    (read back channel-first). Returns the path written.

    Raises:
        DataError: several channels where the format or kind cannot hold them, or an
            unsupported suffix.

    """
    path = Path(path)
    suffix = image_suffix(path)
    channels = volume.array.shape[0]
    if channels != 1 and not (suffix in NIFTI_SUFFIXES and volume.kind == "image" and volume.array.ndim == 4):
        raise DataError(
            f"{path.name}: can only write single-channel volumes here (several channels: 3D images as "
            f"NIfTI), got {channels} channels"
        )
    data = volume.array[0] if channels == 1 else np.moveaxis(volume.array, 0, -1)
    if suffix in NIFTI_SUFFIXES:
        import nibabel as nib

        if volume.kind == "label":
            data = data.astype(np.int32)
        nib.save(nib.Nifti1Image(data, volume.affine), str(path))
    elif suffix in TIFF_SUFFIXES:
        import tifffile

        if volume.kind == "label":
            data = data.astype(np.uint16)
        tifffile.imwrite(path, data, compression="zlib")
    else:
        raise DataError(f"{path.name}: cannot write '{suffix}'; use .nii, .nii.gz or .tif")
    return path
