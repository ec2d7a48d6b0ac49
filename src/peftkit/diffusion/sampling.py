"""Sampling images from a (LoRA-adapted) text-to-image UNet, and writing them out.

::

    prompts ──tokenize──> text encoder ──> states (B, T, D)   [+ "" for classifier-free guidance]
    seed_i ──> x_T ~ N(0, I) (one generator per image: the same image whatever the batch)
    for t in DDIM (or the base DDPM) timesteps:      ε̂ = uncond + g (cond − uncond)  when g > 1
        x_{t-1} = scheduler.step(UNet(x_t, t, states), t, x_t)
    x_0 ∈ [-1, 1] ──> images in [0, 1] (B, C, H, W) ──> PNG files, a grid

The model given may be the plain :class:`~peftkit.diffusion.TextToImageUNet` or a PeftModel
around it: the UNet calls go through the adapter.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch


def base_unet(model: torch.nn.Module) -> Any:
    """The TextToImageUNet inside ``model`` (a PeftModel's base, or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def sampling_scheduler(model: torch.nn.Module, kind: str = "ddim") -> Any:
    """A sampler built from the model's training scheduler config (``ddim`` or ``ddpm``)."""
    from diffusers import DDIMScheduler, DDPMScheduler

    config = base_unet(model).noise_scheduler.config
    if kind == "ddim":
        return DDIMScheduler.from_config(config)
    if kind == "ddpm":
        return DDPMScheduler.from_config(config)
    raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {kind!r}")


@torch.no_grad()
def sample_images(
    model: torch.nn.Module,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int = 25,
    guidance_scale: float = 1.0,
    sampler: str = "ddim",
    batch_size: int = 64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """One image per (prompt, seed) pair, in [0, 1]: (N, C, H, W), N = len(prompts)."""
    if len(prompts) != len(seeds):
        raise ValueError("sample_images needs one seed per prompt")
    unet = base_unet(model)
    device = torch.device(device) if device is not None else next(unet.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(prompts), batch_size):
            out.append(
                _sample_batch(
                    model,
                    unet,
                    list(prompts[start : start + batch_size]),
                    list(seeds[start : start + batch_size]),
                    steps,
                    guidance_scale,
                    sampler,
                    device,
                )  # fmt: skip
            )
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def _sample_batch(
    model: torch.nn.Module,
    unet: Any,
    prompts: list[str],
    seeds: list[int],
    steps: int,
    guidance_scale: float,
    sampler: str,
    device: torch.device,
) -> torch.Tensor:
    config = unet.config
    shape = (config.in_channels, config.sample_size, config.sample_size)
    guided = guidance_scale > 1.0
    texts = prompts + ([""] * len(prompts) if guided else [])
    enc = unet.tokenize(texts, device)
    states = unet.encode_prompt(enc["prompt_ids"], enc["prompt_mask"])  # (B[x2], T, D)
    x = torch.stack(
        [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    ).to(device, unet.dtype)  # (B, C, H, W)
    scheduler = sampling_scheduler(model, sampler)
    scheduler.set_timesteps(steps, device=device)
    x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        inp = torch.cat([x, x]) if guided else x
        inp = scheduler.scale_model_input(inp, t)
        pred = model(
            sample=inp,
            timestep=t,
            encoder_hidden_states=states,
            encoder_attention_mask=enc["prompt_mask"],
        ).sample
        if guided:
            cond, uncond = pred.chunk(2)
            pred = uncond + guidance_scale * (cond - uncond)
        x = scheduler.step(pred, t, x).prev_sample
    return ((x.float().clamp(-1, 1) + 1) / 2).cpu()  # (B, C, H, W) in [0, 1]


def to_pil(image: torch.Tensor, scale: int = 1) -> Any:
    """(C, H, W) in [0, 1] -> a PIL image (grey for one channel), ``scale`` x bigger."""
    from PIL import Image

    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    pil = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    return pil


def grid(images: torch.Tensor, columns: int, pad: int = 2, scale: int = 1) -> Any:
    """Images (N, C, H, W) in [0, 1] as one PIL image, ``columns`` per row, white gaps."""
    n, c, h, w = images.shape
    columns = max(1, min(columns, n))
    rows = math.ceil(n / columns)
    canvas = torch.ones(c, rows * (h + pad) + pad, columns * (w + pad) + pad)
    for i in range(n):
        r, k = divmod(i, columns)
        top, left = pad + r * (h + pad), pad + k * (w + pad)
        canvas[:, top : top + h, left : left + w] = images[i]
    return to_pil(canvas, scale)


def slug(text: str, limit: int = 40) -> str:
    """A file-name piece from a prompt: ``"a handwritten 7"`` -> ``a_handwritten_7``."""
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:limit] or "prompt"


def write_images(
    images: torch.Tensor, prompts: Sequence[str], folder: str | Path, columns: int, scale: int = 1
) -> list[Path]:
    """Each image as ``<prompt slug>_<k>.png`` plus ``grid.png``; returns the paths written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths, counts = [], dict[str, int]()
    for image, prompt in zip(images, prompts, strict=True):
        name = slug(prompt)
        counts[name] = counts.get(name, 0) + 1
        path = folder / f"{name}_{counts[name] - 1}.png"
        save_png(to_pil(image, scale), path)
        paths.append(path)
    grid_path = save_png(grid(images, columns, scale=scale), folder / "grid.png")
    return [*paths, grid_path]


def save_png(image: Any, path: str | Path) -> Path:
    """A PIL image as a PNG file, written atomically (``checkpoint.atomic_file``)."""
    from ..checkpoint import atomic_file

    with atomic_file(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)


def as_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [0, 1] -> (N, H, W, C) uint8."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


__all__ = [
    "as_uint8",
    "base_unet",
    "grid",
    "sample_images",
    "sampling_scheduler",
    "slug",
    "to_pil",
    "write_images",
]
