"""Image preprocessing as the model was trained with it, plus light training augmentation.

::

    image file / array / PIL ──read_image──> uint8 (H, W, C), C = the model's channel count
      training only: random crop (area in [crop_scale, 1], aspect 3/4..4/3) + horizontal flip
      ──> resize (to size, or shortest edge then centre crop) ──> /255 ──> (x - mean) / std
      ──> float (C, H, W)

:class:`ImagePreprocessing` holds the numbers (size, mean, std, resample); they come from a
transformers image processor's config (:meth:`ImagePreprocessing.from_processor`) or from a plain
vision model's own entry (:mod:`peftkit.vision.models`). Random draws use torch's global
generator, which a resumed run restores, so augmentation repeats exactly after ``--resume``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

# PIL resample codes (the values transformers' processor configs store)
_BILINEAR, _BICUBIC = 2, 3


class ImageReadError(ValueError):
    """An image that cannot be used, with the file (or row) named first."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")
        self.where = where


@dataclasses.dataclass(frozen=True)
class ImagePreprocessing:
    """How images become ``pixel_values``.

    Attributes:
        size: (height, width) the model reads.
        shortest_edge: resize the shorter side to this, then centre-crop to ``size``
            (ConvNeXt / ResNet processors); None: resize straight to ``size`` (ViT).
        mean, std: per-channel normalisation after scaling to [0, 1].
        channels: channel count the model reads (1 or 3).
        resample: PIL resample code (2 bilinear, 3 bicubic).
    """

    size: tuple[int, int]
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    channels: int = 3
    shortest_edge: int | None = None
    resample: int = _BILINEAR

    @classmethod
    def from_processor(cls, processor: Any, channels: int = 3) -> ImagePreprocessing:
        """The numbers of a transformers image processor (ViT, ConvNeXt, ResNet, DeiT...)."""
        size = _size_dict(getattr(processor, "size", None))
        crop = _size_dict(getattr(processor, "crop_size", None))
        shortest = size.get("shortest_edge")
        if "height" in size and "width" in size:
            hw = (int(size["height"]), int(size["width"]))
        elif shortest is not None:
            if getattr(processor, "do_center_crop", False) and "height" in crop:
                hw = (int(crop["height"]), int(crop["width"]))
            else:
                # ConvNeXt: shortest_edge < 384 -> resize to shortest_edge / crop_pct, crop back
                pct = getattr(processor, "crop_pct", None) or 1.0
                hw = (int(shortest), int(shortest))
                shortest = int(round(shortest / pct)) if int(shortest) < 384 else int(shortest)
        else:
            raise ValueError(f"image processor {type(processor).__name__} gives no image size")
        normalize = getattr(processor, "do_normalize", True)
        mean = tuple(getattr(processor, "image_mean", None) or (0.0,) * channels)
        std = tuple(getattr(processor, "image_std", None) or (1.0,) * channels)
        if not normalize:
            mean, std = (0.0,) * channels, (1.0,) * channels
        resample = getattr(processor, "resample", _BILINEAR)
        resample = int(getattr(resample, "value", resample) or _BILINEAR)
        return cls(
            hw, _per_channel(mean, channels), _per_channel(std, channels), channels,
            int(shortest) if shortest is not None and "height" not in size else None, resample,
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """The numbers as a transformers-style ``preprocessor_config.json``."""
        h, w = self.size
        out: dict[str, Any] = {
            "size": {"height": h, "width": w},
            "do_resize": True,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "resample": self.resample,
        }
        if self.shortest_edge is not None:
            out.update(size={"shortest_edge": self.shortest_edge}, do_center_crop=True,
                       crop_size={"height": h, "width": w})  # fmt: skip
        return out

    def save_pretrained(self, folder: str | Path, **_: Any) -> None:
        """Write ``preprocessor_config.json`` (plain vision models keep their numbers there)."""
        import json

        from ..checkpoint import atomic_write_text

        out = Path(folder)
        atomic_write_text(out / "preprocessor_config.json", json.dumps(self.to_dict(), indent=2))

    def __call__(
        self, image: np.ndarray, augment: bool = False, flip: bool = True, crop_scale: float = 1.0
    ) -> torch.Tensor:
        """uint8 (H, W, C) -> normalised float (C, H, W); ``augment`` draws a crop and a flip."""
        from PIL import Image

        pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        if augment and crop_scale < 1.0:
            pil = _random_crop(pil, crop_scale)
        if augment and flip and float(torch.rand(())) < 0.5:
            pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        h, w = self.size
        if self.shortest_edge is not None:
            scale = self.shortest_edge / min(pil.size)
            pil = pil.resize(
                (max(w, round(pil.size[0] * scale)), max(h, round(pil.size[1] * scale))),
                self.resample,
            )
            left, top = (pil.size[0] - w) // 2, (pil.size[1] - h) // 2
            pil = pil.crop((left, top, left + w, top + h))
        else:
            pil = pil.resize((w, h), self.resample)
        x = torch.from_numpy(np.array(pil, dtype=np.float32) / 255.0)  # (H, W[, C])
        x = x.unsqueeze(-1) if x.ndim == 2 else x
        x = x.permute(2, 0, 1)  # (C, H, W)
        mean = torch.tensor(self.mean).view(-1, 1, 1)
        std = torch.tensor(self.std).view(-1, 1, 1)
        return (x - mean) / std


def _size_dict(size: Any) -> dict[str, Any]:
    if size is None:
        return {}
    if isinstance(size, int):
        return {"height": size, "width": size}
    items = size.items() if hasattr(size, "items") else vars(size).items()
    return {k: v for k, v in items if v is not None}


def _per_channel(values: Sequence[float], channels: int) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if channels == 1:
        return (sum(values) / len(values),)
    raise ValueError(f"normalisation has {len(values)} values for {channels} channels")


def _random_crop(pil: Any, min_area: float) -> Any:
    """A crop of ``min_area``..1 of the image's area with aspect ratio 3/4..4/3 (the idea of
    torchvision's RandomResizedCrop, kept mild for fine-tuning)."""
    w, h = pil.size
    r = torch.rand(3).tolist()
    area = w * h * (min_area + (1.0 - min_area) * r[0])
    ratio = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * r[1])
    cw = min(w, max(1, round(math.sqrt(area * ratio))))
    ch = min(h, max(1, round(math.sqrt(area / ratio))))
    left = int((w - cw) * r[2])
    top = int((h - ch) * float(torch.rand(())))
    return pil.crop((left, top, left + cw, top + ch))


def read_image(value: Any, channels: int = 3, root: str | Path | None = None) -> np.ndarray:
    """One image as uint8 (H, W, channels): a file path (relative to ``root`` if given), a
    (H, W) / (H, W, C) array (idx rows), or a PIL image. Grey images are repeated into 3
    channels and an alpha channel is dropped; anything else raises :class:`ImageReadError`
    naming the file."""
    from PIL import Image, UnidentifiedImageError

    where = "image"
    if isinstance(value, (str, Path)):
        path = Path(value).expanduser()
        if not path.is_absolute() and root is not None:
            path = Path(root).expanduser() / path
        where = str(path)
        if not path.is_file():
            raise ImageReadError(where, "image file not found")
        try:
            with Image.open(path) as im:
                im.load()
                array = _pil_array(im)
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise ImageReadError(where, f"not a readable image ({exc})") from None
    elif isinstance(value, Image.Image):
        array = _pil_array(value)
    elif isinstance(value, np.ndarray):
        array = value
    else:
        raise ImageReadError(where, f"expected a file path or an image array, got {value!r:.60}")
    return _to_channels(array, channels, where)


def _pil_array(im: Any) -> np.ndarray:
    if im.mode in ("I;16", "I", "F"):
        a = np.asarray(im, dtype=np.float32)
        top = float(a.max()) or 1.0
        return (a / top * 255).astype(np.uint8)
    if im.mode in ("P", "PA", "CMYK", "YCbCr", "HSV", "LAB", "1"):
        im = im.convert("RGBA" if "transparency" in im.info or im.mode == "PA" else "RGB")
    return np.asarray(im)


def _to_channels(array: np.ndarray, channels: int, where: str) -> np.ndarray:
    if array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.floating) and array.size and array.max() <= 1.0:
            array = array * 255
        array = np.clip(array, 0, 255).astype(np.uint8)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageReadError(where, f"expected a (height, width[, channels]) image, got shape "
                             f"{tuple(array.shape)}")  # fmt: skip
    c = array.shape[-1]
    if c == 2 or c == 4:  # grey + alpha, RGB + alpha: drop the alpha channel
        array, c = array[..., : c - 1], c - 1
    if c == channels:
        return np.ascontiguousarray(array)
    if c == 1 and channels == 3:
        return np.ascontiguousarray(np.repeat(array, 3, axis=-1))
    raise ImageReadError(
        where,
        f"image has {array.shape[-1]} channel(s) but the model reads {channels}"
        + ("; convert the images to greyscale" if channels == 1 else ""),
    )


__all__ = ["ImagePreprocessing", "ImageReadError", "read_image"]
