"""Sequence classification: text (or a text pair) -> one of N labels, with a trained head.

The label column's distinct values, sorted (or ``task.labels``), become class ids 0..N-1 and the
model's ``id2label``; the classification head (``classifier`` / ``score``) trains in full beside the
adapter and is saved with it (HF PEFT's ``modules_to_save``). Scored by accuracy and macro-F1 from
the argmax of the logits, next to the majority-class baseline.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..config import Adapts
from .base import (
    TaskOptions,
    TaskSpec,
    pad_encoder_inputs,
)
from .classifier import LabelClassifier, learn_label_set, unknown_label_problems
from .template import Template


@dataclasses.dataclass
class SeqClsOptions(TaskOptions):
    """Attributes:
    text: template of the (first) text, e.g. ``"{sentence}"``.
    text_pair: template of a second text (NLI-style pairs), or null.
    label: the label column.
    labels: the label values in class-id order (default: sorted distinct train values).
    max_length: token limit (longer texts are truncated).
    """

    head_per_label = True

    text: str = "{text}"
    text_pair: str | None = None
    label: str = "label"
    labels: list[str] | None = None
    max_length: int = 128

    def input_columns(self) -> list[str]:
        pair = Template(self.text_pair).fields if self.text_pair else []
        return Template(self.text).fields + pair

    def target_columns(self) -> list[str]:
        return [self.label]

    def label_of(self, row: Mapping[str, Any]) -> str:
        """The row's label without stray whitespace (" positive" from a CSV is "positive")."""
        return str(row[self.label]).strip()

    def learn_labels(self, train_records: Sequence[dict]) -> list[str]:
        return learn_label_set(self, train_records)

    def check_records(
        self,
        records: Sequence[dict],
        split: str,
        need_targets: bool,
        labels: Sequence[str] | None = None,
    ) -> list[str]:
        problems = super().check_records(records, split, need_targets, labels)
        if problems or not need_targets:
            return problems
        return unknown_label_problems(self, records, split, labels)


class SequenceClassification(LabelClassifier):
    """``task.type: seq_cls``."""

    Options = SeqClsOptions

    def __init__(self, spec: TaskSpec, tokenizer: Any, model: torch.nn.Module) -> None:
        super().__init__(spec, tokenizer, model)
        self.text = Template(self.options.text)
        self.pair = Template(self.options.text_pair) if self.options.text_pair else None
        self.pad_left = pads_left(model)

    def encode(self, records: Sequence[dict], with_targets: bool = True) -> list[dict[str, Any]]:
        first = [self.text.render(r) for r in records]
        kwargs: dict[str, Any] = {"truncation": True, "max_length": self.options.max_length}
        if self.pair is not None:
            enc = self.tokenizer(first, [self.pair.render(r) for r in records], **kwargs)
        else:
            enc = self.tokenizer(first, **kwargs)
        features = []
        index = {label: i for i, label in enumerate(self.labels or [])}
        for i, ids in enumerate(enc["input_ids"]):
            feature: dict[str, Any] = {"input_ids": list(ids)}
            if "token_type_ids" in enc:
                feature["token_type_ids"] = list(enc["token_type_ids"][i])
            if with_targets:
                feature["labels"] = index[self.options.label_of(records[i])]
            features.append(feature)
        return features

    def collate(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = pad_encoder_inputs(features, self.tokenizer.pad_token_id, left=self.pad_left)
        if "labels" in features[0]:
            batch["labels"] = torch.tensor([f["labels"] for f in features])  # (B,)
        return batch


def pads_left(model: torch.nn.Module) -> bool:
    """Pad on the left where a prompt method meets a last-token classifier.

    Decoder-only classifiers (a ``score`` head) pool the last real token, which they find from
    ``input_ids``; prompt tuning and P-tuning feed embeddings instead, so the head pools the last
    position, and only left padding keeps that position a real token. Everything else stays
    right-padded (positions count from the first real token).
    """
    config = getattr(model, "active_peft_config", None)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(
        config is not None and config.adapts is Adapts.INPUT_EMBEDDINGS and hasattr(base, "score")
    )
