"""Which base models each prompt method can adapt, and the config fields read from the model.

Everything here runs at ``get_peft_model`` time, so a method/task/model combination that cannot
work is refused with a reason instead of failing later with a shape error deep in a forward pass.

* Prompt tuning and P-tuning prepend rows to the input embeddings: the model needs a token
  embedding layer (``get_input_embeddings()`` returning an ``nn.Embedding``).
* Prefix tuning writes keys/values into the attention cache: peftkit must know the layout of the
  architecture's cache (layers, key/value heads, head size, which stack reads it). Families whose
  layout has been checked against HF PEFT are listed in :data:`PREFIX_FAMILIES`.
"""

from __future__ import annotations

import dataclasses
import inspect

from torch import nn

from ...config import PeftType, TaskType
from .config import PromptLearningConfig

# model_type -> role of the stack that reads the prefix: "decoder" (decoder-only),
# "encoder" (bidirectional encoder with a self-attention cache) or "seq2seq" (decoder
# self-attention of an encoder-decoder model).
PREFIX_FAMILIES: dict[str, str] = {
    "bloom": "decoder",
    "gpt2": "decoder",
    "llama": "decoder",
    "mistral": "decoder",
    "qwen2": "decoder",
    "qwen3": "decoder",
    "opt": "decoder",
    "bert": "encoder",
    "roberta": "encoder",
    "t5": "seq2seq",
    "mt5": "seq2seq",
    "bart": "seq2seq",
}

CACHE_KWARGS = ("cache", "past_key_values")  # transformers >= 5.24 renamed past_key_values


@dataclasses.dataclass(frozen=True)
class KVShape:
    """The attention cache a prefix must fill: ``layers`` x (key, value) of (B, heads, P, head_dim)."""

    layers: int
    heads: int
    head_dim: int
    role: str  # "decoder" | "encoder" | "seq2seq"


def _first(config: object, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def checkpointing(model: nn.Module) -> bool:
    """Whether activation (gradient) checkpointing is on (the property was renamed in 5.x)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def model_type(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", "") or type(model).__name__


def kv_shape(model: nn.Module) -> KVShape:
    """The cache layout of ``model``, or a ValueError naming what is unknown."""
    kind = model_type(model)
    role = PREFIX_FAMILIES.get(kind)
    if role is None:
        known = ", ".join(sorted(PREFIX_FAMILIES))
        raise ValueError(
            f"prefix tuning writes keys/values into the attention cache, and peftkit does not "
            f"know the cache layout of {kind!r} models ({type(model).__name__}); verified "
            f"families: {known}. Use prompt tuning, P-tuning or LoRA for this model."
        )
    config = model.config
    if role == "seq2seq":
        layers = _first(config, "num_decoder_layers", "decoder_layers", "num_layers")
        heads = _first(config, "decoder_attention_heads", "num_heads", "num_attention_heads")
        head_dim = _first(config, "d_kv") or config.d_model // heads
        return KVShape(layers, heads, head_dim, role)
    layers = _first(config, "num_hidden_layers", "n_layer", "num_layers")
    heads = _first(config, "num_attention_heads", "n_head")
    kv_heads = _first(config, "num_key_value_heads") or heads
    head_dim = _first(config, "head_dim") or config.hidden_size // heads
    return KVShape(layers, kv_heads, head_dim, role)


def word_embeddings(model: nn.Module) -> nn.Embedding:
    """The token embedding layer that virtual tokens are prepended to."""
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        emb = None
    if not isinstance(emb, nn.Embedding):
        raise ValueError(
            f"prompt tuning and P-tuning prepend virtual-token embeddings to the input "
            f"embeddings, but {type(model).__name__} has no token embedding layer "
            f"(get_input_embeddings() gave {type(emb).__name__}); use LoRA for this model"
        )
    return emb


def accepts_kwarg(module: nn.Module, names: tuple[str, ...]) -> str | None:
    """The first of ``names`` that ``module.forward`` takes by name, else None."""
    params = inspect.signature(module.forward).parameters
    return next((n for n in names if n in params), None)


def cache_entry(model: nn.Module) -> tuple[nn.Module, str]:
    """(module, kwarg) through which a prefix cache reaches the attention layers.

    The task model itself when its forward takes the cache, else its backbone
    (``model.base_model``, e.g. ``BertModel`` under ``BertForSequenceClassification``).
    """
    name = accepts_kwarg(model, CACHE_KWARGS)
    if name is not None:
        return model, name
    backbone = getattr(model, "base_model", model)
    if backbone is not model and isinstance(backbone, nn.Module):
        name = accepts_kwarg(backbone, CACHE_KWARGS)
        if name is not None:
            return backbone, name
    raise ValueError(
        f"prefix tuning needs a model whose forward takes a key/value cache, but neither "
        f"{type(model).__name__} nor its backbone accepts one; use prompt tuning or P-tuning"
    )


def check_task(model: nn.Module, config: PromptLearningConfig) -> None:
    """Refuse task types the model cannot serve with a prompt method."""
    task = config.task_type
    if task is None:
        valid = ", ".join(t.value for t in TaskType)
        raise ValueError(
            f"{type(config).__name__} needs task_type (it decides how masks, labels and "
            f"generation are extended for the virtual tokens); use one of: {valid}"
        )
    is_seq2seq = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    name = type(model).__name__
    if task == TaskType.SEQ_2_SEQ_LM and not is_seq2seq:
        raise ValueError(
            f"task_type=SEQ_2_SEQ_LM needs an encoder-decoder model, but {name} is not one; "
            f"use task_type=CAUSAL_LM for decoder-only language models"
        )
    if task == TaskType.CAUSAL_LM and is_seq2seq:
        raise ValueError(
            f"{name} is an encoder-decoder model: use task_type=SEQ_2_SEQ_LM, not CAUSAL_LM"
        )
    if is_seq2seq and task in (TaskType.SEQ_CLS, TaskType.QUESTION_ANS):
        raise ValueError(
            f"{name} pools on the end-of-sequence token it finds in input_ids, which virtual "
            f"tokens and prefixes do not have, so prompt methods cannot drive its "
            f"{task.value} head; use LoRA for encoder-decoder classification"
        )


def fill_config(model: nn.Module, config: PromptLearningConfig) -> None:
    """Fill the model-shape fields PEFT fills, and check the ones already set against the model.

    Prompt tuning / P-tuning: ``token_dim`` is the input-embedding width. Prefix tuning:
    ``token_dim = kv_heads * head_dim`` and ``num_attention_heads = kv_heads`` (PEFT's rule for
    grouped-query attention), ``num_layers`` = layers that receive a prefix.
    """
    check_task(model, config)
    model_config = model.config
    if hasattr(model_config, "get_text_config"):
        model_config = model_config.get_text_config()
    if config.num_transformer_submodules is None:
        config.num_transformer_submodules = 2 if config.task_type == TaskType.SEQ_2_SEQ_LM else 1
    if config.peft_type == PeftType.PREFIX_TUNING:
        _fill_prefix(model, config)
    else:
        width = word_embeddings(model).embedding_dim
        _set_or_check(config, "token_dim", width, "the input-embedding width")
        if config.num_layers is None:
            config.num_layers = _first(model_config, "num_hidden_layers", "n_layer", "num_layers")
        if config.num_attention_heads is None:
            config.num_attention_heads = _first(
                model_config, "num_attention_heads", "n_head", "num_heads"
            )
    if getattr(config, "encoder_hidden_size", "absent") is None:
        config.encoder_hidden_size = config.token_dim


def _fill_prefix(model: nn.Module, config: PromptLearningConfig) -> None:
    shape = kv_shape(model)
    cache_entry(model)  # refuses models whose forward cannot take a cache
    if shape.role == "seq2seq" and config.num_transformer_submodules != 2:
        raise ValueError(
            "prefix tuning of an encoder-decoder model needs num_transformer_submodules=2"
        )
    if checkpointing(model):
        raise ValueError(
            "prefix tuning feeds the prefix through the key/value cache, which gradient "
            "checkpointing re-runs and corrupts; call model.gradient_checkpointing_disable() first"
        )
    _set_or_check(config, "num_layers", shape.layers, "the number of attention layers")
    _set_or_check(config, "num_attention_heads", shape.heads, "the number of key/value heads")
    _set_or_check(config, "token_dim", shape.heads * shape.head_dim, "key/value heads x head size")


def _set_or_check(config: PromptLearningConfig, field: str, value: int, meaning: str) -> None:
    current = getattr(config, field)
    if current is None:
        setattr(config, field, value)
    elif current != value:
        raise ValueError(
            f"{type(config).__name__}.{field}={current} does not fit this model, where it must "
            f"be {value} ({meaning}); leave {field}=None to read it from the model"
        )
