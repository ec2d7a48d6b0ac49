"""Whole-model QLoRA plumbing: quantise a transformers model, prepare it, undo it, export it.

::

    model --quantize_model--> Linear layers -> Linear4bit (head, tied and skipped layers kept)
          --prepare_model_for_kbit_training--> frozen, fp32 norms, gradient checkpointing
          --get_peft_model--> LoRA on Linear4bit (trained)
          --dequantize_model--> Linear4bit -> nn.Linear (exact: the weights it computed with)
          --merge_and_unload / save_merged--> plain model, fp16/bf16 safetensors
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import atomic_file, atomic_write_text
from .linear4bit import Linear4bit, _check_blocksize_fits, check_layer_args, check_weight

# Task heads are trained from scratch (or saved whole via modules_to_save); never quantise them.
DEFAULT_SKIP_NAMES = ("lm_head", "score", "classifier", "qa_outputs")
_QUANT_ATTR = "_peftkit_quantization"


def _name_matches(name: str, patterns: Iterable[str]) -> bool:
    """True if ``name`` equals a pattern, ends with ``.pattern``, or lies under ``pattern.``."""
    for p in patterns:
        if name == p or name.endswith("." + p) or name.startswith(p + ".") or f".{p}." in name:
            return True
    return False


def _is_quantizable(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")  # transformers GPT-2


def _already_quantized_reason(model: nn.Module) -> str | None:
    if getattr(model, _QUANT_ATTR, None) is not None:
        return "it was already quantised by peftkit.quant.quantize_model"
    for name, module in model.named_modules():
        if isinstance(module, Linear4bit):
            return f"module {name!r} is already a peftkit Linear4bit"
        if type(module).__module__.startswith("bitsandbytes"):
            return f"module {name!r} is a bitsandbytes {type(module).__name__}"
        weight = getattr(module, "weight", None)
        if _is_quantizable(module) and isinstance(weight, torch.Tensor):
            if not weight.dtype.is_floating_point:
                return f"module {name!r} holds {weight.dtype} weights"
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", "")
        method = str(getattr(method, "value", method)).lower()
        if method != "gguf":  # GGUF checkpoints are de-quantised to float when loaded
            return f"transformers loaded it with a {method or 'quantization'} quantization_config"
    return None


def _tied_to_embedding(model: nn.Module) -> set[int]:
    """ids of weight tensors shared with an input embedding (tied output heads)."""
    tied = set()
    get_in = getattr(model, "get_input_embeddings", None)
    emb = get_in() if callable(get_in) else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        tied.add(id(emb.weight))
    return tied


def _default_skips(model: nn.Module) -> set[str]:
    skips = set()
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is not None:
        for name, module in model.named_modules():
            if module is head:
                skips.add(name)
    tied = _tied_to_embedding(model)
    for name, module in model.named_modules():
        if getattr(module, "weight", None) is not None and id(module.weight) in tied:
            skips.add(name)
    return skips


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantize_model(
    model: nn.Module,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
    skip_modules: Iterable[str] | None = None,
    blocksize: int = 64,
) -> nn.Module:
    """Replace the model's Linear layers by :class:`Linear4bit`, in place, and return it.

    Skipped: the output head (``get_output_embeddings()``), any layer tied to the input
    embedding, task heads named ``lm_head`` / ``score`` / ``classifier`` / ``qa_outputs``, and
    ``skip_modules`` (full names, trailing names like ``"o_proj"``, or parent names like
    ``"model.layers.0"``). Arguments and all layers are checked before any is replaced, so an
    error leaves the model untouched.

    Args:
        model: a float model (transformers or any nn.Module).
        quant_type: "nf4" or "fp4".
        double_quant: quantise the absmax statistics to 8 bits (4.127 instead of 4.5 bits/param).
        compute_dtype: matmul dtype (default: each layer's weight dtype).
        skip_modules: extra module names to keep in full precision.
        blocksize: weights per absmax block; each layer's in_features must be a multiple of it.

    Raises:
        ValueError: the model is already quantised, a layer's in_features is not a multiple of
            ``blocksize``, or nothing is left to quantise.
        TypeError: unsupported weight or compute dtype.
    """
    reason = _already_quantized_reason(model)
    if reason:
        raise ValueError(
            f"refusing to quantise an already quantised model: {reason}. Load the model in "
            "full precision (or call peftkit.quant.dequantize_model) before quantize_model"
        )
    check_layer_args(quant_type, blocksize, compute_dtype)
    targets = quantization_targets(model, skip_modules, blocksize)
    for name in targets:
        module = model.get_submodule(name)
        new = Linear4bit.from_linear(
            module, quant_type, double_quant, compute_dtype, blocksize, name
        )
        _set_submodule(model, name, new)
        del module  # the full-precision weight is freed once no one else refers to it
    mark_quantized(model, quant_type, double_quant, blocksize, compute_dtype, targets)
    return model


def quantization_targets(
    model: nn.Module, skip_modules: Iterable[str] | None = None, blocksize: int = 64
) -> list[str]:
    """Names of the layers :func:`quantize_model` replaces, each checked (dtype, blocksize).

    Works on a model whose weights are still on the meta device (only shapes and dtypes are
    read), so a loader can decide what to quantise before any weight is read.
    """
    skips = _default_skips(model) | set(skip_modules or ()) | set(DEFAULT_SKIP_NAMES)
    targets = []
    for name, module in model.named_modules():
        if not _is_quantizable(module) or _name_matches(name, skips):
            continue
        in_features = module.weight.shape[1 if isinstance(module, nn.Linear) else 0]
        if module.weight.device.type != "meta":
            check_weight(module.weight, repr(name))
        _check_blocksize_fits(in_features, blocksize, name)
        targets.append(name)
    if not targets:
        raise ValueError(
            "quantize_model found no nn.Linear layer to quantise (after skipping the output head "
            f"and skip_modules={sorted(skip_modules or ())}); check the model and skip_modules"
        )
    return targets


def mark_quantized(
    model: nn.Module,
    quant_type: str,
    double_quant: bool,
    blocksize: int,
    compute_dtype: torch.dtype | None,
    modules: list[str],
) -> None:
    """Record how ``model`` was quantised (read back by :func:`dequantize_model` & co.)."""
    setattr(
        model,
        _QUANT_ATTR,
        {
            "quant_type": quant_type,
            "double_quant": double_quant,
            "blocksize": blocksize,
            "compute_dtype": str(compute_dtype) if compute_dtype else None,
            "modules": modules,
        },
    )


def is_quantized(model: nn.Module) -> bool:
    """True if any Linear4bit layer is in the model."""
    return any(isinstance(m, Linear4bit) for m in model.modules())


def quantized_param_count(model: nn.Module) -> int:
    """Number of weight elements stored in Linear4bit layers (they are buffers, not parameters).

    Add this to ``sum(p.numel() for p in model.parameters())`` to count all parameters the way
    HF PEFT counts a bitsandbytes 4-bit model.
    """
    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, Linear4bit))


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every :class:`Linear4bit` (also one nested as a LoRA ``base_layer``) by a
    full-precision ``nn.Linear`` holding exactly the dequantised weight. In place; returns model.

    After this, LoRA ``merge_and_unload()`` is exact. ``dtype`` defaults to each layer's original
    weight dtype.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, Linear4bit)]
    for name in names:
        layer = model.get_submodule(name)
        _set_submodule(model, name, layer.to_linear(dtype))
    for module in model.modules():
        if getattr(module, _QUANT_ATTR, None) is not None:
            setattr(module, _QUANT_ATTR, None)
    return model


def _is_norm(module: nn.Module) -> bool:
    norm_types = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, getattr(nn, "RMSNorm", nn.LayerNorm))
    if isinstance(module, norm_types):
        return True
    return "norm" in type(module).__name__.lower()


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict | None = None,
) -> nn.Module:
    """Get a (quantised) model ready for adapter training, in place; returns it.

    * freezes every parameter (adapters added afterwards are the only trainable ones);
    * casts normalisation layers' parameters to float32 (their statistics are precision
      sensitive; fp16/bf16 norms are a common source of QLoRA loss spikes);
    * with ``use_gradient_checkpointing``: makes the input embeddings' output require grad
      (reentrant checkpointing only back-propagates through blocks whose inputs need grad) and
      turns on transformers' gradient checkpointing.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    for module in model.modules():
        if _is_norm(module):
            for param in module.parameters(recurse=False):
                if param.dtype in (torch.float16, torch.bfloat16):
                    param.data = param.data.float()
    if use_gradient_checkpointing:
        enable_gradient_checkpointing(model, gradient_checkpointing_kwargs)
    return model


def enable_gradient_checkpointing(model: nn.Module, kwargs: dict | None = None) -> nn.Module:
    """Turn on transformers' gradient (activation) checkpointing for adapter training, with
    frozen inputs: the input embeddings' output is made to require grad, since reentrant
    checkpointing only back-propagates through blocks whose inputs need it. ``kwargs`` go to
    ``torch.utils.checkpoint`` (default ``use_reentrant=True``, as PEFT). Returns ``model``."""
    # transformers 5 renamed gradient_checkpointing_enable (kept as a deprecated alias)
    new_api = getattr(model, "activation_checkpointing_enable", None)
    old_api = getattr(model, "gradient_checkpointing_enable", None)
    if not callable(new_api) and not callable(old_api):
        raise ValueError(
            f"{type(model).__name__} cannot turn on gradient checkpointing (no "
            "gradient_checkpointing_enable); pass use_gradient_checkpointing=False or use a "
            "transformers PreTrainedModel"
        )
    if callable(getattr(model, "enable_input_require_grads", None)):
        model.enable_input_require_grads()
    else:
        emb = model.get_input_embeddings()
        emb.register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
    options = {"use_reentrant": True}
    options.update(kwargs or {})
    if callable(new_api):
        new_api(activation_checkpointing_kwargs=options)
    else:
        old_api(gradient_checkpointing_kwargs=options)
    return model


def _unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict without duplicate (tied) tensors: safetensors refuses shared storage."""
    seen: set[tuple[int, int, tuple]] = set()
    out = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().contiguous()
    return out


def save_merged(
    model: nn.Module, out_dir: str | os.PathLike, dtype: torch.dtype = torch.bfloat16
) -> nn.Module:
    """Export a full-precision merged model: ``model.safetensors`` + ``config.json``.

    Dequantises every Linear4bit (exactly), merges LoRA adapters if ``model`` is a PeftModel
    (``merge_and_unload``), casts to ``dtype`` and writes each file atomically
    (``checkpoint.atomic_file``). The result loads with ``AutoModel*.from_pretrained(out_dir)``.
    The model is modified in place; the merged plain model is returned.

    Args:
        model: a PeftModel or a plain (possibly quantised) transformers model.
        out_dir: output folder (created).
        dtype: torch.bfloat16, torch.float16 or torch.float32.
    """
    from safetensors.torch import save_file

    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"dtype={dtype} is not supported; use torch.bfloat16 or torch.float16")
    dequantize_model(model)
    merged = (
        model.merge_and_unload() if callable(getattr(model, "merge_and_unload", None)) else model
    )
    merged = merged.to(dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = _unique_state_dict(merged)
    with atomic_file(out / "model.safetensors") as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    config = getattr(merged, "config", None)
    if config is None:
        warnings.warn("model has no config; wrote model.safetensors only", stacklevel=2)
    else:
        cfg = config.to_dict()
        cfg.pop("quantization_config", None)
        cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
        cfg["dtype"] = cfg["torch_dtype"]
        text = json.dumps(cfg, indent=2, sort_keys=True) + "\n"
        atomic_write_text(out / "config.json", text)
    gen = getattr(merged, "generation_config", None)
    if gen is not None and hasattr(gen, "to_json_string"):
        atomic_write_text(out / "generation_config.json", gen.to_json_string())
    return merged
