"""Classification as generation on a causal LM (PEFT's RAFT twitter_complaints recipe).

One example is the prompt followed by the label text and EOS; only the label tokens are learnt::

    input_ids  [ Tweet text : ... Label : ][ no complaint ][eos]
    labels     [ -100  ...          -100  ][ no complaint ][eos]

At evaluation (``task.decode``) the model either generates greedily after the prompt until EOS
and the text is matched to a label, or ranks the labels by their log-likelihood after the prompt
(:mod:`peftkit.tasks.rank`); scored by label (accuracy, macro-F1, invalid rate), beside the
majority-class baseline. Labels compare as the user means them (:mod:`peftkit.tasks.labels`):
with ``target: " {label}"`` the model learns " complaint" and reports say "complaint".
Too-long prompts lose tokens from the left, so the cue at their end survives.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from .base import IGNORE_INDEX, pad
from .prompted import PromptedOptions, PromptedTask


def truncate_left(ids: list[int], budget: int, bos: int | None) -> list[int]:
    """Keep the last ``budget`` ids (and a leading BOS, when the sequence starts with one)."""
    budget = max(budget, 1)
    if len(ids) <= budget:
        return ids
    if bos is not None and ids and ids[0] == bos and budget > 1:
        return [ids[0], *ids[len(ids) - budget + 1 :]]
    return ids[len(ids) - budget :]


class PromptedCausalLM(PromptedTask):
    """Prompt + target on a decoder-only model; its options pick the scoring."""

    def encode_prompts(self, prompts: Sequence[str], new_tokens: int) -> list[list[int]]:
        ids = self.tokenizer(list(prompts))["input_ids"]
        budget = self.options.max_length - new_tokens
        return [truncate_left(list(i), budget, self.tokenizer.bos_token_id) for i in ids]

    def target_ids(self, targets: Sequence[str]) -> list[list[int]]:
        """The target's tokens (no special tokens added), cut to leave room for a prompt token,
        then EOS: what training learns and rank decoding scores."""
        ids = self.tokenizer(list(targets), add_special_tokens=False)["input_ids"]
        limit = self.options.max_length
        return [[*t[: limit - 2], self.tokenizer.eos_token_id] for t in ids]

    def encode(self, records: Sequence[dict], with_targets: bool = True) -> list[dict[str, Any]]:
        tok = self.tokenizer
        prompts = tok([self.options.prompt_of(r) for r in records])["input_ids"]
        if not with_targets:
            return [{"input_ids": list(p)} for p in prompts]
        targets = self.target_ids([self.options.target_of(r) for r in records])
        features = []
        limit = self.options.max_length
        for p, t in zip(prompts, targets):
            p = truncate_left(list(p), limit - len(t), tok.bos_token_id)
            features.append({"input_ids": p + t, "labels": [IGNORE_INDEX] * len(p) + t})
        return features

    def collate(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [f["input_ids"] for f in features]
        batch = {
            "input_ids": pad(ids, self.tokenizer.pad_token_id),  # (B, T)
            "attention_mask": pad([[1] * len(i) for i in ids], 0),  # (B, T)
        }
        if "labels" in features[0]:
            batch["labels"] = pad([f["labels"] for f in features], IGNORE_INDEX)  # (B, T)
        return batch

    def count_targets(self, batch: dict[str, torch.Tensor]) -> int:
        # The causal loss predicts token t+1 from tokens <= t: the first label is never scored.
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


@dataclasses.dataclass
class CausalLMClassificationOptions(PromptedOptions):
    """See :class:`PromptedOptions`; scoring is by label (``label_match``, ``decode``)."""

    classification = True

    target: str = "{label}"


class CausalLMClassification(PromptedCausalLM):
    """``task.type: causal_lm_cls``: generate the label text after a prompt."""

    Options = CausalLMClassificationOptions
