"""Sampling images from a (LoRA-adapted) text-to-image UNet, and writing them out.

::

    prompts, negative prompts ("" by default) ──tokenize──> text encoder ──> states (B, T, D)
    image k: generator_k = torch.Generator().manual_seed(seed_k) draws x_T (C, h, w) ~ N(0, I),
             then the sampler's own noise (DDPM, ancestral samplers) — the same image whatever
             the batch, and what diffusers' pipeline gives with generator=[generator_0, ...]
    x_T · init_noise_sigma; for t in the sampler's timesteps (``steps`` of them):
        ε̂ = UNet(scale_model_input([x_t, x_t]), t, [uncond, cond])
        ε̂ = ε̂_uncond + g (ε̂_cond − ε̂_uncond)          (classifier-free guidance, g > 1)
        x_{t-1} = sampler.step(ε̂, t, x_t, eta, generator)
    x_0 ──(latent layout: VAE decoder on x_0 / scaling_factor)──> images (x/2 + 1/2 clamped to
        [0, 1]) (B, C, H, W) ──> PNG files, a grid

This is the loop of diffusers' StableDiffusionPipeline step for step (negative prompt first in
the guided batch, the folder's scheduler class unless ``sampler`` names another), so with the
same scheduler, steps, guidance and seeds a Stable Diffusion folder gives the pipeline's images.
The model given may be the plain :class:`~peftkit.diffusion.TextToImageUNet` or a PeftModel
around it: the UNet calls go through the adapter.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import latents as latent_space

SAMPLER_ALIASES = {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "pndm": "PNDMScheduler",
                   "euler": "EulerDiscreteScheduler",
                   "euler_a": "EulerAncestralDiscreteScheduler",
                   "dpm++": "DPMSolverMultistepScheduler"}  # fmt: skip


@dataclasses.dataclass
class SamplingOptions:
    """How images are sampled.

    Attributes:
        steps: denoising steps.
        guidance_scale: classifier-free guidance g (1: none).
        negative_prompt: the unconditional prompt of guidance ("" when None).
        sampler: ``folder`` (the base folder's own scheduler class), a short name
            (``ddim``, ``ddpm``, ``pndm``, ``euler``, ``euler_a``, ``dpm++``) or a diffusers
            scheduler class name; None: the folder's for Stable Diffusion folders, ``ddim`` for
            the pixel layout (whose folder holds the training DDPM).
        eta: DDIM's η (0: deterministic), for samplers that take it.
    """

    steps: int = 25
    guidance_scale: float = 1.0
    negative_prompt: str | None = None
    sampler: str | None = None
    eta: float = 0.0


def base_unet(model: torch.nn.Module) -> Any:
    """The TextToImageUNet inside ``model`` (a PeftModel's base, or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def sampling_scheduler(model: torch.nn.Module, kind: str | None = None) -> Any:
    """A sampler built from the base folder's scheduler config (see :class:`SamplingOptions`)."""
    import diffusers

    unet = base_unet(model)
    folder_config = unet.__dict__.get("sampler_config")
    config = dict(folder_config or unet.noise_scheduler.config)
    if kind is None:
        kind = "folder" if folder_config else "ddim"
    if kind == "folder":
        name = str(config.get("_class_name") or "DDIMScheduler")
    else:
        name = SAMPLER_ALIASES.get(kind.lower(), kind)
    cls = getattr(diffusers, name, None)
    if cls is None or not name.endswith("Scheduler"):
        raise ValueError(
            f"sampler {kind!r}: not a diffusers scheduler; use folder, "
            f"{', '.join(SAMPLER_ALIASES)} or a class name such as EulerDiscreteScheduler"
        )
    return cls.from_config(config)


@torch.no_grad()
def sample_images(
    model: torch.nn.Module,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int = 25,
    guidance_scale: float = 1.0,
    sampler: str | None = None,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    negative_prompt: str | None = None,
    eta: float = 0.0,
) -> torch.Tensor:
    """One image per (prompt, seed) pair, in [0, 1]: (N, C, H, W), N = len(prompts)."""
    if len(prompts) != len(seeds):
        raise ValueError("sample_images needs one seed per prompt")
    options = SamplingOptions(steps, guidance_scale, negative_prompt, sampler, eta)
    unet = base_unet(model)
    device = torch.device(device) if device is not None else next(unet.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = slice(start, start + batch_size)
            out.append(
                _sample_batch(
                    model, unet, list(prompts[chunk]), list(seeds[chunk]), options, device
                )  # fmt: skip
            )
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def _step_kwargs(scheduler: Any, generators: list[torch.Generator], eta: float) -> dict:
    """eta / generator for samplers whose ``step`` takes them (as the pipeline passes them)."""
    accepted = set(inspect.signature(scheduler.step).parameters)
    kwargs: dict[str, Any] = {}
    if "eta" in accepted:
        kwargs["eta"] = eta
    if "generator" in accepted:
        kwargs["generator"] = generators
    return kwargs


def _sample_batch(
    model: torch.nn.Module,
    unet: Any,
    prompts: list[str],
    seeds: list[int],
    options: SamplingOptions,
    device: torch.device,
) -> torch.Tensor:
    config = unet.config
    shape = (config.in_channels, config.sample_size, config.sample_size)  # latent or pixel
    guided = options.guidance_scale > 1.0
    n = len(prompts)
    negatives = [options.negative_prompt or ""] * n if guided else []
    enc = unet.tokenize(prompts + negatives, device)  # one padding for both halves
    ids, mask = enc["prompt_ids"], enc["prompt_mask"]
    states = unet.encode_prompt(ids[:n], mask[:n])  # (B, T, D)
    if guided:  # the unconditional half first, as the pipeline batches them
        states = torch.cat([unet.encode_prompt(ids[n:], mask[n:]), states])
        mask = torch.cat([mask[n:], mask[:n]])
    unet_mask = unet.unet_mask(mask)
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    x = torch.cat([torch.randn((1, *shape), generator=g, dtype=torch.float32)
                   for g in generators]).to(device, states.dtype)  # (B, C, h, w)  # fmt: skip
    scheduler = sampling_scheduler(model, options.sampler)
    scheduler.set_timesteps(options.steps, device=device)
    step_kwargs = _step_kwargs(scheduler, generators, options.eta)
    x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        inp = torch.cat([x, x]) if guided else x
        inp = scheduler.scale_model_input(inp, t)
        pred = model(sample=inp, timestep=t, encoder_hidden_states=states,
                     encoder_attention_mask=unet_mask).sample  # fmt: skip
        if guided:
            uncond, cond = pred.chunk(2)
            pred = uncond + options.guidance_scale * (cond - uncond)
        x = scheduler.step(pred, t, x, **step_kwargs).prev_sample
    if unet.latent:
        x = latent_space.decode(unet.vae, x)
    return (x.float() / 2 + 0.5).clamp(0, 1).cpu()  # (B, C, H, W) in [0, 1]


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
    """Each image as ``<prompt slug>_<k>.png`` (its own size) plus ``grid.png`` (``scale`` x
    larger); returns the paths written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths, counts = [], dict[str, int]()
    for image, prompt in zip(images, prompts, strict=True):
        name = slug(prompt)
        counts[name] = counts.get(name, 0) + 1
        path = folder / f"{name}_{counts[name] - 1}.png"
        save_png(to_pil(image), path)  # the image itself; only the grid is enlarged
        paths.append(path)
    grid_path = folder / "grid.png"
    save_png(grid(images, columns, scale=scale), grid_path)
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
    "SAMPLER_ALIASES",
    "SamplingOptions",
    "as_uint8",
    "base_unet",
    "grid",
    "sample_images",
    "sampling_scheduler",
    "save_png",
    "slug",
    "to_pil",
    "write_images",
]
