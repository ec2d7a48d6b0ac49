"""Conditional generation on an encoder-decoder (T5, BART): source text -> target text.

The encoder reads the rendered prompt; the decoder learns the target (+ EOS), its inputs being
the labels shifted right by the model itself::

    encoder  input_ids  [ summarize: ... eos ]
    decoder  labels     [ target tokens eos ]   (padding -> -100)

Scored by ROUGE-L / BLEU, or by label when ``labels`` are given (Financial PhraseBank as
sentence -> "negative" / "neutral" / "positive", PEFT's seq2seq example): generated and matched,
or (``decode: rank``) each label scored as the decoder's target and the most likely one taken.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from .base import IGNORE_INDEX, pad
from .prompted import PromptedOptions, PromptedTask


@dataclasses.dataclass
class Seq2SeqOptions(PromptedOptions):
    """See :class:`PromptedOptions`; ``max_length`` limits the source, ``max_target_length`` the target."""

    target: str = "{target}"
    max_target_length: int = 128


class Seq2Seq(PromptedTask):
    """``task.type: seq2seq``."""

    Options = Seq2SeqOptions
    encoder_decoder = True

    def encode_prompts(self, prompts: Sequence[str], new_tokens: int = 0) -> list[list[int]]:
        enc = self.tokenizer(list(prompts), truncation=True, max_length=self.options.max_length)
        return [list(i) for i in enc["input_ids"]]

    def target_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """The decoder's targets as training learns them (EOS included)."""
        return self._targets(texts)

    def _targets(self, texts: Sequence[str]) -> list[list[int]]:
        tok = self.tokenizer
        limit = self.options.max_target_length
        ids = tok(text_target=list(texts), truncation=True, max_length=limit)["input_ids"]
        eos = tok.eos_token_id
        out = []
        for seq in ids:
            seq = list(seq)
            if eos is not None and (not seq or seq[-1] != eos):
                seq = [*seq[: limit - 1], eos]  # tokenizers without a post-processor add no EOS
            out.append(seq)
        return out

    def encode(self, records: Sequence[dict], with_targets: bool = True) -> list[dict[str, Any]]:
        sources = self.encode_prompts([self.options.prompt_of(r) for r in records])
        if not with_targets:
            return [{"input_ids": s} for s in sources]
        targets = self._targets([self.options.target_of(r) for r in records])
        return [{"input_ids": s, "labels": t} for s, t in zip(sources, targets)]

    def collate(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [f["input_ids"] for f in features]
        batch = {
            "input_ids": pad(ids, self.tokenizer.pad_token_id),  # (B, S)
            "attention_mask": pad([[1] * len(i) for i in ids], 0),  # (B, S)
        }
        if "labels" in features[0]:
            batch["labels"] = pad([f["labels"] for f in features], IGNORE_INDEX)  # (B, T)
        return batch
