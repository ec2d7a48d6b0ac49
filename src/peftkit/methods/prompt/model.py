"""How a ``PeftModel`` holds and runs prompt-learning adapters (the hooks ``model.py`` calls).

::

    PeftModel
      .base_model        the transformers model, frozen (task heads wrapped as modules_to_save)
      .prompt_encoder    {adapter name: PromptEmbedding | PromptEncoder | PrefixEncoder}
      forward(...)  -> prompt_forward   (virtual tokens into embeddings or the KV cache)
      generate(...) -> prompt_generate  (virtual tokens processed once, then cached)

On disk (HF PEFT's format): ``prompt_embeddings`` = the encoder's output table, plus the task
head under ``base_model.<path>.weight``. P-tuning and prefix-projection adapters also store their
encoder as ``prompt_encoder.<param>`` so training can resume; PEFT ignores those keys. A file
holding only ``prompt_embeddings`` (PEFT's) loads such an encoder in *direct* mode.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from .. import checkpoint
from ..config import PeftType
from ..inject import ModulesToSaveWrapper, wrap_modules_to_save
from .p_tuning import PromptEncoder
from .prefix_tuning import PrefixEncoder
from .prompt_base import PromptLearningConfig, VirtualTokenEncoder
from .prompt_forward import embedding_forward, heads_disabled, prefix_forward
from .prompt_generate import generate_with_prompt
from .prompt_support import fill_config, word_embeddings
from .prompt_tuning import PromptEmbedding

TABLE_KEY = "prompt_embeddings"
ENCODER_PREFIX = "prompt_encoder."


def _make_encoder(model: torch.nn.Module, config: PromptLearningConfig) -> VirtualTokenEncoder:
    if config.peft_type == PeftType.PROMPT_TUNING:
        return PromptEmbedding(config, word_embeddings(model))
    if config.peft_type == PeftType.P_TUNING:
        return PromptEncoder(config)
    if config.peft_type == PeftType.PREFIX_TUNING:
        return PrefixEncoder(config)
    raise ValueError(f"{config.peft_type.value} is not a prompt-learning method")


def _device_of(model: torch.nn.Module) -> torch.device:
    try:
        return word_embeddings(model).weight.device
    except ValueError:
        return next(model.parameters()).device


def attach(peft_model: Any, adapter_name: str, config: PromptLearningConfig) -> None:
    """Validate the model for ``config``, build the encoder and freeze the base model."""
    model = peft_model.base_model
    fill_config(model, config)
    for param in model.parameters():
        param.requires_grad_(False)
    encoder = _make_encoder(model, config).to(_device_of(model))
    peft_model.prompt_encoder[adapter_name] = encoder
    if config.modules_to_save:
        wrap_modules_to_save(model, config.modules_to_save, adapter_name)
    set_active(peft_model, peft_model.active_adapter)


def set_active(peft_model: Any, adapter_name: str) -> None:
    """Route forward through ``adapter_name``; only it (encoder and head copy) trains."""
    config = peft_model.peft_config[adapter_name]
    trainable = not config.inference_mode
    for name, encoder in peft_model.prompt_encoder.items():
        encoder.requires_grad_(trainable and name == adapter_name)
    for module in peft_model.base_model.modules():
        if isinstance(module, ModulesToSaveWrapper):
            module.set_adapter(adapter_name)
            for name, copy_ in module.modules_to_save.items():
                copy_.requires_grad_(trainable and name == adapter_name)


def detach(peft_model: Any, adapter_name: str) -> None:
    """Remove the encoder and head copies of ``adapter_name``."""
    del peft_model.prompt_encoder[adapter_name]
    for module in peft_model.base_model.modules():
        if isinstance(module, ModulesToSaveWrapper):
            module.delete_adapter(adapter_name)


def _active_table(peft_model: Any) -> torch.Tensor:
    return peft_model.prompt_encoder[peft_model.active_adapter]()  # (1, rows, width)


def forward(peft_model: Any, *args: Any, **kwargs: Any) -> Any:
    """The base model's forward with the active adapter's virtual tokens."""
    if args:
        if len(args) > 1 or "input_ids" in kwargs:
            raise TypeError("pass inputs to a prompt-learning model by name (input_ids=...)")
        kwargs["input_ids"] = args[0]
    model = peft_model.base_model
    if getattr(peft_model, "_adapters_disabled", False):
        with heads_disabled(model):
            return model(**kwargs)
    config = peft_model.active_peft_config
    table = _active_table(peft_model)
    if config.peft_type == PeftType.PREFIX_TUNING:
        return prefix_forward(model, config, table, kwargs)
    return embedding_forward(model, config, table, kwargs)


def generate(peft_model: Any, *args: Any, **kwargs: Any) -> Any:
    """``generate`` of the base model with the virtual tokens processed once and cached."""
    if args:
        if len(args) > 1 or "input_ids" in kwargs:
            raise TypeError("pass inputs to generate() by name (input_ids=...)")
        kwargs["input_ids"] = args[0]
    model = peft_model.base_model
    if getattr(peft_model, "_adapters_disabled", False):
        with heads_disabled(model):
            return model.generate(**kwargs)
    with torch.no_grad():
        table = _active_table(peft_model)
    return generate_with_prompt(model, peft_model.active_peft_config, table, kwargs)


# --- saving and loading --------------------------------------------------------------------
def _head_keys(peft_model: Any, adapter_name: str) -> dict[str, str]:
    """On-disk name -> in-memory state-dict key of each modules_to_save tensor."""
    out = {}
    for key in peft_model.state_dict():
        if ".modules_to_save." in key:
            disk = checkpoint.saved_key(key, adapter_name, ())
            if disk is not None:
                out[disk] = key
    return out


def state_dict_to_save(peft_model: Any, adapter_name: str) -> dict[str, torch.Tensor]:
    """``prompt_embeddings`` (+ encoder weights when reparameterised) + head copies."""
    encoder = peft_model.prompt_encoder[adapter_name]
    out = {TABLE_KEY: encoder.output_table()}
    if encoder.reparameterized:
        for key, tensor in encoder.state_dict().items():
            out[ENCODER_PREFIX + key] = tensor
    state = peft_model.state_dict()
    for disk, key in _head_keys(peft_model, adapter_name).items():
        out[disk] = state[key]
    return out


def load_state_dict(peft_model: Any, adapter_name: str, state: dict[str, torch.Tensor]) -> None:
    """Load a prompt adapter saved by peftkit or HF PEFT, refusing tensors that do not fit."""
    encoder = peft_model.prompt_encoder[adapter_name]
    heads = _head_keys(peft_model, adapter_name)
    encoder_state = {
        k[len(ENCODER_PREFIX) :]: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)
    }
    unexpected = [
        k for k in state if k != TABLE_KEY and k not in heads and not k.startswith(ENCODER_PREFIX)
    ]
    missing = [k for k in heads if k not in state]
    if TABLE_KEY not in state:
        missing.append(TABLE_KEY)
    if unexpected or missing:
        parts = []
        if missing:
            parts.append(f"missing keys: {checkpoint.describe_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {checkpoint.describe_keys(unexpected)}")
        config = peft_model.peft_config[adapter_name]
        raise ValueError(
            f"adapter does not fit this {config.peft_type.value} model ({'; '.join(parts)}); "
            f"check that it was saved for this method, task ({config.task_type.value}) and base "
            f"model ({config.base_model_name_or_path!r})"
        )
    _load_encoder(encoder, state[TABLE_KEY], encoder_state, peft_model.peft_config[adapter_name])
    params = dict(peft_model.named_parameters())
    params.update(dict(peft_model.named_buffers()))
    with torch.no_grad():
        for disk, key in heads.items():
            _copy_checked(params[key], state[disk], disk)


def _load_encoder(
    encoder: VirtualTokenEncoder,
    table: torch.Tensor,
    encoder_state: dict[str, torch.Tensor],
    config: PromptLearningConfig,
) -> None:
    rows_width = tuple(table.shape)
    if rows_width != tuple(encoder.expected_table_shape()):
        raise ValueError(
            f"prompt_embeddings has shape {rows_width} but this model expects "
            f"{tuple(encoder.expected_table_shape())} (num_virtual_tokens x width); the "
            f"adapter was made for another base model or number of virtual tokens"
        )
    if encoder.reparameterized and encoder_state:
        own = encoder.state_dict()
        if set(own) != set(encoder_state):
            raise ValueError(
                f"the saved prompt encoder has parameters {sorted(encoder_state)} but this "
                f"config builds {sorted(own)}; the adapter_config.json does not match its weights"
            )
        with torch.no_grad():
            for key, tensor in own.items():
                _copy_checked(tensor, encoder_state[key], ENCODER_PREFIX + key)
        recomputed = encoder.output_table()
        if not torch.allclose(recomputed, table.to(recomputed), rtol=1e-4, atol=1e-5):
            warnings.warn(
                "the saved prompt encoder does not reproduce the saved prompt_embeddings; "
                "using the encoder (was one of them edited after saving?)",
                stacklevel=4,
            )
        return
    if encoder.reparameterized:
        if not config.inference_mode:
            warnings.warn(
                f"this {config.peft_type.value} adapter holds only prompt_embeddings (saved by "
                f"HF PEFT, which drops the encoder network): training continues on the "
                f"embeddings directly, without the reparameterising network",
                stacklevel=4,
            )
        encoder.use_direct_table(table.to(encoder.embedding.weight.device))
        return
    with torch.no_grad():
        _copy_checked(encoder.embedding.weight, table, TABLE_KEY)


def _copy_checked(target: torch.Tensor, value: torch.Tensor, name: str) -> None:
    if tuple(target.shape) != tuple(value.shape):
        raise ValueError(
            f"adapter tensor {name} has shape {tuple(value.shape)} but the model expects "
            f"{tuple(target.shape)}: the adapter was made for a different base model"
        )
    target.copy_(value.to(device=target.device, dtype=target.dtype))
