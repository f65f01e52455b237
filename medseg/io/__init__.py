"""Image I/O: the ``Volume`` type, single-file readers/writers and dataset layouts."""

from medseg.io.readers import read_image, write_image
from medseg.io.volume import Volume

__all__ = ["Volume", "read_image", "write_image"]
