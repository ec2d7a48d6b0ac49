"""``generate()`` for prompt-learning adapters: the virtual tokens are processed once, then cached.

::

    prompt tuning / P-tuning, causal LM:
        base.generate(input_ids, inputs_embeds=[prompt; embed(input_ids)], attention_mask=[1..1; mask])
        the first step encodes prompt + input; later steps feed one token and reuse the KV cache
    prompt tuning / P-tuning, seq2seq:
        base.generate(inputs_embeds=[prompt; embed(input_ids)], attention_mask=[1..1; mask])
        the encoder sees the prompt once; decoding is the base model's
    prefix tuning (both):
        base.generate(input_ids, attention_mask=[1..1; mask], cache=<prefix cache>)
        the prefix sits in the cache before the first step, like a prompt already decoded

Positions come from the attention mask (``cumsum - 1``), so a left-padded row generates the same
tokens as that row alone. The result has the base model's shape: causal LM sequences start with
``input_ids``; seq2seq sequences are decoder tokens. The cache is built for
``max(num_beams, num_return_sequences)`` copies of each row, as ``generate`` expands the batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...config import PeftType, TaskType
from .config import PromptLearningConfig
from .forward import batch_size, extend_mask, float_dtype, prepend_virtual_tokens
from .prefix_cache import build_cache
from .support import CACHE_KWARGS, accepts_kwarg


def generate_with_prompt(
    model: nn.Module, config: PromptLearningConfig, table: torch.Tensor, kwargs: dict[str, Any]
) -> Any:
    """Run ``model.generate`` with the adapter's virtual tokens (``table``: (1, rows, width))."""
    if config.task_type not in (TaskType.CAUSAL_LM, TaskType.SEQ_2_SEQ_LM):
        raise ValueError(
            f"generate() needs a CAUSAL_LM or SEQ_2_SEQ_LM adapter, not {config.task_type.value}"
        )
    if kwargs.get("position_ids") is not None:
        raise ValueError(
            "do not pass position_ids to generate() with a prompt-learning adapter: they are "
            "computed from attention_mask, virtual tokens included"
        )
    if config.peft_type == PeftType.PREFIX_TUNING:
        return _generate_with_prefix(model, config, table, kwargs)
    return _generate_with_embeddings(model, config, table, kwargs)


def _generate_with_embeddings(
    model: nn.Module, config: PromptLearningConfig, table: torch.Tensor, kwargs: dict[str, Any]
) -> Any:
    tokens = config.num_virtual_tokens
    input_ids = kwargs.get("input_ids")
    _mask_with_prompt(kwargs, tokens)  # (B, N+T)
    kwargs["inputs_embeds"] = prepend_virtual_tokens(model, table, tokens, kwargs)  # (B, N+T, D)
    if input_ids is not None and config.task_type == TaskType.CAUSAL_LM:
        kwargs["input_ids"] = input_ids  # returned sequences start with the caller's ids
    return model.generate(**kwargs)


def _generate_with_prefix(
    model: nn.Module, config: PromptLearningConfig, table: torch.Tensor, kwargs: dict[str, Any]
) -> Any:
    tokens = config.num_virtual_tokens
    rows = batch_size(kwargs)
    cache_kw = accepts_kwarg(model, CACHE_KWARGS) or CACHE_KWARGS[0]
    if any(kwargs.get(alias) is not None for alias in CACHE_KWARGS):
        raise ValueError(
            "prefix tuning supplies the key/value cache to generate(); do not pass one"
        )
    if kwargs.get("use_cache") is False:
        raise ValueError("prefix tuning generates from the key/value cache; drop use_cache=False")
    copies = _expansion(model, kwargs)
    kwargs[cache_kw] = build_cache(table, config, rows * copies, float_dtype(model))
    if config.task_type == TaskType.SEQ_2_SEQ_LM:
        extend_mask(kwargs, "decoder_attention_mask", rows, tokens)
    else:
        _mask_with_prompt(kwargs, tokens)  # (B, P+T)
    return model.generate(**kwargs)


def _mask_with_prompt(kwargs: dict[str, Any], tokens: int) -> None:
    """``attention_mask`` (all ones when not given) with ``tokens`` ones in front: (B, N+T)."""
    rows = batch_size(kwargs)
    if kwargs.get("attention_mask") is None:
        inputs = kwargs.get("input_ids")
        inputs = kwargs["inputs_embeds"] if inputs is None else inputs
        kwargs["attention_mask"] = torch.ones(
            inputs.shape[:2], dtype=torch.long, device=inputs.device
        )  # (B, T)
    extend_mask(kwargs, "attention_mask", rows, tokens)


def _expansion(model: nn.Module, kwargs: dict[str, Any]) -> int:
    """How many copies of each row ``generate`` makes (beams or returned sequences)."""
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    beams = kwargs.get("num_beams", getattr(config, "num_beams", 1)) or 1
    returned = kwargs.get("num_return_sequences", getattr(config, "num_return_sequences", 1)) or 1
    return max(int(beams), int(returned))
