"""Base folders of the text-to-image task, read into a :class:`~.model.TextToImageUNet`.

::

    Stable Diffusion 1.x / 2.x (diffusers' StableDiffusionPipeline.save_pretrained): latent layout
      model_index.json   the component classes (CLIPTextModel, CLIPTokenizer, AutoencoderKL, ...)
      unet/ vae/ text_encoder/ tokenizer/ scheduler/
    peftkit's pixel-space layout (the digits base): no VAE
      unet/ scheduler/ text_encoder.json {"text_encoder": "minilm-l6"} | text_encoder/ (+ tokenizer)

    folder_layout(folder) ─> "pipeline" | "pixel": every missing piece is named, with the fix,
                             before any weights are read (SDXL is refused here, by name)
    load_text_to_image ─> TextToImageUNet (UNet) + text encoder + tokenizer + DDPM noise
                          scheduler (the folder's config, as diffusers' training scripts build it)
                          + VAE and the folder's own sampler config (pipeline layout)

Components load with the classes ``model_index.json`` names, as diffusers' pipeline loads them,
so peftkit and a pipeline tokenize and encode prompts with the same objects.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from torch import nn

from .model import Conditioning, TextToImageUNet, pipeline_conditioning

TEXT_ENCODER_FILE = "text_encoder.json"  # {"text_encoder": name or path}: no copy of it needed
MODEL_INDEX = "model_index.json"
PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_PARTS = ("text_encoder_2", "tokenizer_2")
# what each part of a Stable Diffusion folder must hold, and which class loads it by default
_PART_FILES = {
    "unet": ("config.json",),
    "vae": ("config.json",),
    "text_encoder": ("config.json",),
    "tokenizer": ("tokenizer_config.json", "vocab.json", "tokenizer.json"),
    "scheduler": ("scheduler_config.json",),
}
_DEFAULT_CLASSES = {"vae": "AutoencoderKL", "text_encoder": "CLIPTextModel",
                    "tokenizer": "CLIPTokenizer"}  # fmt: skip
_WHY = {
    "vae": "the UNet denoises the VAE's latents; without it images cannot be encoded or decoded",
    "tokenizer": "the text encoder reads the token ids of the tokenizer it was trained with",
    "text_encoder": "prompts condition the UNet through the text encoder's token states",
    "unet": "the UNet is the model LoRA adapts",
    "scheduler": "the noise schedule the UNet was trained with sets the training targets",
}


class FolderError(FileNotFoundError):
    """A base folder that is neither layout, or misses a part; the message names the fix."""


def _model_index(folder: Path) -> dict[str, Any]:
    path = folder / MODEL_INDEX
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise FolderError(f"{path}: not valid JSON ({exc}); re-save the pipeline") from None


def _has_part(folder: Path, part: str) -> bool:
    return any((folder / part / name).is_file() for name in _PART_FILES[part])


def folder_layout(folder: str | os.PathLike) -> str:
    """``"pipeline"`` (Stable Diffusion, latent space) or ``"pixel"`` (peftkit's layout).

    Raises:
        FolderError: the folder is missing, is neither layout, is an SDXL / non-UNet pipeline,
            or a Stable Diffusion folder lacks one of its parts (named, with the fix).
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FolderError(f"{root}: base model folder not found")
    index = _model_index(root)
    if any((root / p).is_dir() for p in SDXL_PARTS) or "XL" in str(index.get("_class_name", "")):
        raise FolderError(
            f"{root}: a Stable Diffusion XL pipeline ({', '.join(SDXL_PARTS)}): its second text "
            "encoder, pooled text embeddings and add_time_ids conditioning are not supported "
            "yet; use an SD 1.x / 2.x folder (one CLIP text encoder)"
        )
    if index or (root / "vae").is_dir():
        if not (root / "unet").is_dir() and (root / "transformer").is_dir():
            raise FolderError(
                f"{root}: a {index.get('_class_name', 'transformer-based')} pipeline (transformer/, "
                "no unet/): text_to_image adapts UNet pipelines (Stable Diffusion 1.x / 2.x)"
            )
        for part in PIPELINE_PARTS:
            if not _has_part(root, part):
                named = index.get(part)
                kind = f" (model_index.json names {part}: {named[1]})" if named else ""
                wanted = " or ".join(_PART_FILES[part])
                raise FolderError(
                    f"{root / part}: missing or without {wanted}{kind}: {_WHY[part]}; copy "
                    f"{part}/ from the checkpoint this folder came from (diffusers' "
                    "StableDiffusionPipeline.save_pretrained writes all five parts)"
                )
        return "pipeline"
    if (root / "unet" / "config.json").is_file():
        return "pixel"
    found = ", ".join(sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())[:8])
    raise FolderError(
        f"{root}: not a text-to-image base folder: expected a Stable Diffusion pipeline folder "
        f"({MODEL_INDEX}, {'/, '.join(PIPELINE_PARTS)}/ as StableDiffusionPipeline."
        "save_pretrained writes it) or peftkit's pixel-space layout (unet/config.json, "
        f"scheduler/, {TEXT_ENCODER_FILE}); found: {found or 'nothing'}"
    )


def is_text_to_image_folder(path: str | os.PathLike) -> bool:
    """True when ``path`` holds either layout (errors for a broken one are left to loading)."""
    p = Path(path).expanduser()
    return (p / "unet" / "config.json").is_file() or (p / MODEL_INDEX).is_file()


# --- the pixel layout ----------------------------------------------------------------------
def _text_encoder_source(folder: Path, override: str | os.PathLike | None) -> str:
    """Where the text encoder (+ tokenizer) is: ``model.tokenizer``, else the folder's
    ``text_encoder.json``, else its ``text_encoder/`` subfolder."""
    if override:
        return os.fspath(override)
    pointer = folder / TEXT_ENCODER_FILE
    if pointer.is_file():
        name = json.loads(pointer.read_text(encoding="utf-8"))["text_encoder"]
        local = folder / name
        return str(local) if local.exists() else name
    if (folder / "text_encoder" / "config.json").is_file():
        return str(folder / "text_encoder")
    raise FolderError(
        f'{folder}: no text encoder: add {TEXT_ENCODER_FILE} ({{"text_encoder": '
        '"minilm-l6"}), a text_encoder/ folder, or set model.tokenizer to one'
    )


def load_text_encoder(name_or_path: str) -> tuple[nn.Module, Any]:
    """A transformers encoder (``AutoModel``) and its tokenizer: a bundled name or a folder
    (the tokenizer from ``<folder>/../tokenizer`` when the folder has none, diffusers' layout)."""
    from transformers import AutoModel, AutoTokenizer

    from ..model_sources import resolve_model

    path = resolve_model(name_or_path).path
    model = AutoModel.from_pretrained(path, local_files_only=True)
    tok_path = path
    sibling = Path(path).parent / "tokenizer"
    if not any((Path(path) / f).is_file() for f in ("tokenizer.json", "vocab.txt", "vocab.json")):
        tok_path = str(sibling) if sibling.is_dir() else path
    tokenizer = AutoTokenizer.from_pretrained(tok_path, local_files_only=True)
    return model, tokenizer


def _load_pixel(folder: Path, tokenizer_override: Any) -> TextToImageUNet:
    unet = TextToImageUNet.from_pretrained(str(folder / "unet"))
    scheduler = DDPMScheduler.from_pretrained(str(folder / "scheduler"))
    text_encoder, tokenizer = load_text_encoder(_text_encoder_source(folder, tokenizer_override))
    _check_context(folder, unet, text_encoder, "the text encoder")
    unet.attach(text_encoder, tokenizer, scheduler, conditioning=Conditioning())
    return unet


# --- the Stable Diffusion layout -----------------------------------------------------------
def _component_class(index: dict[str, Any], part: str, library: Any) -> Any:
    """The class ``model_index.json`` names for ``part`` (default: SD's), from ``library``."""
    named = index.get(part) or [None, _DEFAULT_CLASSES[part]]
    name = named[1] or _DEFAULT_CLASSES[part]
    cls = getattr(library, name, None)
    if cls is None:
        raise FolderError(
            f"{MODEL_INDEX}: {part} class {name!r} is not in {library.__name__} "
            f"{library.__version__}; expected e.g. {_DEFAULT_CLASSES[part]}"
        )
    return cls


def _load_pipeline(folder: Path, tokenizer_override: Any) -> TextToImageUNet:
    import diffusers
    import transformers

    index = _model_index(folder)
    unet = TextToImageUNet.from_pretrained(str(folder / "unet"))
    vae = _component_class(index, "vae", diffusers).from_pretrained(str(folder / "vae"))
    text_cls = _component_class(index, "text_encoder", transformers)
    text_encoder = text_cls.from_pretrained(str(folder / "text_encoder"), local_files_only=True)
    tok_cls = _component_class(index, "tokenizer", transformers)
    tokenizer = tok_cls.from_pretrained(str(tokenizer_override or folder / "tokenizer"))
    scheduler = DDPMScheduler.from_pretrained(str(folder / "scheduler"))
    sampler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    latent_channels = int(vae.config.latent_channels)
    if unet.config.in_channels != latent_channels:
        raise ValueError(
            f"{folder}: unet/config.json in_channels {unet.config.in_channels} differs from "
            f"vae/config.json latent_channels {latent_channels}: the UNet denoises the VAE's "
            "latents (inpainting / image-variation UNets are not text-to-image bases)"
        )
    _check_context(folder, unet, text_encoder, "text_encoder/config.json")
    unet.attach(text_encoder, tokenizer, scheduler, vae=vae,
                conditioning=pipeline_conditioning(tokenizer, text_encoder),
                sampler_config=sampler_config)  # fmt: skip
    return unet


def _check_context(folder: Path, unet: Any, text_encoder: nn.Module, where: str) -> None:
    hidden = getattr(text_encoder.config, "hidden_size", None)
    if hidden is not None and hidden != unet.config.cross_attention_dim:
        raise ValueError(
            f"{folder}: the UNet's cross_attention_dim {unet.config.cross_attention_dim} "
            f"differs from the hidden size {hidden} of {where}"
        )


def load_text_to_image(
    name_or_path: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    quantization: str | None = None,
    tokenizer_name_or_path: str | os.PathLike | None = None,
    **_: Any,
) -> tuple[TextToImageUNet, Any]:
    """``(TextToImageUNet, tokenizer)`` from a base folder of either layout; eval mode.

    Raises:
        FolderError: the folder is neither layout or misses a part (see :func:`folder_layout`).
        ValueError: ``quantization`` (4-bit loading is for transformers models), or parts that
            do not fit together (channels, context width).
    """
    folder = Path(name_or_path).expanduser()
    if quantization is not None:
        raise ValueError(
            "text_to_image: 4-bit loading (QLoRA) is for transformers models; use lora "
            "(use_dora: true for DoRA) or adalora on the UNet"
        )
    layout = folder_layout(folder)
    load = _load_pipeline if layout == "pipeline" else _load_pixel
    unet = load(folder, tokenizer_name_or_path)
    if dtype is not None and dtype != "auto":
        unet.to(dtype)
    return unet.eval(), unet.tokenizer


def save_text_to_image(
    folder: str | os.PathLike, unet: UNet2DConditionModel, scheduler: Any, text_encoder: str
) -> Path:
    """Write a pixel-layout base folder: ``unet/``, ``scheduler/`` and ``text_encoder.json``
    naming the text encoder (a bundled name or a path)."""
    from ..checkpoint import atomic_write_text

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    plain = UNet2DConditionModel.from_config(unet.config)
    plain.load_state_dict(
        {k: v for k, v in unet.state_dict().items() if not k.startswith("text_encoder.")}
    )
    plain.save_pretrained(out / "unet")
    scheduler.save_pretrained(out / "scheduler")
    atomic_write_text(
        str(out / TEXT_ENCODER_FILE), json.dumps({"text_encoder": text_encoder}) + "\n"
    )
    return out


__all__ = [
    "FolderError",
    "TEXT_ENCODER_FILE",
    "folder_layout",
    "is_text_to_image_folder",
    "load_text_encoder",
    "load_text_to_image",
    "save_text_to_image",
]
