"""Networks by name: MONAI's U-Net, the original U-Net layout, and plugins (``NETS``)."""

from medseg.nets.unet import NETS, NetEntry, NetParams, build_net

__all__ = ["NETS", "NetEntry", "NetParams", "build_net"]
