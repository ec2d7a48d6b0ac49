"""Turn predictions into the metrics each task reports, plus the majority-class baseline.

Classification metrics compare label strings exactly (for generation, the decoded text with
surrounding whitespace stripped, as in PEFT's RAFT example); a generated string that is no label
counts as wrong and is reported as ``invalid_rate``. Generation metrics take one reference or a
list of alternatives per prediction.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from .. import metrics as M

CLASSIFICATION_METRICS = ("accuracy", "macro_f1")
GENERATION_METRICS = ("rouge_l", "bleu")
KNOWN_METRICS = CLASSIFICATION_METRICS + GENERATION_METRICS


def check_metric_names(names: Sequence[str]) -> None:
    unknown = [n for n in names if n not in KNOWN_METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {list(KNOWN_METRICS)}")


def score(
    names: Sequence[str],
    preds: Sequence[str],
    refs: Sequence[Any],
    labels: Sequence[str] | None = None,
) -> dict[str, float]:
    """Compute each metric in ``names``; ``labels`` (the class set) also yields ``invalid_rate``."""
    out: dict[str, float] = {}
    single = [r if isinstance(r, str) else r[0] for r in refs]
    for name in names:
        if name == "accuracy":
            out[name] = M.accuracy(preds, single)
        elif name == "macro_f1":
            out[name] = M.macro_f1(preds, single, labels=labels)
        elif name == "rouge_l":
            out[name] = M.rouge_l(preds, refs)
        elif name == "bleu":
            out[name] = M.bleu(preds, refs)
        else:
            raise ValueError(f"unknown metric {name!r}; choose from {list(KNOWN_METRICS)}")
    if labels is not None and preds:
        known = set(labels)
        out["invalid_rate"] = sum(p not in known for p in preds) / len(preds)
    return out


def majority_baseline(
    train_labels: Sequence[str], eval_labels: Sequence[str], labels: Sequence[str] | None = None
) -> dict[str, float]:
    """Accuracy and macro-F1 of always predicting the most frequent train label."""
    if not train_labels or not eval_labels:
        return {}
    majority = Counter(train_labels).most_common(1)[0][0]
    preds = [majority] * len(eval_labels)
    return {
        "majority_label": majority,
        "majority_accuracy": M.accuracy(preds, list(eval_labels)),
        "majority_macro_f1": M.macro_f1(preds, list(eval_labels), labels=labels),
    }
