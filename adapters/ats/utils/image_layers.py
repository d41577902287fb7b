"""``ats.utils.image_layers``: kept for code that imported it; the layers are in :mod:`ats.keras.image_layers`."""

from ..keras.image_layers import ImageLinearTransform, ImagePan, ResizeImages

__all__ = ["ResizeImages", "ImageLinearTransform", "ImagePan"]
