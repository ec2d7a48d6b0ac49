"""What the text-to-text tasks share: templates, label sets, generation-based scoring.

``causal_lm_cls``, ``causal_lm_gen`` and ``seq2seq`` all map a row to a prompt and a target text::

    row --text template--> prompt   "Tweet text : @EE terrible latency Label : "
        --target template (+ label_map)--> target   "complaint"

and are scored against the target: by label (accuracy, macro-F1, invalid rate) when the targets
form a label set, by ROUGE-L / BLEU otherwise. A label set is compared as the user means it
(:mod:`peftkit.tasks.labels`): the template's spacing, a trailing newline or EOS text in the
target, and (``label_match: casefold``) case do not make a right answer wrong. Labels come from
one of two decodings (``task.decode``)::

    generate  greedy text after the prompt, then matched to a label (may match none: invalid)
    rank      every label's log-likelihood after the prompt, the best one wins (never invalid;
              :mod:`peftkit.tasks.rank`: the prompt runs once, the labels as continuations)

With ``group_references`` the eval rows that share a prompt (E2E NLG has several references per
meaning representation) are generated once and scored against all their references.
Subclasses decide how prompt and target become token ids (:meth:`encode_prompts`,
:meth:`target_ids`, ``encode``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from .base import EvalContext, EvalResult, Task, TaskOptions, at_least_two
from .generation import generate_texts
from .labels import LABEL_MATCHES, LabelSet, label_key, most_common
from .rank import RANK_SCORES, rank_continuations
from .scoring import (
    CLASSIFICATION_METRICS,
    GENERATION_METRICS,
    broken_result_line,
    check_metric_names,
    majority_baseline,
    score,
)
from .template import Template

DECODES = ("generate", "rank")


@dataclasses.dataclass
class PromptedOptions(TaskOptions):
    """Options shared by the text-to-text tasks.

    Attributes:
        text: prompt template, ``{column}`` placeholders (e.g. ``"Tweet text : {Tweet text} Label : "``).
        target: target template (e.g. ``"{Label}"``, or ``" {Label}"`` with the space GPT-style
            templates put before a word: the model learns the text as rendered, reports show
            the label without it).
        labels: the label set; when given (or for classification tasks) scoring is by label.
        label_map: rewrite raw target values (``{"0": "negative", "1": "positive"}``); keys
            match the rendered target without its surrounding whitespace, which is kept.
        label_match: ``exact`` (default: equal once surrounding whitespace is stripped) or
            ``casefold`` (also without case).
        decode: ``generate`` (default: greedy text, matched to a label) or ``rank`` (the label
            with the highest log-likelihood after the prompt; never an invalid label).
        rank_score: ``sum`` (default: the label's total log-likelihood, EOS included) or
            ``mean`` (per token: length-normalised, for labels of very different lengths).
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
    label_match: str = "exact"
    decode: str = "generate"
    rank_score: str = "sum"
    max_length: int = 256
    max_new_tokens: int | None = None
    metrics: list[str] | None = None
    group_references: bool = True

    def __post_init__(self) -> None:
        if self.metrics is not None:
            check_metric_names(self.metrics)
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        for name, allowed in (
            ("label_match", LABEL_MATCHES),
            ("decode", DECODES),
            ("rank_score", RANK_SCORES),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"task.{name} must be one of {list(allowed)}, not {getattr(self, name)!r}"
                )
        if self.decode == "rank" and not self.is_classification:
            raise ValueError(
                "task.decode: rank picks the most likely label, so it needs a label set: give "
                "task.labels (or use task.type: causal_lm_cls)"
            )
        if self.label_map is not None:
            self.label_map = {str(k).strip(): str(v) for k, v in self.label_map.items()}

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
        """The target text as the model learns it (``label_map`` applied, spacing kept)."""
        raw = self.target_template.render(row)
        if not self.label_map:
            return raw
        core = raw.strip()
        if core not in self.label_map:
            return raw
        start = raw.index(core) if core else 0
        return raw[:start] + self.label_map[core] + raw[start + len(core) :]

    @property
    def casefold(self) -> bool:
        return self.label_match == "casefold"

    def label_of(self, row: Mapping[str, Any]) -> str:
        """The row's label as reports show it (its target without surrounding whitespace)."""
        return label_key(self.target_of(row))

    def learn_labels(self, train_records: Sequence[dict]) -> list[str] | None:
        """``task.labels`` (stripped), else one label per distinct train target, compared as
        ``label_match`` says and shown in its most frequent spelling; sorted."""
        if not self.is_classification:
            return None
        if self.labels:
            labels = [label_key(str(x)) for x in self.labels]
        else:
            spellings: dict[str, list[str]] = {}
            for r in train_records:
                label = self.label_of(r)
                spellings.setdefault(label_key(label, self.casefold), []).append(label)
            labels = sorted(most_common(v) for v in spellings.values())
        LabelSet(labels, casefold=self.casefold)  # ValueError: two labels that compare equal
        return at_least_two(labels, "label(s) in the train data (check task.target):")

    def learn_label_texts(
        self, train_records: Sequence[dict], labels: Sequence[str]
    ) -> list[str] | None:
        """Per label, its most frequent target text in the train rows (the template's spacing
        included); a label no train row has is rendered into a one-placeholder template."""
        if not self.is_classification:
            return None
        texts: dict[str, list[str]] = {}
        for r in train_records:
            text = self.target_of(r)
            texts.setdefault(label_key(text, self.casefold), []).append(text)
        fields = self.target_template.fields
        out = []
        for label in labels:
            seen = texts.get(label_key(label, self.casefold))
            if seen:
                out.append(most_common(seen))
            elif len(fields) == 1:
                out.append(self.target_template.render({fields[0]: label}))
            else:
                out.append(label)
        return out

    def check_records(
        self,
        records: Sequence[dict],
        split: str,
        need_targets: bool,
        labels: Sequence[str] | None = None,
    ) -> list[str]:
        problems = super().check_records(records, split, need_targets, labels)
        labels = labels or ([label_key(str(x)) for x in self.labels] if self.labels else None)
        if problems or not need_targets or not self.is_classification or not labels:
            return problems
        known = LabelSet(labels, casefold=self.casefold)
        unknown = sorted(
            {self.label_of(r) for r in records if known.match(self.label_of(r)) is None}
        )
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
        self.label_set: LabelSet | None = None
        if options.is_classification and self.labels:
            # labels saved before label texts were kept (task_state.json) are their own texts
            self.label_set = LabelSet(
                self.labels,
                spec.label_texts or self.labels,
                casefold=options.casefold,
                drop=list(getattr(self.tokenizer, "all_special_tokens", []) or []),
            )
            self.labels = self.label_set.labels

    # --- tokens ----------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str], new_tokens: int) -> list[list[int]]:
        """Token ids of each prompt as the model sees it when generating ``new_tokens`` more."""
        raise NotImplementedError

    def target_ids(self, targets: Sequence[str]) -> list[list[int]]:
        """Token ids of target texts as training learns them (EOS included)."""
        raise NotImplementedError

    def generation_length(self) -> int:
        if self.options.max_new_tokens is not None:
            return self.options.max_new_tokens
        if self.label_set is not None:
            texts = self.label_set.texts
            ids = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
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
        if self.label_set is not None:  # compared as labels: both sides spelt as reports show
            preds = [self.label_set.shown(p) for p in preds]
            refs = [self.label_set.shown(r) for r in refs]
            correct = [p == r for p, r in zip(preds, refs)]
        else:  # free text: right when equal to a reference up to whitespace
            correct = [
                " ".join(p.split())
                in {" ".join(x.split()) for x in ([r] if isinstance(r, str) else r)}
                for p, r in zip(preds, refs)
            ]
        metrics = score(self.metric_names, preds, refs, self.labels if self.label_set else None)
        return EvalResult(
            metrics=metrics, predictions=preds, references=refs, rows=rows, correct=correct
        )

    def predict(
        self, ctx: EvalContext, records: Sequence[dict], max_new_tokens: int | None = None
    ) -> list[str]:
        """Generated texts; for a label set, each as the label it spells (``decode: rank``:
        the most likely label)."""
        if self.options.decode == "rank":
            return self.rank(ctx, records)
        new_tokens = self.generation_length() if max_new_tokens is None else max_new_tokens
        prompts = self.encode_prompts([self.options.prompt_of(r) for r in records], new_tokens)
        texts = generate_texts(
            ctx,
            self.tokenizer,
            prompts,
            max_new_tokens=new_tokens,
            encoder_decoder=self.encoder_decoder,
        )
        return [self.label_set.shown(t) for t in texts] if self.label_set else texts

    def label_scores(self, ctx: EvalContext, records: Sequence[dict]) -> list[list[float]]:
        """Per row, each label's log-likelihood after its prompt (``rank_score``: the sum over
        the label's tokens and EOS, or their mean), in label order."""
        if self.label_set is None:
            raise ValueError("rank decoding needs a label set (task.labels)")
        continuations = self.target_ids(self.label_set.texts)  # (L, tokens) as trained
        longest = max(len(c) for c in continuations)
        prompts = self.encode_prompts([self.options.prompt_of(r) for r in records], longest)
        return rank_continuations(
            ctx,
            self.tokenizer,
            prompts,
            continuations,
            encoder_decoder=self.encoder_decoder,
            mean=self.options.rank_score == "mean",
        )

    def rank(self, ctx: EvalContext, records: Sequence[dict]) -> list[str]:
        """The label with the highest score (:meth:`label_scores`) for each row."""
        labels = self.labels or []
        return [
            labels[max(range(len(s)), key=s.__getitem__)] for s in self.label_scores(ctx, records)
        ]

    def baselines(
        self, train_records: Sequence[dict], eval_records: Sequence[dict]
    ) -> dict[str, Any]:
        options: PromptedOptions = self.options
        if self.label_set is None:
            return {}
        shown = self.label_set.shown
        return majority_baseline(
            [shown(options.target_of(r)) for r in train_records],
            [shown(options.target_of(r)) for r in eval_records],
            self.labels,
        )

    def result_warning(
        self, metrics: Mapping[str, float], result: EvalResult, first_loss: float | None
    ) -> str | None:
        if self.label_set is None:
            return None
        return broken_result_line(metrics, result.predictions, self.labels or [], first_loss)
