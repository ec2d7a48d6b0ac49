"""Scoring one split, the same way wherever it happens (each epoch, after training, `peftkit eval`).

::

    rows + features ──evaluate_split──> loss + task metrics   (tasks.run_eval: one pass, no grad)
                                        PEFT-style memory report for the phase
                                        EvalResult: one prediction per row (+ references)
    SplitEvaluation.write_predictions(path) ──> predictions CSV (row columns, prediction,
                                                reference, correct as the task's metric
                                                judges it), written atomically
"""

from __future__ import annotations

import csv
import dataclasses
import io
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..checkpoint import atomic_write_text
from ..tasks import EvalContext, EvalResult, Task, run_eval
from .memory import MemoryTracker, PhaseMemory


@dataclasses.dataclass
class SplitEvaluation:
    """What scoring a split gave: metrics, per-row predictions, the phase's memory, its time."""

    phase: str
    rows: list[dict[str, Any]]
    metrics: dict[str, float]
    result: EvalResult
    memory: PhaseMemory
    time_s: float

    def write_predictions(self, path: Path) -> Path | None:
        """The predictions CSV (None when the task made no per-row predictions)."""
        if not self.result.predictions:
            return None
        rows = self.result.rows if self.result.rows is not None else self.rows
        return write_predictions(
            path, rows, self.result.predictions, self.result.references, self.result.correct
        )


def evaluate_split(
    ctx: EvalContext,
    task: Task,
    rows: Sequence[dict],
    features: Sequence[dict] | None = None,
    phase: str = "eval",
) -> SplitEvaluation:
    """Loss (token-weighted mean), the task's metrics and predictions on ``rows``, with the memory
    the phase used. ``features`` are ``task.encode(rows)`` when already at hand."""
    rows = list(rows)
    features = task.encode(rows) if features is None else features
    start = time.perf_counter()
    with MemoryTracker(phase, ctx.device) as mem:
        metrics, result = run_eval(ctx, task, rows, features)
    return SplitEvaluation(phase, rows, metrics, result, mem.result, time.perf_counter() - start)


def _cell(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ||| ".join(str(v) for v in value)
    return "" if value is None else str(value)


def write_predictions(
    path: Path,
    rows: Sequence[dict],
    predictions: Sequence[str],
    references: Sequence[Any] | None = None,
    correct: Sequence[bool] | None = None,
) -> Path:
    """CSV of each row's columns + ``prediction`` (+ ``reference`` and ``correct``), atomically.
    ``correct`` is the task's own judgement (its metric's normalisation); without it a
    prediction is correct when its text equals the reference (or one of them)."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    extra = ["prediction"] + (["reference", "correct"] if references is not None else [])
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(columns + extra)
    for i, row in enumerate(rows):
        cells = [_cell(row.get(c)) for c in columns] + [predictions[i]]
        if references is not None:
            ref = references[i]
            if correct is not None:
                right = correct[i]
            else:
                right = predictions[i] in ref if isinstance(ref, list) else predictions[i] == ref
            cells += [_cell(ref), str(bool(right)).lower()]
        writer.writerow(cells)
    atomic_write_text(str(path), buf.getvalue())
    return path


__all__ = ["SplitEvaluation", "evaluate_split", "write_predictions"]
