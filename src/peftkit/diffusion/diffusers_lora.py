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
diffusers / kohya layout) read as ``lora_A`` / ``lora_B``.

LoKr goes the same way (``unet.<path>.lokr_w1`` ..., the LoKrConfig fields in the metadata):
diffusers (0.42) detects ``.lokr_`` keys in ``load_lora_adapter`` and builds PEFT's LoKrConfig
from the metadata. LoHa has no diffusers reader, and AdaLoRA's P·diag(E)·Q factors no diffusers
layout: both are refused by name (the PEFT-format ``adapter/`` folder holds them).
"""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import save_tensors
from ..methods.lokr import LoKrConfig
from ..methods.lora_config import LoraConfig, match_pattern_key
from ..peft_model import get_peft_model

DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"  # diffusers' key in the safetensors header
PEFT_PREFIX = "base_model.model."
TEXT = "text_encoder."
# LoraConfig fields diffusers hands to peft.LoraConfig when it reads the metadata
_CONFIG_FIELDS = ("r", "lora_alpha", "target_modules", "lora_dropout", "bias", "use_dora",
                  "use_rslora", "rank_pattern", "alpha_pattern", "fan_in_fan_out", "lora_bias",
                  "init_lora_weights")  # fmt: skip
# LoKrConfig fields written for diffusers (it passes them to peft.LoKrConfig)
_LOKR_FIELDS = ("r", "alpha", "target_modules", "rank_dropout", "module_dropout",
                "use_effective_conv2d", "decompose_both", "decompose_factor", "rank_dropout_scale",
                "rank_pattern", "alpha_pattern", "init_weights")  # fmt: skip
# peft_type -> (the marker in its factors' names, the config fields its metadata carries)
_FILE_FIELDS = {"LORA": (".lora_", _CONFIG_FIELDS), "LOKR": (".lokr_", _LOKR_FIELDS)}
# peft_type -> why diffusers' file cannot carry it (for the error)
_NO_DIFFUSERS_FILE = {
    "LOHA": "diffusers has no reader for LoHa weights (its load_lora_weights takes LoRA and LoKr)"
}


def to_diffusers(tensors: dict[str, torch.Tensor], config: Any) -> tuple[dict, dict]:
    """PEFT on-disk tensors + LoraConfig -> (diffusers tensors, diffusers metadata dict)."""
    peft_type = getattr(config.peft_type, "value", config.peft_type)
    if peft_type not in _FILE_FIELDS:
        why = _NO_DIFFUSERS_FILE.get(
            peft_type, "diffusers' LoRA files hold LoRA / DoRA (and LoKr) factors only"
        )
        raise ValueError(
            f"{peft_type}: {why}; the PEFT-format adapter folder holds this adapter "
            "(peft.PeftModel.from_pretrained(unet, folder) loads it)"
        )
    marker, names = _FILE_FIELDS[peft_type]
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if not key.startswith(PEFT_PREFIX) or marker not in key:
            raise ValueError(
                f"{key}: not a {peft_type} factor; diffusers' files hold only the adapter's factors"
            )
        rest = key[len(PEFT_PREFIX) :]
        out[rest if rest.startswith(TEXT) else "unet." + rest] = value.contiguous()
    fields = config.to_dict()
    settings = {k: fields[k] for k in names if k in fields}
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
    ``pytorch_lora_weights.safetensors``); ValueError names the file for what it cannot read.

    The UNet and the text encoder may carry different settings (diffusers writes one metadata
    block per component): the config targets exactly the modules the file adapts, with ``r`` /
    ``lora_alpha`` of the UNet's block and ``rank_pattern`` / ``alpha_pattern`` for every module
    whose rank (read off its tensors) or alpha differs.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path).expanduser()
    if path.is_dir():
        path = path / DIFFUSERS_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: LoRA file not found (diffusers writes {DIFFUSERS_WEIGHTS})"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            raw = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iter)
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path}: not a safetensors LoRA file ({exc})") from None
    tensors: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    for key, value in raw.items():
        prefix, _, rest = key.partition(".")
        if prefix not in ("unet", "text_encoder") or not rest:
            raise ValueError(
                f"{path}: key {key!r} is neither unet.* nor text_encoder.* (an SDXL LoRA's "
                "text_encoder_2.* keys need an SDXL base, which text_to_image does not support)"
            )
        rest = rest.replace(".lora.down.", ".lora_A.").replace(".lora.up.", ".lora_B.")
        module = TEXT + rest if prefix == "text_encoder" else rest
        if rest.endswith(".alpha"):  # network alphas: one scalar per module
            alphas[module[: -len(".alpha")]] = float(value)
            continue
        tensors[PEFT_PREFIX + module] = value
    if not tensors:
        raise ValueError(f"{path}: no LoRA tensors")
    stored = json.loads(header[METADATA_KEY]) if header.get(METADATA_KEY) else {}
    parts = {
        part: {k.partition(".")[2]: v for k, v in stored.items() if k.startswith(part + ".")}
        for part in ("unet", "text_encoder")
    }
    if any(".lokr_" in k for k in tensors):
        if not parts["unet"]:
            raise ValueError(
                f"{path}: a LoKr file without its config in the header ({METADATA_KEY}); "
                "peftkit reads LoKr files that carry it (as peftkit and diffusers write them)"
            )
        return LoKrConfig(**{k: v for k, v in parts["unet"].items() if k in _LOKR_FIELDS}), tensors
    settings = _settings(tensors, alphas, parts)
    return LoraConfig(**{k: v for k, v in settings.items() if k in _CONFIG_FIELDS}), tensors


def _settings(
    tensors: dict[str, torch.Tensor], alphas: dict[str, float], parts: dict[str, dict]
) -> dict[str, Any]:
    """LoraConfig fields for the modules in ``tensors``: each module's rank from its tensors,
    its alpha from the file's network alphas, else its component's metadata (``lora_alpha``,
    ``alpha_pattern``), else its rank (diffusers' rule for files without either: scale 1)."""
    ranks = {k.split(".lora_A.")[0][len(PEFT_PREFIX) :]: v.shape[0]
             for k, v in tensors.items() if ".lora_A." in k}  # fmt: skip
    module_alpha: dict[str, float] = {}
    for module, rank in ranks.items():
        part = "text_encoder" if module.startswith(TEXT) else "unet"
        meta = parts.get(part) or {}
        local = module[len(TEXT) :] if part == "text_encoder" else module
        key = match_pattern_key(meta.get("alpha_pattern") or {}, local)
        if module in alphas:
            module_alpha[module] = alphas[module]
        elif key is not None:
            module_alpha[module] = float(meta["alpha_pattern"][key])
        elif "lora_alpha" in meta:
            module_alpha[module] = float(meta["lora_alpha"])
        else:
            module_alpha[module] = float(rank)
    main = parts.get("unet") or parts.get("text_encoder") or {}
    r = int(main["r"]) if "r" in main else collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = main.get("lora_alpha", collections.Counter(module_alpha.values()).most_common(1)[0][0])
    settings = {k: v for k, v in main.items() if k in _CONFIG_FIELDS}
    settings.update(
        r=r,
        lora_alpha=alpha,
        target_modules=sorted(ranks),  # exactly the adapted modules
        rank_pattern={m: k for m, k in ranks.items() if k != r},
        alpha_pattern={m: a for m, a in module_alpha.items() if a != alpha},
        use_dora=bool(main.get("use_dora")) or any("lora_magnitude_vector" in k for k in tensors),
    )
    return settings


def load_diffusers_lora(
    model: torch.nn.Module, path: str | os.PathLike, adapter_name: str = "default"
) -> Any:
    """A PeftModel: ``model`` (a TextToImageUNet or a plain UNet) with the diffusers LoRA (or
    LoKr) file ``path`` loaded into a fresh adapter."""
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
