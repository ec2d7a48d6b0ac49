"""Turn predictions into the metrics each task reports, plus the majority-class baseline.

Classification metrics compare label strings exactly; the generation-scored tasks first bring
predictions and references to the label they spell (:mod:`peftkit.tasks.labels`: whitespace,
special-token text, optionally case), so what is compared here is already the label as the user
means it. A prediction that is no label counts as wrong and is reported as ``invalid_rate``.
Generation metrics take one reference or a list of alternatives per prediction.

:func:`broken_result_line` is the second look a result such as "accuracy 0 with a falling loss"
deserves, written as one line for the run log.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
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


# Below this mean loss per target token (ln 2) the references' tokens have, on (geometric)
# average, more than half the probability: greedy decoding should write them.
LEARNT_LOSS = math.log(2.0)


def broken_result_line(
    metrics: Mapping[str, float],
    predictions: Sequence[str],
    labels: Sequence[str],
    first_loss: float | None,
) -> str | None:
    """A warning when a classification result looks broken rather than bad: the eval loss fell
    below the run's first loss and below ``LEARNT_LOSS`` (the model learnt the targets), yet
    accuracy is 0 and every prediction is outside the label set. Names the likely cause and
    shows the three most frequent predictions beside the label set; None when the result does
    not look so (a model still learning the format writes no labels and says nothing)."""
    loss = metrics.get("eval_loss")
    if (
        not predictions
        or metrics.get("accuracy") != 0.0
        or metrics.get("invalid_rate") != 1.0
        or loss is None
        or first_loss is None
        or not loss < min(first_loss, LEARNT_LOSS)
    ):
        return None
    top = ", ".join(f"{p!r} x{n}" for p, n in Counter(predictions).most_common(3))
    return (
        f"warning: this result looks broken, not bad: eval loss fell ({first_loss:.4f} -> "
        f"{loss:.4f}: the targets are learnt) but accuracy is 0 and all {len(predictions)} "
        "predictions are outside the label set; likely cause: the labels are spelt differently "
        "from what the model writes (check task.target / task.labels / task.label_map, or "
        "task.label_match: casefold; task.decode: rank always answers a label). Most frequent "
        f"predictions: {top}; labels: {list(labels)}"
    )


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
