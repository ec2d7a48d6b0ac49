"""What every task provides to the trainer, and the task registry.

A task turns rows into what a model trains on and scores the result::

    rows (list[dict]) --check_records--> problems (missing columns), before any model loads
                      --fit------------> label set learnt from the train rows
                      --encode---------> features: lists of token ids, one dict per example
    features          --collate--------> a padded batch of tensors: input_ids, attention_mask, labels
    model + rows      --evaluate-------> metrics (accuracy, ROUGE-L, ...) + one prediction per row
                      --predict--------> predictions for rows without references

``model_kind`` is what :func:`peftkit.models.load_base_model` loads (``causal_lm``, ``seq2seq``,
``seq_cls``); ``task_type`` is the adapter config's :class:`peftkit.TaskType`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import torch

from ..config import TaskType

IGNORE_INDEX = -100  # label value the loss skips (PyTorch's cross-entropy default)

TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make ``cls`` available as ``task.type: <cls.name>``."""
    TASKS[cls.name] = cls
    return cls


@dataclasses.dataclass
class EvalContext:
    """What a task needs to run a model on rows: the unwrapped model, where, and how big."""

    model: torch.nn.Module
    device: torch.device
    batch_size: int
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    progress: bool = False


@dataclasses.dataclass
class EvalResult:
    """Metrics plus per-row predictions (and the references they were scored against)."""

    metrics: dict[str, float]
    predictions: list[str]
    references: list[Any] | None = None
    rows: list[dict[str, Any]] | None = None  # the rows predictions belong to (after grouping)


class Task:
    """Base class; a task module subclasses it and registers it with :func:`register_task`."""

    name: ClassVar[str]
    model_kind: ClassVar[str]
    task_type: ClassVar[TaskType]
    Options: ClassVar[type]
    best_metric: ClassVar[str] = "eval_loss"
    generates: ClassVar[bool] = False  # evaluation runs model.generate

    def __init__(self, options: Any) -> None:
        self.options = options
        self.tokenizer: Any = None

    # --- before the model ----------------------------------------------------------------
    def input_columns(self) -> list[str]:
        """Columns every row needs (test rows included)."""
        return []

    def target_columns(self) -> list[str]:
        """Extra columns rows need to train on and to be scored."""
        return []

    def has_targets(self, records: Sequence[dict]) -> bool:
        """Whether ``records`` carry references (a test file may not)."""
        return bool(records) and all(c in records[0] for c in self.target_columns())

    def check_records(self, records: Sequence[dict], split: str, need_targets: bool) -> list[str]:
        """Problems with ``records`` (missing columns), each naming the split and the fix."""
        if not records:
            return [f"data.{split}: no rows were read"]
        columns = set(records[0])
        needed = self.input_columns() + (self.target_columns() if need_targets else [])
        missing = [c for c in dict.fromkeys(needed) if c not in columns]
        if missing:
            return [
                f"data.{split}: column(s) {missing} used by the task are not in the data "
                f"(columns: {sorted(columns)}); fix the task templates or data.{split}.columns"
            ]
        return []

    def fit(self, train_records: Sequence[dict]) -> None:
        """Learn what the train rows fix (a label set); default: nothing."""

    def model_kwargs(self) -> dict[str, Any]:
        """Extra ``load_base_model`` arguments (``num_labels`` for classifiers)."""
        return {}

    def configure_model(self, model: torch.nn.Module) -> None:
        """Adjust the loaded base model to the task (e.g. label names); default: nothing."""

    def use_model(self, model: torch.nn.Module) -> None:
        """Adjust to the adapted model the run trains or evaluates; default: nothing."""

    def bind(self, tokenizer: Any) -> None:
        """Attach the tokenizer; a missing pad token becomes the EOS token."""
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token is None:
                raise ValueError(
                    "the tokenizer has neither a pad nor an EOS token; give model.tokenizer a "
                    "tokenizer that defines one"
                )
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer

    # --- features --------------------------------------------------------------------------
    def encode(self, records: Sequence[dict], with_targets: bool = True) -> list[dict[str, Any]]:
        raise NotImplementedError

    def collate(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def count_targets(self, batch: dict[str, torch.Tensor]) -> int:
        """How many targets the batch's mean loss averages over (to weight it exactly)."""
        labels = batch["labels"]
        return int((labels != IGNORE_INDEX).sum())

    # --- evaluation ------------------------------------------------------------------------
    def observe(self, batch: dict[str, torch.Tensor], outputs: Any) -> None:
        """Called with each eval batch's forward outputs (classifiers keep the argmax)."""

    def evaluate(self, ctx: EvalContext, records: Sequence[dict], eval_loss: float) -> EvalResult:
        """Metrics on ``records``; ``eval_loss`` is the token-weighted mean loss already computed."""
        raise NotImplementedError

    def predict(self, ctx: EvalContext, records: Sequence[dict]) -> list[str]:
        """Predictions for rows that may lack references (the test file)."""
        raise NotImplementedError

    def baselines(
        self, train_records: Sequence[dict], eval_records: Sequence[dict]
    ) -> dict[str, float]:
        """Scores of trivial predictors to read the model's scores against (majority class)."""
        return {}

    @staticmethod
    def lower_is_better(metric: str) -> bool:
        return metric.endswith(("loss", "ppl", "perplexity"))


def pad(seqs: Sequence[Sequence[int]], value: int, left: bool = False) -> torch.Tensor:
    """Stack ragged id lists into a (B, T) tensor, padding on the right (or left)."""
    width = max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if not s:
            continue
        t = torch.as_tensor(list(s), dtype=torch.long)
        if left:
            out[i, width - len(s) :] = t
        else:
            out[i, : len(s)] = t
    return out


def chunks(n: int, size: int) -> Iterator[range]:
    """``range(0, n)`` in consecutive pieces of ``size``."""
    for start in range(0, n, size):
        yield range(start, min(start + size, n))


def pad_encoder_inputs(
    features: Sequence[dict[str, Any]], pad_id: int, left: bool = False
) -> dict[str, torch.Tensor]:
    """``input_ids`` / ``attention_mask`` (/ ``token_type_ids``) of tokenized features, padded."""
    ids = [f["input_ids"] for f in features]
    batch = {
        "input_ids": pad(ids, pad_id, left=left),  # (B, T)
        "attention_mask": pad([[1] * len(i) for i in ids], 0, left=left),  # (B, T)
    }
    if "token_type_ids" in features[0]:
        batch["token_type_ids"] = pad([f["token_type_ids"] for f in features], 0, left=left)
    return batch


def forward_batches(
    ctx: EvalContext, task: Task, features: Sequence[dict[str, Any]]
) -> Iterator[tuple[range, dict[str, torch.Tensor], Any]]:
    """Run the model over ``features`` in eval mode without gradients, ``ctx.batch_size`` at a
    time; yields ``(feature indices, batch, outputs)`` and restores the model's mode after."""
    model = ctx.model
    was_training = model.training
    model.eval()
    try:
        for piece in chunks(len(features), ctx.batch_size):
            batch = task.collate([features[i] for i in piece])
            batch = {k: v.to(ctx.device) for k, v in batch.items()}
            with torch.no_grad(), ctx.autocast():
                outputs = model(**batch)
            yield piece, batch, outputs
    finally:
        model.train(was_training)


def input_positions(logits: torch.Tensor, width: int) -> torch.Tensor:
    """The outputs of the input's own ``width`` tokens: prompt tuning / P-tuning prepend virtual
    tokens, whose positions come first, (B, N + T, ...) -> (B, T, ...)."""
    return logits[:, logits.shape[1] - width :]


def name_labels(model: torch.nn.Module, labels: Sequence[str] | None) -> None:
    """Give a classification head's model config the label names (``id2label`` / ``label2id``),
    so a saved or merged model reports names, not ``LABEL_0``."""
    model.config.id2label = dict(enumerate(labels or []))
    model.config.label2id = {v: k for k, v in model.config.id2label.items()}
