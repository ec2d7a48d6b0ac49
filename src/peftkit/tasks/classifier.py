"""What every task with a trained classification head shares (``seq_cls``, ``image_cls``).

::

    batch ──model──> logits (B, C) ──argmax──> label names ──score──> accuracy, macro-F1
                                                                      (+ what a subclass adds)

A subclass supplies the options (``label_of``), the label set and its own encode/collate; the
head's targets are one class id per example, so a batch's loss averages over its rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .base import EvalResult, Task, at_least_two
from .scoring import majority_baseline, score


def learn_label_set(
    options: Any, train_records: Sequence[dict], sort_key: Callable[[str], Any] | None = None
) -> list[str]:
    """``task.labels`` when given, else the distinct train labels (sorted); at least two."""
    labels = [str(x).strip() for x in options.labels] if options.labels else None
    labels = labels or sorted({options.label_of(r) for r in train_records}, key=sort_key)
    return at_least_two(labels, f"label value(s) in column {options.label!r}:")


def unknown_label_problems(
    options: Any, records: Sequence[dict], split: str, labels: Sequence[str] | None
) -> list[str]:
    """A problem naming the labels of ``records`` outside the label set (none without one)."""
    labels = labels or ([str(x).strip() for x in options.labels] if options.labels else None)
    if labels is None:
        return []
    unknown = sorted({options.label_of(r) for r in records} - set(labels))
    if not unknown:
        return []
    return [f"data.{split}: label value(s) {unknown[:5]} are not in task.labels {list(labels)}"]


class LabelClassifier(Task):
    """One label per example, read off a classification head's logits."""

    best_metric = "accuracy"

    def count_targets(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["labels"].shape[0])

    def decode(
        self, features: Sequence[dict[str, Any]], batch: dict[str, torch.Tensor], outputs: Any
    ) -> list[str]:
        return [self.labels[i] for i in outputs.logits.argmax(-1).tolist()]  # (B, C) -> (B,)

    def label_metrics(self, preds: list[str], refs: list[str]) -> dict[str, float]:
        """Accuracy and macro-F1 over the label set (a subclass may add per-class scores)."""
        metrics = score(["accuracy", "macro_f1"], preds, refs, self.labels)
        metrics.pop("invalid_rate", None)  # a head's argmax is always a label
        return metrics

    def printable_rows(self, records: Sequence[dict]) -> list[dict[str, Any]]:
        """The rows as the predictions CSV shows them."""
        return list(records)

    def score(
        self, records: Sequence[dict], predictions: Sequence[Any], eval_loss: float
    ) -> EvalResult:
        preds = list(predictions)
        refs = [self.options.label_of(r) for r in records]
        return EvalResult(
            metrics=self.label_metrics(preds, refs),
            predictions=preds,
            references=refs,
            rows=self.printable_rows(records),
        )

    def baselines(
        self, train_records: Sequence[dict], eval_records: Sequence[dict]
    ) -> dict[str, Any]:
        return majority_baseline(
            [self.options.label_of(r) for r in train_records],
            [self.options.label_of(r) for r in eval_records],
            self.labels,
        )
