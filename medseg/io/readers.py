"""Read and write single images: TIFF/PNG microscopy and NIfTI."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medseg.errors import DataError
from medseg.io.volume import Volume, VolumeKind, affine_from_spacing

TIFF_SUFFIXES = (".tif", ".tiff")
PNG_SUFFIXES = (".png",)
NIFTI_SUFFIXES = (".nii", ".nii.gz")
IMAGE_SUFFIXES = TIFF_SUFFIXES + PNG_SUFFIXES + NIFTI_SUFFIXES


def image_suffix(path: Path) -> str:
    """Return the lower-case image suffix of ``path`` (``.nii.gz`` counted as one)."""
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return path.suffix.lower()


def read_image(path: str | Path, *, kind: VolumeKind = "image") -> Volume:
    """Read a TIFF, PNG or NIfTI file into a channel-first ``Volume``.

    2D microscopy files give shape ``(1, H, W)`` with unit spacing; NIfTI gives
    ``(1, I, J[, K])`` with the file's affine (RAS, mm). Labels are returned as int32.

    Raises:
        DataError: the file is missing, of an unknown type, or unreadable.

    """
    path = Path(path)
    suffix = image_suffix(path)
    if not path.is_file():
        raise DataError(f"{path.name}: file not found in {path.parent.name}/; check the input path")
    if path.stat().st_size == 0:
        raise DataError(f"{path.name}: file is empty (0 bytes); replace it with a valid image")
    try:
        if suffix in TIFF_SUFFIXES:
            array, affine = _read_tiff(path)
        elif suffix in PNG_SUFFIXES:
            array, affine = _read_png(path)
        elif suffix in NIFTI_SUFFIXES:
            array, affine = _read_nifti(path)
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
        array = array.astype(np.int32)
    return Volume(array=array[None], affine=affine, kind=kind)


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


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    image = nib.load(str(path))
    array = np.asanyarray(image.dataobj)
    array = np.squeeze(array, axis=tuple(range(3, array.ndim))) if array.ndim > 3 else array
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    return np.asarray(array), np.asarray(image.affine, dtype=np.float64)


def write_image(volume: Volume, path: str | Path) -> Path:
    """Write a single-channel ``Volume`` as NIfTI (``.nii``/``.nii.gz``) or TIFF.

    Labels are written as int32 (NIfTI) or uint16 (TIFF, the CTC convention); images keep
    their dtype. Returns the path written.

    Raises:
        DataError: the volume has several channels or the suffix is unsupported.

    """
    path = Path(path)
    suffix = image_suffix(path)
    if volume.array.shape[0] != 1:
        raise DataError(
            f"{path.name}: can only write single-channel volumes, got {volume.array.shape[0]} channels"
        )
    data = volume.array[0]
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
