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
import functools
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from .base import EvalContext, EvalResult, Task, TaskOptions, at_least_two
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
class PromptedOptions(TaskOptions):
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

    classification: ClassVar[bool] = False  # targets form a label set even when none is given

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

    @functools.cached_property
    def prompt_template(self) -> Template:
        return Template(self.text)

    @functools.cached_property
    def target_template(self) -> Template:
        return Template(self.target)

    @property
    def is_classification(self) -> bool:
        return self.classification or self.labels is not None

    def input_columns(self) -> list[str]:
        return self.prompt_template.fields

    def target_columns(self) -> list[str]:
        return self.target_template.fields

    def prompt_of(self, row: Mapping[str, Any]) -> str:
        return self.prompt_template.render(row)

    def target_of(self, row: Mapping[str, Any]) -> str:
        raw = self.target_template.render(row)
        mapping = self.label_map or {}
        return mapping.get(raw, raw)

    def learn_labels(self, train_records: Sequence[dict]) -> list[str] | None:
        if not self.is_classification:
            return None
        labels = list(self.labels) if self.labels else None
        labels = labels or sorted({self.target_of(r) for r in train_records})
        return at_least_two(labels, "label(s) in the train data (check task.target):")

    def check_records(
        self,
        records: Sequence[dict],
        split: str,
        need_targets: bool,
        labels: Sequence[str] | None = None,
    ) -> list[str]:
        problems = super().check_records(records, split, need_targets, labels)
        labels = labels or self.labels
        if problems or not need_targets or not self.is_classification or not labels:
            return problems
        unknown = sorted({self.target_of(r) for r in records} - set(labels))
        if unknown:
            problems.append(
                f"data.{split}: target value(s) {unknown[:5]} are not in task.labels "
                f"{list(labels)}; add them or map them with task.label_map"
            )
        return problems

    def input_row(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """A ``--prompt`` fills the template's one placeholder; file rows keep their columns."""
        try:
            return super().input_row(row)
        except ValueError:
            raise ValueError(
                f"the run's template {self.text!r} needs columns {self.input_columns()}; give "
                "an --input file with those columns, or --raw to use prompts verbatim"
            ) from None

    def describe(self, row: Mapping[str, Any]) -> str:
        return self.prompt_of(row)


class PromptedTask(Task):
    """Base of the generation-scored tasks; subclasses decide how prompts become token ids."""

    encoder_decoder: ClassVar[bool] = False
    generates = True

    def __init__(self, spec: Any, tokenizer: Any, model: Any) -> None:
        super().__init__(spec, tokenizer, model)
        options: PromptedOptions = self.options
        names = options.metrics or (
            CLASSIFICATION_METRICS if options.is_classification else GENERATION_METRICS
        )
        self.metric_names = list(names)
        self.best_metric = self.metric_names[0]

    # --- tokens ----------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str], new_tokens: int) -> list[list[int]]:
        """Token ids of each prompt as the model sees it when generating ``new_tokens`` more."""
        raise NotImplementedError

    def generation_length(self) -> int:
        if self.options.max_new_tokens is not None:
            return self.options.max_new_tokens
        if self.options.is_classification and self.labels:
            ids = self.tokenizer(list(self.labels), add_special_tokens=False)["input_ids"]
            return max(len(i) for i in ids) + 2
        return 64

    # --- scoring ---------------------------------------------------------------------------
    def _grouped(self, records: Sequence[dict]) -> tuple[list[dict], list[Any]]:
        """Rows with their references; rows sharing a prompt merge when grouping applies."""
        options: PromptedOptions = self.options
        if options.is_classification or not options.group_references:
            return list(records), [options.target_of(r) for r in records]
        order: dict[str, int] = {}
        rows: list[dict] = []
        refs: list[list[str]] = []
        for r in records:
            key = options.prompt_of(r)
            if key not in order:
                order[key] = len(rows)
                rows.append(r)
                refs.append([])
            refs[order[key]].append(options.target_of(r))
        return rows, refs

    def scored_rows(self, records: Sequence[dict]) -> list[dict]:
        return self._grouped(records)[0]

    def score(
        self, records: Sequence[dict], predictions: Sequence[Any], eval_loss: float
    ) -> EvalResult:
        rows, refs = self._grouped(records)
        preds = list(predictions)
        labels = self.labels if self.options.is_classification else None
        metrics = score(self.metric_names, preds, refs, labels)
        return EvalResult(metrics=metrics, predictions=preds, references=refs, rows=rows)

    def predict(
        self, ctx: EvalContext, records: Sequence[dict], max_new_tokens: int | None = None
    ) -> list[str]:
        new_tokens = self.generation_length() if max_new_tokens is None else max_new_tokens
        prompts = self.encode_prompts([self.options.prompt_of(r) for r in records], new_tokens)
        return generate_texts(
            ctx,
            self.tokenizer,
            prompts,
            max_new_tokens=new_tokens,
            encoder_decoder=self.encoder_decoder,
        )

    def baselines(
        self, train_records: Sequence[dict], eval_records: Sequence[dict]
    ) -> dict[str, Any]:
        options: PromptedOptions = self.options
        if not options.is_classification:
            return {}
        return majority_baseline(
            [options.target_of(r) for r in train_records],
            [options.target_of(r) for r in eval_records],
            self.labels,
        )
