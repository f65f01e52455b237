"""Network builders returning MONAI networks."""

from medseg.nets.unet import NetParams, build_unet

__all__ = ["NetParams", "build_unet"]
