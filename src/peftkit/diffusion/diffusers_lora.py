"""LoRA in diffusers' file layout, both ways: ``pytorch_lora_weights.safetensors``.

::

    PEFT adapter tensors                          diffusers' file (load_lora_weights reads it)
    base_model.model.down_blocks.0...to_q.lora_A.weight  <->  unet.down_blocks.0...to_q.lora_A.weight
    base_model.model.text_encoder.encoder...lora_B.weight <->  text_encoder.encoder...lora_B.weight
    adapter_config.json (r, lora_alpha, ...)             <->  safetensors metadata
                                                             "lora_adapter_metadata": {"unet.r": 8,
                                                             "unet.lora_alpha": 16, ...}

The UNet's modules sit at the root of :class:`~peftkit.diffusion.TextToImageUNet`, so the
conversion is a rename. Without metadata (older files) the rank is read off the tensors and
alpha = rank (diffusers' convention: scale 1); ``lora.down`` / ``lora.up`` names (the older
diffusers / kohya layout) read as ``lora_A`` / ``lora_B``. AdaLoRA's P·diag(E)·Q factors have
no diffusers layout and are refused by name.
"""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import save_tensors
from ..methods.lora_config import LoraConfig
from ..peft_model import get_peft_model

DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"  # diffusers' key in the safetensors header
PEFT_PREFIX = "base_model.model."
TEXT = "text_encoder."
# LoraConfig fields diffusers hands to peft.LoraConfig when it reads the metadata
_CONFIG_FIELDS = ("r", "lora_alpha", "target_modules", "lora_dropout", "bias", "use_dora",
                  "use_rslora", "rank_pattern", "alpha_pattern", "fan_in_fan_out", "lora_bias",
                  "init_lora_weights")  # fmt: skip


def to_diffusers(tensors: dict[str, torch.Tensor], config: Any) -> tuple[dict, dict]:
    """PEFT on-disk tensors + LoraConfig -> (diffusers tensors, diffusers metadata dict)."""
    peft_type = getattr(config.peft_type, "value", config.peft_type)
    if peft_type != "LORA":
        raise ValueError(
            f"{peft_type}: diffusers' LoRA files hold LoRA / DoRA factors only; the PEFT-format "
            "adapter folder holds this adapter"
        )
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if not key.startswith(PEFT_PREFIX) or ".lora_" not in key:
            raise ValueError(f"{key}: not a LoRA tensor; diffusers' LoRA files hold only those")
        rest = key[len(PEFT_PREFIX) :]
        out[rest if rest.startswith(TEXT) else "unet." + rest] = value.contiguous()
    fields = config.to_dict()
    settings = {k: fields[k] for k in _CONFIG_FIELDS if k in fields}
    metadata: dict[str, Any] = {}
    for prefix in ("unet", "text_encoder"):
        if any(k.startswith(prefix + ".") for k in out):
            metadata.update({f"{prefix}.{k}": v for k, v in settings.items()})
    return out, metadata


def save_diffusers_lora(model: Any, folder: str | os.PathLike) -> Path:
    """Write ``<folder>/pytorch_lora_weights.safetensors`` from a PeftModel's active adapter."""
    tensors, metadata = to_diffusers(model.adapter_state_dict(), model.active_peft_config)
    path = Path(folder) / DIFFUSERS_WEIGHTS
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"format": "pt", METADATA_KEY: json.dumps(metadata, indent=2, sort_keys=True)}
    save_tensors(str(path), tensors, metadata=header)
    return path


def read_diffusers_lora(path: str | os.PathLike) -> tuple[Any, dict[str, torch.Tensor]]:
    """(LoraConfig, PEFT on-disk tensors) from a diffusers LoRA file (or a folder holding
    ``pytorch_lora_weights.safetensors``); ValueError names the file for what it cannot read."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / DIFFUSERS_WEIGHTS
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
        raw = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iter)
    tensors: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    for key, value in raw.items():
        prefix, _, rest = key.partition(".")
        if prefix not in ("unet", "text_encoder") or not rest:
            raise ValueError(f"{path}: key {key!r} is neither unet.* nor text_encoder.*")
        rest = rest.replace(".lora.down.", ".lora_A.").replace(".lora.up.", ".lora_B.")
        if rest.endswith(".alpha"):  # network alphas: one scalar per module
            alphas[rest[: -len(".alpha")]] = float(value)
            continue
        tensors[PEFT_PREFIX + (TEXT + rest if prefix == "text_encoder" else rest)] = value
    if not tensors:
        raise ValueError(f"{path}: no LoRA tensors")
    stored = json.loads(header[METADATA_KEY]) if header.get(METADATA_KEY) else {}
    settings = {k.partition(".")[2]: v for k, v in stored.items() if k.startswith("unet.")}
    if not settings:
        settings = _inferred_settings(tensors, alphas)
    fields = {k: v for k, v in settings.items() if k in _CONFIG_FIELDS}
    return LoraConfig(**fields), tensors


def _inferred_settings(tensors: dict[str, torch.Tensor], alphas: dict[str, float]) -> dict:
    """r (the commonest rank), rank_pattern for the rest, alpha (= rank, or the file's alphas),
    target_modules = the adapted modules' paths."""
    ranks = {k.split(".lora_A.")[0][len(PEFT_PREFIX) :]: v.shape[0]
             for k, v in tensors.items() if ".lora_A." in k}  # fmt: skip
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    settings: dict[str, Any] = {
        "r": r,
        "lora_alpha": r,
        "rank_pattern": {m: k for m, k in ranks.items() if k != r},
        "target_modules": sorted(ranks),
        "use_dora": any("lora_magnitude_vector" in k for k in tensors),
    }
    if alphas:
        common = collections.Counter(alphas.values()).most_common(1)[0][0]
        settings["lora_alpha"] = common
        settings["alpha_pattern"] = {m: a for m, a in alphas.items() if a != common}
    else:  # alpha = rank per module: every module keeps scale 1
        settings["alpha_pattern"] = dict(settings["rank_pattern"])
    return settings


def load_diffusers_lora(
    model: torch.nn.Module, path: str | os.PathLike, adapter_name: str = "default"
) -> Any:
    """A PeftModel: ``model`` (a TextToImageUNet or a plain UNet) with the diffusers LoRA file
    ``path`` loaded into a fresh adapter."""
    config, tensors = read_diffusers_lora(path)
    peft_model = get_peft_model(model, config, adapter_name)
    peft_model.load_adapter_state_dict(tensors, adapter_name)
    return peft_model


__all__ = [
    "DIFFUSERS_WEIGHTS",
    "load_diffusers_lora",
    "read_diffusers_lora",
    "save_diffusers_lora",
    "to_diffusers",
]
