"""The forward pass of a prompt-learning adapter, per method and task.

Prompt tuning / P-tuning (``N`` = ``num_virtual_tokens`` rows prepended)::

    inputs_embeds   (B, T, D) -> (B, N+T, D)   [prompt rows first]
    attention_mask  (B, T)    -> (B, N+T)      ones for the prompt
    position_ids    (B, T)    -> (B, N+T)      0..N-1 for the prompt, then the given ids + N
    token_type_ids  (B, T)    -> (B, N+T)      zeros for the prompt
    labels CAUSAL_LM / TOKEN_CLS -> (B, N+T)   -100 for the prompt (never a loss target)
    start/end_positions (QA)  -> + N           they index the longer sequence
    seq2seq: only the encoder input gets the prompt; decoder inputs and labels are unchanged
             (the table has a second block of N rows, unused, because PEFT's format has it)
    the embed-then-prepend step is prepend_virtual_tokens, which generate.py uses too

Prefix tuning (``P`` key/value positions in every attention layer)::

    cache           fresh prefix cache (B, H, P, hd) per layer (see prefix_cache)
    attention_mask  (B, T) -> (B, P+T)         (decoder_attention_mask for seq2seq, when given)
    position_ids    + P                        the real tokens come after the prefix

Logits keep PEFT's shapes (prompt positions included for prompt tuning / P-tuning), so code
written for PEFT indexes them the same way. When the caller passes a non-empty cache (manual
decoding), the virtual tokens are already in it: only masks and positions are extended.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ...config import TaskType
from .config import PromptLearningConfig
from .prefix_cache import build_cache, cache_length
from .support import CACHE_KWARGS, cache_entry, checkpointing, word_embeddings

IGNORE_INDEX = -100


def batch_size(kwargs: dict[str, Any]) -> int:
    for key in ("input_ids", "inputs_embeds", "decoder_input_ids"):
        value = kwargs.get(key)
        if value is not None:
            return value.shape[0]
    raise ValueError("pass input_ids (or inputs_embeds) to a prompt-learning model")


def extend_mask(kwargs: dict[str, Any], key: str, rows: int, tokens: int) -> None:
    """Prepend ``tokens`` ones to the 2-D mask ``kwargs[key]`` (a 4-D mask is refused)."""
    mask = kwargs.get(key)
    if mask is None:
        return
    if mask.dim() != 2:
        raise ValueError(
            f"{key} must be a 2-D (batch, tokens) mask for prompt methods, got shape "
            f"{tuple(mask.shape)}; let the model build the 4-D mask"
        )
    ones = torch.ones(rows, tokens, dtype=mask.dtype, device=mask.device)
    kwargs[key] = torch.cat((ones, mask), dim=1)  # (B, tokens + T)


def prepend(kwargs: dict[str, Any], key: str, tokens: int, fill: int) -> None:
    """Prepend ``tokens`` columns of ``fill`` to the (B, T) tensor ``kwargs[key]``."""
    value = kwargs.get(key)
    if value is None:
        return
    pad = torch.full((value.shape[0], tokens), fill, dtype=value.dtype, device=value.device)
    kwargs[key] = torch.cat((pad, value), dim=1)


def shift(kwargs: dict[str, Any], key: str, tokens: int) -> None:
    if kwargs.get(key) is not None:
        kwargs[key] = kwargs[key] + tokens


@contextlib.contextmanager
def injected_kwarg(module: nn.Module, name: str, value: Any) -> Iterator[None]:
    """Add ``name=value`` to every call of ``module`` in the block (a backbone under a head)."""

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if kwargs.get(name) is None:
            kwargs = {**kwargs, name: value}
        return args, kwargs

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def prepend_virtual_tokens(
    model: nn.Module, table: torch.Tensor, tokens: int, kwargs: dict[str, Any]
) -> torch.Tensor:
    """Embed the inputs, then put the first ``tokens`` prompt rows in front of every row.

    Pops ``input_ids`` / ``inputs_embeds`` from ``kwargs`` (callers that still need the ids read
    them first); ``table`` is the encoder's output ``(1, rows, D)``.
    """
    input_ids = kwargs.pop("input_ids", None)
    embeds = kwargs.pop("inputs_embeds", None)
    if embeds is None:
        if input_ids is None:
            raise ValueError("pass input_ids (or inputs_embeds) to a prompt-learning model")
        embeds = word_embeddings(model)(input_ids)  # (B, T, D)
    prompts = table[:, :tokens].to(embeds.dtype).expand(embeds.shape[0], -1, -1)  # (B, N, D)
    return torch.cat((prompts, embeds), dim=1)  # (B, N+T, D)


def embedding_forward(
    model: nn.Module, config: PromptLearningConfig, table: torch.Tensor, kwargs: dict[str, Any]
) -> Any:
    """Prompt tuning / P-tuning: prepend the prompt rows ``table`` (1, rows, D) to the inputs."""
    tokens = config.num_virtual_tokens
    if config.task_type == TaskType.SEQ_2_SEQ_LM:
        return _seq2seq_embedding_forward(model, tokens, table, kwargs)
    rows = batch_size(kwargs)
    if config.task_type == TaskType.SEQ_CLS:
        check_last_token_pooling(model, kwargs.get("attention_mask"))
    given = next((kwargs[k] for k in CACHE_KWARGS if kwargs.get(k) is not None), None)
    extend_mask(kwargs, "attention_mask", rows, tokens)
    if cache_length(given) > 0:
        shift(kwargs, "position_ids", tokens)  # the prompt is already in the cache
        return model(**kwargs)
    embeds = prepend_virtual_tokens(model, table, tokens, kwargs)  # (B, N+T, D)
    positions = kwargs.get("position_ids")
    if positions is not None:
        head = torch.arange(tokens, device=positions.device, dtype=positions.dtype)
        kwargs["position_ids"] = torch.cat(
            (head.expand(positions.shape[0], -1), positions + tokens), dim=1
        )
    prepend(kwargs, "token_type_ids", tokens, 0)
    if config.task_type in (TaskType.CAUSAL_LM, TaskType.TOKEN_CLS):
        prepend(kwargs, "labels", tokens, IGNORE_INDEX)
    elif config.task_type == TaskType.QUESTION_ANS:
        shift(kwargs, "start_positions", tokens)
        shift(kwargs, "end_positions", tokens)
    return model(inputs_embeds=embeds, **kwargs)


def check_last_token_pooling(model: nn.Module, mask: torch.Tensor | None) -> None:
    """Refuse right padding for classifiers that pool the last token (``score`` heads).

    Decoder-only classifiers find the last real token from ``input_ids``; prompt methods hand
    them embeddings instead, so they pool the last position, which right padding fills with a
    pad token. Left padding keeps the last position real.
    """
    if mask is None or not hasattr(model, "score") or mask.dim() != 2:
        return
    if bool((mask[:, -1] == 0).any()):
        raise ValueError(
            f"{type(model).__name__} pools the last position, and with prompt tuning / P-tuning "
            f"it cannot see which tokens are padding: pad on the left "
            f"(tokenizer.padding_side = 'left'), so every row ends with a real token"
        )


def _seq2seq_embedding_forward(
    model: nn.Module, tokens: int, table: torch.Tensor, kwargs: dict[str, Any]
) -> Any:
    encoder_outputs = kwargs.get("encoder_outputs")
    if encoder_outputs is not None:  # the encoder already ran on the prompted input
        mask = kwargs.get("attention_mask")
        encoded = encoder_outputs[0].shape[1]
        if mask is not None and mask.shape[1] == encoded - tokens:
            extend_mask(kwargs, "attention_mask", mask.shape[0], tokens)
        return model(**kwargs)
    embeds = prepend_virtual_tokens(model, table, tokens, kwargs)  # (B, N+T, D)
    extend_mask(kwargs, "attention_mask", embeds.shape[0], tokens)
    return model(inputs_embeds=embeds, **kwargs)


def prefix_forward(
    model: nn.Module, config: PromptLearningConfig, table: torch.Tensor, kwargs: dict[str, Any]
) -> Any:
    """Prefix tuning: hand the model a cache that already holds the prefix keys/values."""
    tokens = config.num_virtual_tokens
    entry, cache_kw = cache_entry(model)
    if model.training and checkpointing(model):
        raise ValueError(
            "prefix tuning cannot train with gradient checkpointing (the recomputed layers "
            "append to the prefix cache twice); call gradient_checkpointing_disable()"
        )
    rows = batch_size(kwargs)
    given = kwargs.pop(cache_kw, None)
    for alias in CACHE_KWARGS:
        given = kwargs.pop(alias, None) if given is None else given
    continuing = cache_length(given) > 0
    cache = given if continuing else build_cache(table, config, rows, float_dtype(model))
    if config.task_type == TaskType.SEQ_2_SEQ_LM:
        extend_mask(kwargs, "decoder_attention_mask", rows, tokens)
    else:
        extend_mask(kwargs, "attention_mask", rows, tokens)
        shift(kwargs, "position_ids", tokens)
    if entry is model:
        output = model(**kwargs, **{cache_kw: cache})
    else:
        with injected_kwarg(entry, cache_kw, cache):
            output = model(**kwargs)
    if not continuing and cache_length(cache) <= tokens:
        raise RuntimeError(
            f"{type(model).__name__} did not read the prefix cache (its layers never updated "
            f"it), so prefix tuning would have no effect; please report this model type"
        )
    return output


def float_dtype(model: nn.Module) -> torch.dtype | None:
    dtype = getattr(model, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None
