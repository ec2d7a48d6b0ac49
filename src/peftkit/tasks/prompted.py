"""What the text-to-text tasks share: templates, label sets, generation-based scoring.

``causal_lm_cls``, ``causal_lm_gen`` and ``seq2seq`` all map a row to a prompt and a target text::

    row --text template--> prompt   "Tweet text : @EE terrible latency Label : "
        --target template (+ label_map)--> target   "complaint"

and are scored by generating from the prompt and comparing with the target: exact label match
(accuracy, macro-F1) when the targets form a label set, ROUGE-L / BLEU otherwise. With
``group_references`` the eval rows that share a prompt (E2E NLG has several references per
meaning representation) are generated once and scored against all their references.
Subclasses decide how prompt and target become token ids (:meth:`encode_prompts`, ``encode``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from .base import EvalContext, EvalResult, Task
from .generation import generate_texts
from .scoring import (
    CLASSIFICATION_METRICS,
    GENERATION_METRICS,
    check_metric_names,
    majority_baseline,
    score,
)
from .template import Template


@dataclasses.dataclass
class PromptedOptions:
    """Options shared by the text-to-text tasks.

    Attributes:
        text: prompt template, ``{column}`` placeholders (e.g. ``"Tweet text : {Tweet text} Label : "``).
        target: target template (e.g. ``"{Label}"``).
        labels: the label set; when given (or for classification tasks) scoring is by exact match.
        label_map: rewrite raw target values (``{"0": "negative", "1": "positive"}``).
        max_length: token budget of prompt + target (prompts are cut from the left).
        max_new_tokens: generation length (classification default: longest label + 2 tokens).
        metrics: metric names (``accuracy``, ``macro_f1``, ``rouge_l``, ``bleu``).
        group_references: score rows sharing a prompt once, against all their targets.
    """

    text: str
    target: str = "{label}"
    labels: list[str] | None = None
    label_map: dict[str, str] | None = None
    max_length: int = 256
    max_new_tokens: int | None = None
    metrics: list[str] | None = None
    group_references: bool = True

    def __post_init__(self) -> None:
        if self.metrics is not None:
            check_metric_names(self.metrics)
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")


class PromptedTask(Task):
    """Base of the generation-scored tasks; subclasses set ``classification`` and encoding."""

    classification: bool = False
    encoder_decoder: bool = False
    generates = True

    def __init__(self, options: PromptedOptions) -> None:
        super().__init__(options)
        self.prompt_template = Template(options.text)
        self.target_template = Template(options.target)
        self.labels: list[str] | None = list(options.labels) if options.labels else None
        self.is_classification = self.classification or self.labels is not None
        names = options.metrics or (
            CLASSIFICATION_METRICS if self.is_classification else GENERATION_METRICS
        )
        self.metric_names = list(names)
        self.best_metric = self.metric_names[0]

    # --- rows ------------------------------------------------------------------------------
    def input_columns(self) -> list[str]:
        return self.prompt_template.fields

    def target_columns(self) -> list[str]:
        return self.target_template.fields

    def prompt_of(self, row: dict) -> str:
        return self.prompt_template.render(row)

    def target_of(self, row: dict) -> str:
        raw = self.target_template.render(row)
        mapping = self.options.label_map or {}
        return mapping.get(raw, raw)

    def fit(self, train_records: Sequence[dict]) -> None:
        if self.is_classification and self.labels is None:
            self.labels = sorted({self.target_of(r) for r in train_records})
        if self.is_classification and self.labels is not None and len(self.labels) < 2:
            raise ValueError(
                f"task {self.name}: found {len(self.labels)} label(s) {self.labels} in the train "
                "data; classification needs at least 2 (check task.target)"
            )

    def check_records(self, records: Sequence[dict], split: str, need_targets: bool) -> list[str]:
        problems = super().check_records(records, split, need_targets)
        if problems or not need_targets or not self.is_classification or self.labels is None:
            return problems
        unknown = sorted({self.target_of(r) for r in records} - set(self.labels))
        if unknown:
            problems.append(
                f"data.{split}: target value(s) {unknown[:5]} are not in task.labels "
                f"{self.labels}; add them or map them with task.label_map"
            )
        return problems

    # --- tokens ----------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str]) -> list[list[int]]:
        """Token ids of each prompt as the model sees it when generating."""
        raise NotImplementedError

    def generation_length(self) -> int:
        if self.options.max_new_tokens is not None:
            return self.options.max_new_tokens
        if self.is_classification and self.labels:
            ids = self.tokenizer(list(self.labels), add_special_tokens=False)["input_ids"]
            return max(len(i) for i in ids) + 2
        return 64

    # --- scoring ---------------------------------------------------------------------------
    def _grouped(self, records: Sequence[dict]) -> tuple[list[dict], list[Any]]:
        """Rows with their references; rows sharing a prompt merge when grouping applies."""
        if self.is_classification or not self.options.group_references:
            return list(records), [self.target_of(r) for r in records]
        order: dict[str, int] = {}
        rows: list[dict] = []
        refs: list[list[str]] = []
        for r in records:
            key = self.prompt_of(r)
            if key not in order:
                order[key] = len(rows)
                rows.append(r)
                refs.append([])
            refs[order[key]].append(self.target_of(r))
        return rows, refs

    def evaluate(self, ctx: EvalContext, records: Sequence[dict], eval_loss: float) -> EvalResult:
        rows, refs = self._grouped(records)
        preds = self.predict(ctx, rows)
        metrics = score(
            self.metric_names, preds, refs, self.labels if self.is_classification else None
        )
        return EvalResult(metrics=metrics, predictions=preds, references=refs, rows=rows)

    def predict(self, ctx: EvalContext, records: Sequence[dict]) -> list[str]:
        prompts = self.encode_prompts([self.prompt_of(r) for r in records])
        return generate_texts(
            ctx,
            self.tokenizer,
            prompts,
            max_new_tokens=self.generation_length(),
            encoder_decoder=self.encoder_decoder,
        )

    def baselines(
        self, train_records: Sequence[dict], eval_records: Sequence[dict]
    ) -> dict[str, Any]:
        if not self.is_classification:
            return {}
        return majority_baseline(
            [self.target_of(r) for r in train_records],
            [self.target_of(r) for r in eval_records],
            self.labels,
        )
