"""Turn the prefix table into a transformers key/value cache, in HF PEFT's layout.

::

    table (1, P, L*2*D) --view--> (1, P, 2L, H, D/H) --permute--> (2L, 1, H, P, D/H)
    decoder-only / encoder:  layer l reads rows (2l, 2l+1) as (key, value)
    encoder-decoder:         decoder layer l reads rows (4l mod 2L, 4l+1 mod 2L)

The encoder-decoder row choice reproduces what PEFT does (it duplicates the table, regroups it
in fours and keeps only the self-attention half), so adapters trained by either library give
the same outputs. Rows are then expanded to the batch (no copy) and wrapped in a
``DynamicCache`` (``EncoderDecoderCache`` with an empty cross-attention cache for seq2seq).
The attention layers append the real tokens' keys/values after the prefix, so the cache is
built fresh for every forward call and every ``generate`` call.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, EncoderDecoderCache

from .config import PrefixTuningConfig


def prefix_key_values(
    table: torch.Tensor, config: PrefixTuningConfig
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer ``(key, value)``, each ``(1, heads, P, head_dim)``, from the flat table."""
    layers, heads, tokens = config.num_layers, config.num_attention_heads, config.num_virtual_tokens
    head_dim = config.token_dim // heads
    kv = table.reshape(1, tokens, 2 * layers, heads, head_dim)  # (1, P, 2L, H, hd)
    kv = kv.permute(2, 0, 3, 1, 4)  # (2L, 1, H, P, hd)
    if config.num_transformer_submodules == 2:
        rows = [(4 * layer) % (2 * layers) for layer in range(layers)]
    else:
        rows = [2 * layer for layer in range(layers)]
    return [(kv[r], kv[r + 1]) for r in rows]


def build_cache(
    table: torch.Tensor,
    config: PrefixTuningConfig,
    batch_size: int,
    dtype: torch.dtype | None = None,
) -> DynamicCache | EncoderDecoderCache:
    """A fresh cache holding the prefix for ``batch_size`` rows."""
    if dtype is not None:
        table = table.to(dtype)
    pairs = [
        (k.expand(batch_size, -1, -1, -1), v.expand(batch_size, -1, -1, -1))
        for k, v in prefix_key_values(table, config)
    ]  # each (B, H, P, hd)
    self_attention = DynamicCache(pairs)
    if config.num_transformer_submodules == 2:
        return EncoderDecoderCache(self_attention, DynamicCache())
    return self_attention


def cache_length(cache: object) -> int:
    """Tokens already in a cache (0 for None / empty)."""
    if cache is None:
        return 0
    get = getattr(cache, "get_seq_length", None)
    return int(get()) if callable(get) else 0
