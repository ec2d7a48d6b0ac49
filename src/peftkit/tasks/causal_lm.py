"""Causal language modelling on plain text, scored by perplexity.

Rows (one file, or one per line/paragraph) are tokenised, joined with EOS between documents and
cut into blocks of ``block_size`` tokens; every token is a target::

    [doc 1 ... eos doc 2 ... eos doc 3 ...] -> [block 1][block 2]...[last, shorter]
    labels = input_ids (the model shifts them by one inside its loss)

Perplexity is ``exp(mean NLL)`` over all predicted tokens of the eval split, the token-weighted mean
the trainer computes (not a mean of per-batch means).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .base import IGNORE_INDEX, EvalContext, EvalResult, Task, TaskOptions, pad
from .generation import generate_texts
from .template import Template


@dataclasses.dataclass
class CausalLMOptions(TaskOptions):
    """Attributes:
    text: template of the text of one row (default the ``text`` column the text reader gives).
    block_size: tokens per training example.
    add_eos: put the EOS token after every row.
    """

    text: str = "{text}"
    block_size: int = 128
    add_eos: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 2:
            raise ValueError(f"block_size must be >= 2, got {self.block_size}")

    def input_columns(self) -> list[str]:
        return Template(self.text).fields

    def describe(self, row: Mapping[str, Any]) -> str:
        return Template(self.text).render(row)


class CausalLM(Task):
    """``task.type: causal_lm``: next-token prediction on text."""

    Options = CausalLMOptions
    best_metric = "perplexity"

    def encode(self, records: Sequence[dict], with_targets: bool = True) -> list[dict[str, Any]]:
        texts = [self.options.describe(r) for r in records]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        stream: list[int] = []
        for seq in ids:
            stream.extend(seq)
            if self.options.add_eos and self.tokenizer.eos_token_id is not None:
                stream.append(self.tokenizer.eos_token_id)
        size = self.options.block_size
        blocks = [stream[i : i + size] for i in range(0, len(stream), size)]
        return [{"input_ids": b, "labels": list(b)} for b in blocks if len(b) >= 2]

    def collate(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [f["input_ids"] for f in features]
        return {
            "input_ids": pad(ids, self.tokenizer.pad_token_id),  # (B, T)
            "attention_mask": pad([[1] * len(i) for i in ids], 0),  # (B, T)
            "labels": pad([f["labels"] for f in features], IGNORE_INDEX),  # (B, T)
        }

    def count_targets(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def score(
        self, records: Sequence[dict], predictions: Sequence[Any], eval_loss: float
    ) -> EvalResult:
        ppl = math.exp(eval_loss) if eval_loss < 700 else math.inf
        return EvalResult(metrics={"perplexity": ppl}, predictions=[])

    def predict(
        self, ctx: EvalContext, records: Sequence[dict], max_new_tokens: int | None = None
    ) -> list[str]:
        return []  # a language model has nothing to label

    def generate(
        self, ctx: EvalContext, records: Sequence[dict], max_new_tokens: int | None = None
    ) -> list[str]:
        """Greedy continuations of each row's text (64 new tokens unless told)."""
        ids = self.tokenizer([self.options.describe(r) for r in records])["input_ids"]
        return generate_texts(ctx, self.tokenizer, ids, max_new_tokens=max_new_tokens or 64)
