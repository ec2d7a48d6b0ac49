"""``task.cache_latents``: each training image through the VAE encoder once, not every step.

::

    stored image (resized) ──centre crop──> (C, R, R) ──VAE encoder (batches of 16)──>
        latent_mean, latent_std (C_lat, R/f, R/f)    + the same for the flipped image
                                                       (task.random_flip: both orientations)
    collate: z0 = (mean + std · ε_lat − shift) · scaling_factor, ε_lat fresh each time

The VAE encoder is deterministic, so sampling ``mean + std · ε`` from the cache is exactly what
encoding the image every step samples (tested: same batch, same ε -> the same loss). Random
crops would change every epoch, so an image that needs cropping must be centre-cropped
(``task.center_crop: true``) to be cached; the error names it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .t2i_images import to_model_range

ENCODE_BATCH = 16


def check_cacheable(features: Sequence[dict[str, Any]], size: int, center_crop: bool) -> None:
    """ValueError naming the first image a random crop would change, unless crops are central."""
    if center_crop:
        return
    for f in features:
        h, w = f["image"].shape[:2]
        if (h, w) != (size, size):
            raise ValueError(
                f"{f.get('source', 'an image')}: {w}x{h} after resizing needs a crop to "
                f"{size}x{size}, and random crops change every epoch while task.cache_latents "
                "encodes each image once; set task.center_crop: true (or cache_latents: false)"
            )


@torch.no_grad()
def encode_latents(
    unet: Any,
    images: Sequence[np.ndarray],
    size: int,
    flipped: bool,
    device: torch.device | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Per image ``{"latent_mean", "latent_std"}`` (C_lat, h, w) float32 on the CPU, plus
    ``"flip_mean"`` / ``"flip_std"`` when ``flipped``."""
    from ..diffusion.latents import latent_distribution

    vae = unet.vae
    device = device or next(vae.parameters()).device
    out: list[dict[str, torch.Tensor]] = [{} for _ in images]
    variants = [("latent", False)] + ([("flip", True)] if flipped else [])
    for name, flip in variants:
        for start in range(0, len(images), ENCODE_BATCH):
            batch = []
            for image in images[start : start + ENCODE_BATCH]:
                h, w = image.shape[:2]
                top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
                crop = image[top : top + size, left : left + size]
                batch.append(to_model_range(crop[:, ::-1] if flip else crop))
            mean, std = latent_distribution(vae, torch.stack(batch).to(device))
            for k in range(len(batch)):
                out[start + k][f"{name}_mean"] = mean[k].float().cpu()
                out[start + k][f"{name}_std"] = std[k].float().cpu()
    return out


__all__ = ["ENCODE_BATCH", "check_cacheable", "encode_latents"]
