"""What every task provides, in two steps: a model-free spec, then a task bound to its model.

::

    task block (YAML) ──tasks.task_spec──> TaskSpec: the table row + checked options, no model
      rows ──spec.check_records──> problems (missing columns, unknown labels), before any load
      train rows ──spec.fit──> TaskSpec with its label set    (or spec.restore(task_state.json))
    spec.model_kwargs() ──> models.load_base_model(name, task=spec.name, num_labels=, id2label=)
    spec.build(tokenizer, model) ──> Task, ready: nothing more to call, no state between calls
      rows ──encode──> features ──collate──> batch (input_ids, attention_mask, labels, ...)
      run_eval(ctx, task, rows, features):
          forward_batches ──> per batch: loss, task.decode(features, batch, outputs) -> predictions
          (a generating task instead generates: task.predict(ctx, task.scored_rows(rows)))
          task.score(rows, predictions, eval_loss) ──> EvalResult (metrics, predictions, refs)
      task.predict(ctx, rows) ──> predictions for rows without references (the test file)
      spec.input_row / spec.describe / task.generate ──> what `peftkit generate` reads and prints

The model given to ``build`` is the one the task runs with: the adapted model (prompt methods
change how a decoder classifier must be padded), or the base model when only features are needed
(they depend on the tokenizer alone). Metrics come from predictions the batch runner hands over,
never from state kept between calls.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import torch

from ..config import TaskType
from ..task_types import TaskKind

IGNORE_INDEX = -100  # label value the loss skips (PyTorch's cross-entropy default)


@dataclasses.dataclass
class TaskOptions:
    """Base of each task's ``task:`` block; the model-free half of a task lives here: which
    columns rows need, what the train rows teach (a label set), how a ``generate`` input reads."""

    head_per_label: ClassVar[bool] = False  # the model's head has one output per label
    # option fields naming local files or folders: `load_config` reports the missing ones
    local_paths: ClassVar[tuple[str, ...]] = ()

    def input_columns(self) -> list[str]:
        """Columns every row needs (test rows included)."""
        return []

    def target_columns(self) -> list[str]:
        """Extra columns rows need to train on and to be scored."""
        return []

    def check_records(
        self,
        records: Sequence[dict],
        split: str,
        need_targets: bool,
        labels: Sequence[str] | None = None,
    ) -> list[str]:
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

    def learn_labels(self, train_records: Sequence[dict]) -> list[str] | None:
        """The label set (given, or learnt from the train rows); None for tasks without one."""
        return None

    def learn_label_texts(
        self, train_records: Sequence[dict], labels: Sequence[str]
    ) -> list[str] | None:
        """Per label, the text the model learns to write for it, where that differs from how
        the label is shown (a template's spacing); None for tasks that train on label ids."""
        return None

    def input_row(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """A ``generate`` input as the task's row: a ``--prompt`` (``{"text": ...}``) fills the
        one input column; file rows must carry the input columns. ValueError otherwise."""
        fields = self.input_columns()
        if all(f in row for f in fields):
            return dict(row)
        if len(fields) == 1 and "text" in row:
            return {fields[0]: row["text"]}
        raise ValueError(f"the model reads columns {fields}; give an --input file with them")

    def describe(self, row: Mapping[str, Any]) -> str:
        """What the model was given, as one line for ``generate``'s output file."""
        cells = (row[c] for c in self.input_columns())
        return " | ".join(" ".join(c) if isinstance(c, list) else str(c) for c in cells)


def at_least_two(labels: list[str], what: str) -> list[str]:
    """``labels`` unchanged, or ValueError when fewer than two (no classifier can learn that)."""
    if len(labels) < 2:
        raise ValueError(f"found {len(labels)} {what} {labels}; a classifier needs at least 2")
    return labels


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """A task before any model: its table row, its class, its options, its label set (once
    known). ``tasks.task_spec`` builds one from a config's ``task:`` block."""

    kind: TaskKind
    task: type[Task]
    options: TaskOptions
    labels: tuple[str, ...] | None = None
    label_texts: tuple[str, ...] | None = None  # per label, the target text it is trained as

    @property
    def name(self) -> str:
        return self.kind.name

    @property
    def task_type(self) -> TaskType | None:
        return self.kind.task_type

    @property
    def generates(self) -> bool:
        """Whether evaluation generates text (scored against the references)."""
        return self.task.generates

    def input_columns(self) -> list[str]:
        return self.options.input_columns()

    def target_columns(self) -> list[str]:
        return self.options.target_columns()

    def has_targets(self, records: Sequence[dict]) -> bool:
        """Whether ``records`` carry references (a test file may not)."""
        return bool(records) and all(c in records[0] for c in self.target_columns())

    def check_records(self, records: Sequence[dict], split: str, need_targets: bool) -> list[str]:
        """Problems with ``records``: missing columns, then targets outside the label set."""
        return self.options.check_records(records, split, need_targets, self.labels)

    def fit(self, train_records: Sequence[dict]) -> TaskSpec:
        """This spec with the label set the train rows fix (ValueError: fewer than 2 labels)."""
        labels = self.options.learn_labels(train_records)
        texts = self.options.learn_label_texts(train_records, labels) if labels else None
        return dataclasses.replace(
            self,
            labels=tuple(labels) if labels is not None else None,
            label_texts=tuple(texts) if texts is not None else None,
        )

    def restore(self, state: Mapping[str, Any]) -> TaskSpec:
        """This spec with the label set a run saved (``task_state.json``)."""
        labels = state.get("labels")
        texts = state.get("label_texts")
        return dataclasses.replace(
            self,
            labels=tuple(labels) if labels else None,
            label_texts=tuple(texts) if labels and texts else None,
        )

    def state(self) -> dict[str, Any]:
        """What a run folder keeps to rebuild the task without its data (``task_state.json``)."""
        state: dict[str, Any] = {"labels": list(self.labels) if self.labels is not None else None}
        if self.label_texts is not None:
            state["label_texts"] = list(self.label_texts)
        return state

    @property
    def needs_labels(self) -> bool:
        """The model's head is sized by a label set this spec does not know yet."""
        return self.options.head_per_label and not self.labels

    def model_kwargs(self) -> dict[str, Any]:
        """Extra ``load_base_model`` arguments: a classifier head's size and label names."""
        if not self.options.head_per_label or not self.labels:
            return {}
        id2label = dict(enumerate(self.labels))
        return {
            "num_labels": len(self.labels),
            "id2label": id2label,
            "label2id": {v: k for k, v in id2label.items()},
        }

    def input_row(self, row: Mapping[str, Any]) -> dict[str, Any]:
        return self.options.input_row(row)

    def describe(self, row: Mapping[str, Any]) -> str:
        return self.options.describe(row)

    def build(self, tokenizer: Any, model: torch.nn.Module) -> Task:
        """The task, ready to use with ``tokenizer`` and ``model`` (see the module docstring)."""
        return self.task(self, tokenizer, model)


@dataclasses.dataclass
class EvalContext:
    """What a task needs to run a model on rows: the unwrapped model, where, and how big.

    With several processes (``world`` > 1) each runs every ``world``-th batch from its ``rank``
    and the results are gathered back in batch order, so the metrics are those of one process
    running every batch (the same batches, summed in the same order)::

        batches  0 1 2 3 4         rank 0: 0 2 4      rank 1: 1 3 (0)   (0) = padding, dropped
        gather ─> 0 1 2 3 4 ─> loss, predictions, metrics

    ``lockstep``: the parameters are sharded over the processes (ZeRO-3, FSDP2), so every
    forward is a collective that all processes must run together: a process with fewer batches
    runs a padding batch (batch 0 again, its result dropped), and generation passes
    ``synced_gpus=True`` (a process whose rows are done keeps stepping until all are).
    """

    model: torch.nn.Module
    device: torch.device
    batch_size: int
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    progress: bool = False
    lockstep: bool = False
    rank: int = 0
    world: int = 1

    def shard(self, batches: int) -> list[int | None]:
        """The batch indices (of ``batches``) this process runs; None marks a padding batch."""
        mine: list[int | None] = list(range(self.rank, batches, self.world))
        if self.lockstep and batches:
            mine += [None] * (math.ceil(batches / self.world) - len(mine))
        return mine

    def gather(self, results: list[tuple[int, Any]]) -> list[Any]:
        """Every process's ``(batch index, result)`` pairs, as results in batch order. Every
        process must call it (a collective when ``world`` > 1)."""
        if self.world > 1:
            parts: list[Any] = [None] * self.world
            torch.distributed.all_gather_object(parts, results)
            results = [pair for part in parts for pair in part]
        return [result for _, result in sorted(results, key=lambda pair: pair[0])]


@dataclasses.dataclass
class EvalResult:
    """Metrics plus per-row predictions (and the references they were scored against)."""

    metrics: dict[str, float]
    predictions: list[str]
    references: list[Any] | None = None
    rows: list[dict[str, Any]] | None = None  # the rows predictions belong to (after grouping)
    # per row, whether the prediction is right as the task's metric judges it (None: equal text)
    correct: list[bool] | None = None


def ready_tokenizer(tokenizer: Any) -> Any:
    """``tokenizer`` with a pad token (the EOS token when it has none)."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                "the tokenizer has neither a pad nor an EOS token; give model.tokenizer a "
                "tokenizer that defines one"
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class Task:
    """Base class of the tasks: built by :meth:`TaskSpec.build`, ready to use from then on."""

    Options: ClassVar[type[TaskOptions]]
    best_metric: ClassVar[str] = "eval_loss"
    generates: ClassVar[bool] = False  # evaluation generates text instead of decoding outputs
    # the loss is a mean negative log-likelihood, so exp(loss) is a perplexity worth reporting
    # (not for a regression loss such as text_to_image's denoising MSE)
    loss_is_nll: ClassVar[bool] = True

    def __init__(self, spec: TaskSpec, tokenizer: Any, model: torch.nn.Module) -> None:
        self.spec = spec
        self.options: Any = spec.options
        self.labels: list[str] | None = list(spec.labels) if spec.labels is not None else None
        self.tokenizer = ready_tokenizer(tokenizer)

    @property
    def name(self) -> str:
        return self.spec.name

    def target_columns(self) -> list[str]:
        return self.spec.target_columns()

    def has_targets(self, records: Sequence[dict]) -> bool:
        return self.spec.has_targets(records)

    # --- features --------------------------------------------------------------------------
    def encode(self, records: Sequence[dict], with_targets: bool = True) -> list[dict[str, Any]]:
        raise NotImplementedError

    def collate(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def feature_notes(
        self, split: str, records: Sequence[dict], features: Sequence[dict[str, Any]]
    ) -> list[str]:
        """Lines for the run log on how ``records`` became ``features`` (what was split into
        several features, cut or left out), so nothing happens to the data silently."""
        return []

    def count_targets(self, batch: dict[str, torch.Tensor]) -> int:
        """How many targets the batch's mean loss averages over (to weight it exactly)."""
        labels = batch["labels"]
        return int((labels != IGNORE_INDEX).sum())

    # --- predictions and scores ------------------------------------------------------------
    def decode(
        self, features: Sequence[dict[str, Any]], batch: dict[str, torch.Tensor], outputs: Any
    ) -> list[Any]:
        """One prediction per feature of the batch, from the forward outputs (default: none)."""
        return []

    def texts(self, records: Sequence[dict], decoded: Sequence[Any]) -> list[str]:
        """Decoded predictions as the text written beside each row (default: as they are)."""
        return [str(d) for d in decoded]

    def scored_rows(self, records: Sequence[dict]) -> list[dict]:
        """The rows predictions belong to (generation groups rows that share a prompt)."""
        return list(records)

    def score(
        self, records: Sequence[dict], predictions: Sequence[Any], eval_loss: float
    ) -> EvalResult:
        """Metrics of ``predictions`` (one per :meth:`scored_rows`) against ``records``'
        references; ``eval_loss`` is the token-weighted mean loss already computed."""
        raise NotImplementedError

    def predict(
        self, ctx: EvalContext, records: Sequence[dict], max_new_tokens: int | None = None
    ) -> list[str]:
        """Predictions for rows that may lack references (the test file); ``max_new_tokens``
        overrides a generating task's generation length."""
        features = self.encode(records, with_targets=False)
        return self.texts(records, decode_all(ctx, self, features))

    def generate(
        self, ctx: EvalContext, records: Sequence[dict], max_new_tokens: int | None = None
    ) -> list[str]:
        """What ``peftkit generate`` prints for input rows (default: the predictions)."""
        return self.predict(ctx, records, max_new_tokens)

    def baselines(
        self, train_records: Sequence[dict], eval_records: Sequence[dict]
    ) -> dict[str, Any]:
        """Scores of trivial predictors to read the model's scores against (majority class)."""
        return {}

    def result_warning(
        self, metrics: Mapping[str, float], result: EvalResult, first_loss: float | None
    ) -> str | None:
        """One line for the run log when a result looks broken (default: never). ``first_loss``
        is the run's earliest loss (its first evaluation, else its first training step)."""
        return None

    @staticmethod
    def baseline_line(base: Mapping[str, Any]) -> str | None:
        """:meth:`baselines` as one line for a log or a terminal; None when there are none."""
        if base.get("majority_accuracy") is not None:
            return (
                f"majority-class baseline accuracy={base['majority_accuracy']:.4f} (always "
                f"{base.get('majority_label')!r}), macro_f1="
                f"{base.get('majority_macro_f1', 0.0):.4f}"
            )
        scores = " ".join(f"{k}={v:.4f}" for k, v in base.items() if isinstance(v, float))
        return f"baselines: {scores}" if scores else None

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
    """THE batch runner: the model over ``features`` in eval mode without gradients,
    ``ctx.batch_size`` at a time; yields ``(feature indices, batch, outputs)`` and restores the
    model's mode after. With several processes, this process's share of the batches
    (:meth:`EvalContext.shard`; padding batches run but are not yielded): gather the results
    with :meth:`EvalContext.gather`, keyed by ``indices.start``."""
    model = ctx.model
    was_training = model.training
    model.eval()
    pieces = list(chunks(len(features), ctx.batch_size))
    try:
        for index in ctx.shard(len(pieces)):
            piece = pieces[0 if index is None else index]
            batch = task.collate([features[i] for i in piece])
            batch = {k: v.to(ctx.device) for k, v in batch.items()}
            with torch.no_grad(), ctx.autocast():
                outputs = model(**batch)
            if index is not None:
                yield piece, batch, outputs
    finally:
        model.train(was_training)


def decode_all(ctx: EvalContext, task: Task, features: Sequence[dict[str, Any]]) -> list[Any]:
    """:meth:`Task.decode` over every batch of ``features``: one prediction per feature (from
    every process's batches, in order)."""
    parts = [
        (piece.start, task.decode([features[i] for i in piece], batch, outputs))
        for piece, batch, outputs in forward_batches(ctx, task, features)
    ]
    return [p for part in ctx.gather(parts) for p in part]


def run_eval(
    ctx: EvalContext, task: Task, records: Sequence[dict], features: Sequence[dict[str, Any]]
) -> tuple[dict[str, float], EvalResult]:
    """Score ``task`` on ``records`` (``features`` = ``task.encode(records)``).

    One pass of :func:`forward_batches` gives the teacher-forced loss, weighted by each batch's
    target count (the exact per-token mean), and the decoded predictions; a generating task
    generates its predictions after it. With several processes each runs its share of the
    batches and every process gets every row's result, in order (no row twice, none dropped). Returns ``({"eval_loss", "eval_ppl", **task metrics},
    EvalResult)``.
    """
    parts = []
    for piece, batch, outputs in forward_batches(ctx, task, features):
        n = task.count_targets(batch)
        decoded_batch = task.decode([features[i] for i in piece], batch, outputs)
        parts.append((piece.start, (float(outputs.loss.float()) * n, n, decoded_batch)))
    total, count = 0.0, 0
    decoded: list[Any] = []
    for loss_sum, n, decoded_batch in ctx.gather(parts):  # batch order: one process's sums
        total += loss_sum
        count += n
        decoded += decoded_batch
    eval_loss = total / max(count, 1)
    predictions = task.predict(ctx, task.scored_rows(records)) if task.generates else decoded
    result = task.score(records, predictions, eval_loss)
    metrics = {"eval_loss": eval_loss}
    if task.loss_is_nll:
        metrics["eval_ppl"] = math.exp(eval_loss) if eval_loss < 700 else math.inf
    metrics.update(result.metrics)
    return metrics, result


def input_positions(logits: torch.Tensor, width: int) -> torch.Tensor:
    """The outputs of the input's own ``width`` tokens: prompt tuning / P-tuning prepend virtual
    tokens, whose positions come first, (B, N + T, ...) -> (B, T, ...)."""
    return logits[:, logits.shape[1] - width :]
