"""Where a run's numbers and messages go: the console, ``train.log``, ``metrics.jsonl``, TensorBoard.

Every record in ``metrics.jsonl`` is one JSON object with a ``kind`` (``train`` per optimizer step,
``eval`` per evaluation, ``test``) and a global ``step``. On ``--resume`` the records after the
checkpoint's step are dropped (they belong to the interrupted tail the resumed run redoes), so the
file reads as one uninterrupted run; TensorBoard is told the same through ``purge_step``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ..checkpoint import atomic_write_text
from .run_folder import RunFolder


def _clean(value: Any) -> Any:
    """JSON-safe: tensors to floats, inf/nan to strings JSON can hold."""
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (missing file: none)."""
    p = Path(path)
    if not p.exists():
        return []
    with open(p, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def first_loss(records: list[dict[str, Any]]) -> float | None:
    """The run's earliest loss, to tell whether a later one fell: its first evaluation's
    ``eval_loss`` (before training, with ``eval_before_training``), else its first step's."""
    for kind, key in (("eval", "eval_loss"), ("train", "loss")):
        for record in records:
            value = record.get(key)
            if record.get("kind") == kind and isinstance(value, (int, float)):
                return float(value)
    return None


class RunLog:
    """Console + files for one run; only the main process writes."""

    def __init__(
        self,
        output_dir: str | os.PathLike,
        enabled: bool = True,
        tensorboard: bool = True,
        resume_step: int | None = None,
    ) -> None:
        self.dir = Path(output_dir)
        self.enabled = enabled
        run = RunFolder(self.dir)
        self.metrics_path = run.metrics
        self.log_path = run.log
        self._tb = None
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            for p in (self.metrics_path, self.log_path):
                if p.exists():
                    p.unlink()
        else:
            kept = [r for r in read_metrics(self.metrics_path) if r.get("step", 0) <= resume_step]
            text = "".join(json.dumps(r) + "\n" for r in kept)
            atomic_write_text(str(self.metrics_path), text)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(
                log_dir=str(run.tensorboard),
                purge_step=resume_step + 1 if resume_step is not None else None,
            )

    def info(self, message: str = "") -> None:
        """Print a line and append it to ``train.log``."""
        if not self.enabled:
            return
        print(message, flush=True)
        with open(self.log_path, "a", encoding="utf-8") as fh:
            fh.write(message + "\n")

    def record(self, kind: str, step: int, **values: Any) -> dict[str, Any]:
        """Append one record to ``metrics.jsonl`` and its numbers to TensorBoard."""
        entry = {"kind": kind, "step": step, **{k: _clean(v) for k, v in values.items()}}
        if not self.enabled:
            return entry
        with open(self.metrics_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")
        if self._tb is not None:
            for key, value in entry.items():
                if key in ("kind", "step") or isinstance(value, bool):
                    continue
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)
        return entry

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
