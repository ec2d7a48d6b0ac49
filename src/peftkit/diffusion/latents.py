"""Images <-> the latent space of a Stable Diffusion folder's VAE (frozen, never adapted).

::

    image x (B, 3, H, W) in [-1, 1] ──VAE encoder──> N(mean, std²) per latent value (B, 4, H/f, W/f)
    latents z0 = (mean + std · ε_latent − shift) · scaling_factor     (= latent_dist.sample() · s
                                                                      when shift_factor is None)
    z0 ──(z0 / scaling_factor + shift)──VAE decoder──> image (B, 3, H, W), shown as x/2 + 1/2

``f`` = 2^(number of VAE blocks − 1) (8 for SD). The encoder is deterministic: it gives the mean
and the standard deviation of the latent distribution, and the sample is ``mean + std · ε``. So
latents cached as (mean, std) and sampled with fresh ε each epoch train exactly as encoding the
image every step does (what ``task.cache_latents`` relies on). ``ε_latent`` comes with the batch
(torch's generator in collate), like the diffusion noise, so a resumed run repeats it. A VAE
without a distribution (diffusers' ``AutoencoderTiny``) gives its latents with std 0.
"""

from __future__ import annotations

from typing import Any

import torch


def vae_scale_factor(vae: Any) -> int:
    """How many pixels one latent value spans per side: 2^(len(block_out_channels) − 1)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def scaling(vae: Any) -> tuple[float, float]:
    """``(scaling_factor, shift_factor)`` of the VAE's config (shift 0 when it has none)."""
    scale = getattr(vae.config, "scaling_factor", None)
    shift = getattr(vae.config, "shift_factor", None)
    return float(1.0 if scale is None else scale), float(shift or 0.0)


@torch.no_grad()
def latent_distribution(vae: Any, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, std)`` (B, C_lat, H/f, W/f) of the VAE's latent distribution of ``pixels``
    (B, C, H, W) in [-1, 1]."""
    out = vae.encode(pixels.to(vae.dtype))
    dist = getattr(out, "latent_dist", None)
    if dist is None:  # AutoencoderTiny: deterministic latents
        latents = out.latents
        return latents, torch.zeros_like(latents)
    return dist.mean, dist.std


def to_latents(
    vae: Any, mean: torch.Tensor, std: torch.Tensor, latent_noise: torch.Tensor
) -> torch.Tensor:
    """The scaled latents the UNet denoises: ``(mean + std · ε − shift) · scaling_factor``."""
    scale, shift = scaling(vae)
    sample = mean + std * latent_noise.to(mean.dtype)  # what latent_dist.sample() draws
    return (sample - shift) * scale if shift else sample * scale


@torch.no_grad()
def decode(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Images (B, C, H, W) in [-1, 1] (not clamped) from scaled latents."""
    scale, shift = scaling(vae)
    z = latents / scale + shift if shift else latents / scale
    return vae.decode(z.to(vae.dtype)).sample


__all__ = ["decode", "latent_distribution", "scaling", "to_latents", "vae_scale_factor"]
