"""The text-to-image model: a diffusers UNet that knows its noise scheduler, text encoder, VAE.

::

    TextToImageUNet (the UNet's own modules at the root, so adapter keys are the UNet's: PEFT /
                     diffusers load them into a plain UNet)
      + .text_encoder (frozen, registered: LoRA may target it too, diffusers' text_encoder.* keys)
      + .vae (latent layout only; a plain attribute, so no target pattern ever reaches it; moved
              and cast with the UNet), .noise_scheduler, .tokenizer, .conditioning

    training forward (a batch from the task's collate):
      prompt ids (B, T) ──text encoder──> token states (B, T, D) = encoder_hidden_states
      x0 = pixel_values (B, C, H, W) in [-1, 1]                           (pixel layout)
         | (mean + std ε_lat − shift) · scaling_factor, (mean, std) = VAE(pixel_values) or the
           cached latent_mean / latent_std, ε_lat = latent_noise          (latent layout)
      x_t = add_noise(x0, ε, t) = √ᾱ_t x0 + √(1−ᾱ_t) ε ──UNet──> prediction
      target = ε (epsilon) | v = √ᾱ_t ε − √(1−ᾱ_t) x0 (v_prediction) | x0 (sample)
      loss = Σ_i w_i · m_i · mean_chw (prediction_i − target_i)²
             w_i = 1/B (DreamBooth: 1/B per instance row, prior_loss_weight/B per class row)
             m_i = 1, or min(SNR_t, γ)/SNR_t (ε) | min(SNR_t, γ)/(SNR_t + 1) (v) with snr_gamma γ

This is the formulation of diffusers' train_text_to_image_lora.py (w_i = 1/B: the plain mean)
and train_dreambooth_lora.py (instance mean + prior_loss_weight · prior mean); tests compute
those scripts' losses and gradients from the same components and compare.

Conditioning (:class:`Conditioning`) follows the folder's kind: a Stable Diffusion folder pads
prompts to the tokenizer's ``model_max_length`` and gives the text encoder no attention mask
unless its config has ``use_attention_mask`` (as diffusers' pipeline does), and the UNet no mask;
the pixel layout (any transformers encoder, e.g. MiniLM) pads to the longest prompt and masks.

Called with ``(sample, timestep, encoder_hidden_states)`` it is the plain UNet (sampling,
parity checks).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from torch import nn

from . import latents as latent_space


@dataclasses.dataclass
class DenoisingOutput:
    """What the training forward returns: the loss and the UNet's prediction (B, C, H, W)."""

    loss: torch.Tensor
    sample: torch.Tensor


@dataclasses.dataclass(frozen=True)
class Conditioning:
    """How prompts become the UNet's context (module docstring).

    Attributes:
        pad_to: pad (and truncate) every prompt to this many tokens; None: to the longest.
        text_mask: hand the text encoder the attention mask.
        unet_mask: hand the UNet the mask as ``encoder_attention_mask``.
    """

    pad_to: int | None = None
    text_mask: bool = True
    unet_mask: bool = True


def pipeline_conditioning(tokenizer: Any, text_encoder: nn.Module) -> Conditioning:
    """Stable Diffusion's: ``model_max_length`` tokens, a mask only if the encoder asks."""
    mask = bool(getattr(text_encoder.config, "use_attention_mask", False))
    return Conditioning(pad_to=int(tokenizer.model_max_length), text_mask=mask, unet_mask=False)


class TextToImageUNet(UNet2DConditionModel):
    """A UNet2DConditionModel plus its frozen text encoder, noise scheduler and (latent layout)
    VAE (module docstring).

    Adapters injected into it are named as in the plain UNet (``down_blocks.0...to_q``); the
    text encoder sits under ``text_encoder.`` (diffusers' prefix for its LoRA too).
    """

    def attach(
        self,
        text_encoder: nn.Module,
        tokenizer: Any,
        scheduler: Any,
        vae: nn.Module | None = None,
        conditioning: Conditioning | None = None,
        sampler_config: dict | None = None,
    ) -> None:
        """Give the UNet its text encoder (frozen, eval mode), noise scheduler, VAE (frozen;
        not a registered module) and the conditioning policy. ``sampler_config`` is the
        folder's own scheduler config (its class may differ from the training DDPM)."""
        text_encoder.requires_grad_(False).eval()
        self.text_encoder = text_encoder
        if vae is not None:
            vae.requires_grad_(False).eval()
        # plain attributes: not modules (never matched by target patterns), not saved
        self.__dict__["vae"] = vae
        self.__dict__["tokenizer"] = tokenizer
        self.__dict__["noise_scheduler"] = scheduler
        self.__dict__["conditioning"] = conditioning or Conditioning()
        self.__dict__["sampler_config"] = sampler_config

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``.to()`` / ``.float()`` / ``.cuda()`` move and cast the VAE with the UNet."""
        out = super()._apply(fn, *args, **kwargs)
        vae = self.__dict__.get("vae")
        if vae is not None:
            vae._apply(fn, *args, **kwargs)
        return out

    @property
    def prediction_type(self) -> str:
        return str(self.noise_scheduler.config.prediction_type)

    @property
    def latent(self) -> bool:
        """True for a Stable Diffusion folder: the UNet denoises the VAE's latents."""
        return self.__dict__.get("vae") is not None

    @property
    def image_channels(self) -> int:
        """Channels of the images the model reads and writes (the VAE's, else the UNet's)."""
        return int(self.vae.config.in_channels if self.latent else self.config.in_channels)

    @property
    def vae_factor(self) -> int:
        return latent_space.vae_scale_factor(self.vae) if self.latent else 1

    @property
    def default_resolution(self) -> int:
        """Image side the base was made for: the UNet's ``sample_size`` x the VAE factor."""
        return int(self.config.sample_size) * self.vae_factor

    def train(self, mode: bool = True) -> TextToImageUNet:
        """Train mode for the UNet; the text encoder stays in eval mode (no dropout) unless an
        adapter trains inside it."""
        super().train(mode)
        text = self._modules.get("text_encoder")
        if text is not None and not any(p.requires_grad for p in text.parameters()):
            text.eval()
        return self

    # --- prompts ---------------------------------------------------------------------------
    def tokenize(self, prompts: list[str], device: torch.device | None = None) -> dict:
        """``prompt_ids`` / ``prompt_mask`` (B, T) of ``prompts`` as the conditioning says."""
        pad_to = self.conditioning.pad_to
        if pad_to is None:
            enc = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
        else:
            enc = self.tokenizer(prompts, padding="max_length", max_length=pad_to,
                                 truncation=True, return_tensors="pt")  # fmt: skip
        out = {"prompt_ids": enc["input_ids"], "prompt_mask": enc["attention_mask"]}
        return {k: v.to(device) for k, v in out.items()} if device is not None else out

    def tokenize_one(self, prompt: str) -> list[int]:
        """One prompt's ids, padded as the conditioning says (collate pads the rest)."""
        return self.tokenize([prompt])["prompt_ids"][0].tolist()

    def encode_prompt(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Token states of the text encoder's last layer: (B, T) ids -> (B, T, D)."""
        text = self.text_encoder
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in text.parameters())
        mask = prompt_mask if self.conditioning.text_mask else None
        with torch.set_grad_enabled(grad):
            out = text(input_ids=prompt_ids, attention_mask=mask)
        return out[0]  # (B, T, D): last_hidden_state

    def unet_mask(self, prompt_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The ``encoder_attention_mask`` the UNet gets (None for Stable Diffusion folders)."""
        return prompt_mask if self.conditioning.unet_mask else None

    # --- training --------------------------------------------------------------------------
    def forward(  # type: ignore[override]
        self,
        sample: torch.Tensor | None = None,
        timestep: torch.Tensor | float | int | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        *args: Any,
        prompt_ids: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        latent_mean: torch.Tensor | None = None,
        latent_std: torch.Tensor | None = None,
        latent_noise: torch.Tensor | None = None,
        row_weights: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """The denoising loss of a training batch (``noise`` given), else the plain UNet."""
        if noise is None:
            return super().forward(sample, timestep, encoder_hidden_states, *args, **kwargs)
        x0 = self.clean_input(pixel_values, latent_mean, latent_std, latent_noise)
        return self.denoising_loss(x0, prompt_ids, prompt_mask, noise, timesteps, row_weights)

    def clean_input(
        self,
        pixel_values: torch.Tensor | None,
        latent_mean: torch.Tensor | None = None,
        latent_std: torch.Tensor | None = None,
        latent_noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x0, what the UNet learns to denoise: the pixels, or the VAE's scaled latents (from
        the images, or from cached (mean, std)) sampled with ``latent_noise``."""
        if not self.latent:
            return pixel_values.to(self.dtype)
        if latent_mean is None:
            latent_mean, latent_std = latent_space.latent_distribution(self.vae, pixel_values)
        if latent_noise is None:
            raise ValueError("a latent-space batch needs latent_noise (collate draws it)")
        return latent_space.to_latents(self.vae, latent_mean, latent_std, latent_noise).to(
            self.dtype
        )

    def denoising_loss(
        self,
        x0: torch.Tensor,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor | None,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        row_weights: torch.Tensor | None = None,
    ) -> DenoisingOutput:
        """The loss of the module docstring on clean inputs ``x0`` (B, C, h, w); ``noise`` ε,
        ``timesteps`` (B,) and ``row_weights`` w_i · m_i (B,; default 1/B) come with the batch."""
        states = self.encode_prompt(prompt_ids, prompt_mask)  # (B, T, D)
        scheduler = self.noise_scheduler
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
            .forward(noisy, timesteps, states.to(x0.dtype),
                     encoder_attention_mask=self.unet_mask(prompt_mask))
            .sample
        )  # (B, C[x2], h, w)  # fmt: skip
        if pred.shape[1] == 2 * target.shape[1]:  # a learnt variance: trained on the mean only
            pred = pred[:, : target.shape[1]]
        per_row = F.mse_loss(pred.float(), target.float(), reduction="none")
        per_row = per_row.mean(dim=list(range(1, per_row.ndim)))  # (B,)
        if row_weights is None:
            loss = per_row.mean()
        else:
            loss = (per_row * row_weights.to(per_row)).sum()
        return DenoisingOutput(loss=loss, sample=pred)


def snr_weights(scheduler: Any, timesteps: torch.Tensor, gamma: float, kind: str) -> torch.Tensor:
    """Min-SNR weights (B,): min(SNR_t, γ)/SNR_t for ε targets, min(SNR_t, γ)/(SNR_t + 1) for v,
    SNR_t = ᾱ_t / (1 − ᾱ_t) (Hang et al. 2023, as diffusers' scripts apply it)."""
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()  # (B,)
    snr = alphas / (1.0 - alphas)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    if kind == "v_prediction":
        return clipped / (snr + 1)
    if kind == "epsilon":
        return clipped / snr
    return clipped


__all__ = [
    "Conditioning",
    "DenoisingOutput",
    "TextToImageUNet",
    "pipeline_conditioning",
    "snr_weights",
]
