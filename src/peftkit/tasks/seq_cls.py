"""Sequence classification: text (or a text pair) -> one of N labels, with a trained head.

The label column's distinct values, sorted (or ``task.labels``), become class ids 0..N-1 and the
model's ``id2label``; the classification head (``classifier`` / ``score``) trains in full beside the
adapter and is saved with it (HF PEFT's ``modules_to_save``). Scored by accuracy and macro-F1 from
the argmax of the logits, next to the majority-class baseline.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from ..config import PeftType, TaskType
from .base import (
    EvalContext,
    EvalResult,
    Task,
    forward_batches,
    name_labels,
    pad_encoder_inputs,
    register_task,
)
from .scoring import majority_baseline, score
from .template import Template


@dataclasses.dataclass
class SeqClsOptions:
    """Attributes:
    text: template of the (first) text, e.g. ``"{sentence}"``.
    text_pair: template of a second text (NLI-style pairs), or null.
    label: the label column.
    labels: the label values in class-id order (default: sorted distinct train values).
    max_length: token limit (longer texts are truncated).
    """

    text: str = "{text}"
    text_pair: str | None = None
    label: str = "label"
    labels: list[str] | None = None
    max_length: int = 128


@register_task
class SequenceClassification(Task):
    """``task.type: seq_cls``."""

    name = "seq_cls"
    model_kind = "seq_cls"
    task_type = TaskType.SEQ_CLS
    Options = SeqClsOptions
    best_metric = "accuracy"

    def __init__(self, options: SeqClsOptions) -> None:
        super().__init__(options)
        self.text = Template(options.text)
        self.pair = Template(options.text_pair) if options.text_pair else None
        self.labels: list[str] | None = [str(x) for x in options.labels] if options.labels else None
        self._eval_preds: list[int] = []
        self.pad_left = False  # set by use_model

    def input_columns(self) -> list[str]:
        return self.text.fields + (self.pair.fields if self.pair else [])

    def target_columns(self) -> list[str]:
        return [self.options.label]

    def label_of(self, row: dict) -> str:
        return str(row[self.options.label])

    def fit(self, train_records: Sequence[dict]) -> None:
        if self.labels is None:
            self.labels = sorted({self.label_of(r) for r in train_records})
        if len(self.labels) < 2:
            raise ValueError(
                f"task seq_cls: found {len(self.labels)} label value(s) {self.labels} in column "
                f"{self.options.label!r}; a classifier needs at least 2"
            )

    def check_records(self, records: Sequence[dict], split: str, need_targets: bool) -> list[str]:
        problems = super().check_records(records, split, need_targets)
        if problems or not need_targets or self.labels is None:
            return problems
        unknown = sorted({self.label_of(r) for r in records} - set(self.labels))
        if unknown:
            problems.append(
                f"data.{split}: label value(s) {unknown[:5]} are not in task.labels {self.labels}"
            )
        return problems

    def model_kwargs(self) -> dict[str, Any]:
        return {"num_labels": len(self.labels or [])}

    def configure_model(self, model: torch.nn.Module) -> None:
        name_labels(model, self.labels)
        config = model.config
        if getattr(config, "pad_token_id", None) is None and self.tokenizer is not None:
            config.pad_token_id = self.tokenizer.pad_token_id  # decoder models find the last token

    def use_model(self, model: torch.nn.Module) -> None:
        """Pad on the left where a prompt method meets a last-token classifier.

        Decoder-only classifiers (a ``score`` head) pool the last real token, which they find
        from ``input_ids``; prompt tuning and P-tuning feed embeddings instead, so the head pools
        the last position, and only left padding keeps that position a real token. Everything
        else stays right-padded (positions count from the first real token).
        """
        config = getattr(model, "active_peft_config", None)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.pad_left = bool(
            config is not None
            and config.is_prompt_learning
            and config.peft_type != PeftType.PREFIX_TUNING
            and hasattr(base, "score")
        )

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
                feature["labels"] = index[self.label_of(records[i])]
            features.append(feature)
        return features

    def collate(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = pad_encoder_inputs(features, self.tokenizer.pad_token_id, left=self.pad_left)
        if "labels" in features[0]:
            batch["labels"] = torch.tensor([f["labels"] for f in features])  # (B,)
        return batch

    def count_targets(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["labels"].shape[0])

    def observe(self, batch: dict[str, torch.Tensor], outputs: Any) -> None:
        self._eval_preds.extend(outputs.logits.argmax(-1).tolist())  # (B, C) -> (B,)

    def evaluate(self, ctx: EvalContext, records: Sequence[dict], eval_loss: float) -> EvalResult:
        ids = self._eval_preds if len(self._eval_preds) == len(records) else None
        self._eval_preds = []
        preds = [self.labels[i] for i in ids] if ids is not None else self.predict(ctx, records)
        refs = [self.label_of(r) for r in records]
        metrics = score(["accuracy", "macro_f1"], preds, refs, self.labels)
        metrics.pop("invalid_rate", None)
        return EvalResult(metrics=metrics, predictions=preds, references=refs, rows=list(records))

    def predict(self, ctx: EvalContext, records: Sequence[dict]) -> list[str]:
        features = self.encode(records, with_targets=False)
        preds: list[str] = []
        for _, _, outputs in forward_batches(ctx, self, features):
            preds.extend(self.labels[i] for i in outputs.logits.argmax(-1).tolist())  # (B, C)
        return preds

    def baselines(
        self, train_records: Sequence[dict], eval_records: Sequence[dict]
    ) -> dict[str, Any]:
        return majority_baseline(
            [self.label_of(r) for r in train_records],
            [self.label_of(r) for r in eval_records],
            self.labels,
        )
