"""Training images for text-to-image, prepared as diffusers' training scripts prepare them.

::

    file ──read_image (the model's channel count; a bad file is an error naming it)──> uint8 (H, W, C)
         ──resize: shorter side -> resolution (task.interpolation; torchvision Resize's sizes)
           once, at encode time──> uint8 (R', R'', C), min(R', R'') = resolution
    collate ──crop resolution x resolution: centre (task.center_crop, and always at evaluation)
              or random (while training; torchvision RandomCrop's draws, none when nothing to crop)
            ──flip left-right with p = 1/2 (task.random_flip, while training)
            ──> (C, R, R) in [-1, 1] (x / 127.5 − 1, i.e. ToTensor + Normalize(0.5, 0.5))

Random draws come from torch's generator (resume repeats them), or from a row's own generator
at evaluation (where crops are central and nothing flips).
"""

from __future__ import annotations

import numpy as np
import torch

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")


def resize_shorter(image: np.ndarray, size: int, interpolation: str = "lanczos") -> np.ndarray:
    """uint8 (H, W, C) with its shorter side scaled to ``size`` (the longer one as torchvision's
    ``Resize(size)`` computes it: ``int(size * long / short)``); unchanged when it already is."""
    from PIL import Image

    h, w, channels = image.shape
    short, long = (h, w) if h <= w else (w, h)
    if short == size:
        return image
    new_long = int(size * long / short)
    new_h, new_w = (size, new_long) if h <= w else (new_long, size)
    pil = Image.fromarray(image[..., 0] if channels == 1 else image)
    method = getattr(Image.Resampling, interpolation.upper())
    array = np.asarray(pil.resize((new_w, new_h), method))
    return array[..., None] if array.ndim == 2 else array


def crop_offsets(
    height: int, width: int, size: int, random: bool, generator: torch.Generator | None = None
) -> tuple[int, int]:
    """``(top, left)`` of a ``size`` x ``size`` crop: centred (torchvision CenterCrop's rounding)
    or drawn as RandomCrop draws them (no draw when the image is already ``size`` square)."""
    if height == size and width == size:
        return 0, 0
    if not random:
        return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    top = int(torch.randint(0, height - size + 1, (1,), generator=generator))
    left = int(torch.randint(0, width - size + 1, (1,), generator=generator))
    return top, left


def flip_drawn(generator: torch.Generator | None = None) -> bool:
    """RandomHorizontalFlip's coin: one draw, True with probability 1/2."""
    return bool(torch.rand(1, generator=generator) < 0.5)


def to_model_range(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, C) -> float (C, H, W) in [-1, 1]."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(127.5).sub(1)  # a copy


def prepared(
    image: np.ndarray,
    size: int,
    training: bool,
    center_crop: bool,
    random_flip: bool,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One stored (resized) image as the model reads it: cropped, maybe flipped, (C, R, R)."""
    top, left = crop_offsets(image.shape[0], image.shape[1], size, training and not center_crop,
                             generator)  # fmt: skip
    image = image[top : top + size, left : left + size]
    if training and random_flip and flip_drawn(generator):
        image = image[:, ::-1]
    return to_model_range(image)


__all__ = [
    "INTERPOLATIONS",
    "crop_offsets",
    "flip_drawn",
    "prepared",
    "resize_shorter",
    "to_model_range",
]
