"""What several benchmarks share: the SmolLM2-135M shape with random weights, and a median timer.

The scripts run as ``python benchmarks/<name>.py``, so this folder is on ``sys.path`` and they
import this module as ``common``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def smollm2_shape(layers: int = 30, **config: Any) -> torch.nn.Module:
    """A LlamaForCausalLM of SmolLM2-135M's shape (30 layers, hidden 576, GQA 9/3 heads, tied
    embeddings) with random weights from seed 0; ``layers`` and ``config`` fields override."""
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    )
    fields.update(config)
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**fields))


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
