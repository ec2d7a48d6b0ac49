"""The text-to-image model: a diffusers UNet that knows its noise scheduler and text encoder.

::

    base folder/  unet/ (UNet2DConditionModel)  scheduler/ (DDPMScheduler config)
                  text_encoder.json {"text_encoder": "minilm-l6"}   or  text_encoder/ + tokenizer/
      ──load_text_to_image──> TextToImageUNet (the UNet's own modules at the root, so adapter
                              keys are the UNet's: PEFT / diffusers load them into a plain UNet)
                              + .text_encoder (frozen, registered: LoRA may target it too)
                              + .noise_scheduler, .tokenizer (plain attributes)

    training forward (pixel_values, prompt_ids, prompt_mask, noise, timesteps):
      prompt ──text encoder──> token states (B, T, D) = encoder_hidden_states
      x0 (B, C, H, W) in [-1, 1] ──add_noise(x0, ε, t)──> x_t ──UNet──> prediction
      loss = MSE(prediction, target), target = ε (epsilon) | v = √ᾱ_t ε − √(1−ᾱ_t) x0
             (v_prediction) | x0 (sample), as the scheduler's ``prediction_type`` says

Called with ``(sample, timestep, encoder_hidden_states)`` it is the plain UNet (sampling,
parity checks). The model is pixel-space (no VAE): the digits run denoises 32x32 grey images.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from torch import nn

from ..checkpoint import atomic_write_text

TEXT_ENCODER_FILE = "text_encoder.json"  # {"text_encoder": name or path}: no copy of it needed


@dataclasses.dataclass
class DenoisingOutput:
    """What the training forward returns: the loss and the UNet's prediction (B, C, H, W)."""

    loss: torch.Tensor
    sample: torch.Tensor


class TextToImageUNet(UNet2DConditionModel):
    """A UNet2DConditionModel plus its frozen text encoder and noise scheduler (module docstring).

    Adapters injected into it are named as in the plain UNet (``down_blocks.0...to_q``); the
    text encoder sits under ``text_encoder.`` (diffusers' prefix for its LoRA too).
    """

    def attach(self, text_encoder: nn.Module, tokenizer: Any, scheduler: DDPMScheduler) -> None:
        """Give the UNet its text encoder (frozen, eval mode) and noise scheduler."""
        text_encoder.requires_grad_(False).eval()
        self.text_encoder = text_encoder
        self.__dict__["tokenizer"] = tokenizer  # plain attributes: not modules, not saved
        self.__dict__["noise_scheduler"] = scheduler

    @property
    def prediction_type(self) -> str:
        return str(self.noise_scheduler.config.prediction_type)

    def train(self, mode: bool = True) -> TextToImageUNet:
        """Train mode for the UNet; the text encoder stays in eval mode (no dropout) unless an
        adapter trains inside it."""
        super().train(mode)
        text = self._modules.get("text_encoder")
        if text is not None and not any(p.requires_grad for p in text.parameters()):
            text.eval()
        return self

    def encode_prompt(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """Token states of the text encoder's last layer: (B, T) ids -> (B, T, D)."""
        text = self.text_encoder
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in text.parameters())
        with torch.set_grad_enabled(grad):
            out = text(input_ids=prompt_ids, attention_mask=prompt_mask)
        return out.last_hidden_state  # (B, T, D)

    def tokenize(self, prompts: list[str], device: torch.device | None = None) -> dict:
        """``prompt_ids`` / ``prompt_mask`` (B, T) of ``prompts``, padded to the longest."""
        enc = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
        out = {"prompt_ids": enc["input_ids"], "prompt_mask": enc["attention_mask"]}
        return {k: v.to(device) for k, v in out.items()} if device is not None else out

    def forward(  # type: ignore[override]
        self,
        sample: torch.Tensor | None = None,
        timestep: torch.Tensor | float | int | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        *args: Any,
        pixel_values: torch.Tensor | None = None,
        prompt_ids: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """The denoising loss of a training batch (``pixel_values`` given), else the UNet."""
        if pixel_values is None:
            return super().forward(sample, timestep, encoder_hidden_states, *args, **kwargs)
        return self.denoising_loss(pixel_values, prompt_ids, prompt_mask, noise, timesteps)

    def denoising_loss(
        self,
        pixel_values: torch.Tensor,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
    ) -> DenoisingOutput:
        """MSE between the UNet's prediction at ``x_t`` and the scheduler's target (see the
        module docstring); ``noise`` ε (B, C, H, W) and ``timesteps`` (B,) come with the batch."""
        states = self.encode_prompt(prompt_ids, prompt_mask)  # (B, T, D)
        scheduler = self.noise_scheduler
        x0 = pixel_values.to(self.dtype)
        noise = noise.to(x0.dtype)
        noisy = scheduler.add_noise(x0, noise, timesteps)  # √ᾱ x0 + √(1−ᾱ) ε
        kind = self.prediction_type
        if kind == "epsilon":
            target = noise
        elif kind == "v_prediction":
            target = scheduler.get_velocity(x0, noise, timesteps)
        elif kind == "sample":
            target = x0
        else:
            raise ValueError(f"scheduler prediction_type {kind!r} is not epsilon/v_prediction")
        pred = (
            super()
            .forward(noisy, timesteps, states.to(x0.dtype), encoder_attention_mask=prompt_mask)
            .sample
        )  # (B, C, H, W)
        return DenoisingOutput(loss=F.mse_loss(pred.float(), target.float()), sample=pred)


def is_text_to_image_folder(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / "unet" / "config.json").is_file()


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
    raise FileNotFoundError(
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


def load_text_to_image(
    name_or_path: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    quantization: str | None = None,
    tokenizer_name_or_path: str | os.PathLike | None = None,
    **_: Any,
) -> tuple[TextToImageUNet, Any]:
    """``(TextToImageUNet, tokenizer)`` from a base folder (module docstring); eval mode.

    Raises:
        FileNotFoundError: no ``unet/`` in the folder, or no text encoder found.
        ValueError: ``quantization`` (4-bit loading is for transformers models).
    """
    folder = Path(name_or_path).expanduser()
    if quantization is not None:
        raise ValueError(
            "text_to_image: 4-bit loading (QLoRA) is for transformers models; use lora "
            "(use_dora: true for DoRA) or adalora on the UNet"
        )
    if not is_text_to_image_folder(folder):
        raise FileNotFoundError(
            f"{folder}: not a text-to-image base folder (expected unet/config.json and "
            "scheduler/scheduler_config.json, diffusers' save_pretrained layout)"
        )
    unet = TextToImageUNet.from_pretrained(str(folder / "unet"))
    scheduler = DDPMScheduler.from_pretrained(str(folder / "scheduler"))
    text_encoder, tokenizer = load_text_encoder(
        _text_encoder_source(folder, tokenizer_name_or_path)
    )
    hidden = getattr(text_encoder.config, "hidden_size", None)
    if hidden is not None and hidden != unet.config.cross_attention_dim:
        raise ValueError(
            f"{folder}: the UNet's cross_attention_dim {unet.config.cross_attention_dim} differs "
            f"from the text encoder's hidden size {hidden}"
        )
    unet.attach(text_encoder, tokenizer, scheduler)
    if dtype is not None and dtype != "auto":
        unet.to(dtype)
    return unet.eval(), tokenizer


def save_text_to_image(
    folder: str | os.PathLike, unet: UNet2DConditionModel, scheduler: Any, text_encoder: str
) -> Path:
    """Write a base folder: ``unet/``, ``scheduler/`` and ``text_encoder.json`` naming the
    text encoder (a bundled name or a path)."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    plain = UNet2DConditionModel.from_config(unet.config)
    plain.load_state_dict(
        {k: v for k, v in unet.state_dict().items() if not k.startswith("text_encoder.")}
    )
    plain.save_pretrained(out / "unet")
    scheduler.save_pretrained(out / "scheduler")
    atomic_write_text(out / TEXT_ENCODER_FILE, json.dumps({"text_encoder": text_encoder}) + "\n")
    return out


__all__ = [
    "DenoisingOutput",
    "TextToImageUNet",
    "is_text_to_image_folder",
    "load_text_encoder",
    "load_text_to_image",
    "save_text_to_image",
]
