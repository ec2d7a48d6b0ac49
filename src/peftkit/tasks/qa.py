"""Extractive question answering (SQuAD v1.1 / v2.0): the answer is a span of the context.

Rows are questions as :func:`peftkit.data.read_squad` gives them,
``{"question", "context", "answers": {"text": [...], "answer_start": [...]}}``; empty answer lists
mean "unanswerable" (SQuAD v2). ::

    row ──qa_windows.encode_windows──> windows: question whole + overlapping context pieces,
      │                                  each with its row, window number, per-token characters
      │  training: the answer's tokens in the window that holds it whole, else [CLS] (0, 0)
      v
    model ──start/end logits──> qa_decode.window_answers: n best spans per window (characters)
      ──qa_decode.question_answers──> best span over ALL windows of a question, min null score
      ──> v1: the span;  v2: "" when null - span > null_threshold

Long contexts are never cut: they become ``max_length``-token windows sharing ``doc_stride``
context tokens (the run log counts the questions that needed more than one). ``mode: v1``
always answers (SQuAD v1.1; rows without an answer are left out of training and scoring, and the
log says how many); ``mode: v2`` may abstain, and evaluation reports, beside EM/F1 at
``null_threshold``, the threshold that would have scored best on the split (the official v2
script's ``best_f1_thresh``). Scored with the official SQuAD EM / F1 (0..1 here, like every other
peftkit metric), answerable (``HasAns_*``) and unanswerable (``NoAns_*``) apart, next to two
baselines: always "no answer", and the context sentence sharing the most words with the question.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..metrics import squad_best_threshold, squad_em_f1, squad_question_scores
from .base import EvalResult, Task, TaskOptions, input_positions, pad_encoder_inputs
from .qa_decode import (
    QuestionAnswer,
    WindowAnswers,
    question_answers,
    sentence_overlap_answer,
    window_answers,
)
from .qa_windows import encode_windows, window_counts, window_target

MODES = ("v1", "v2")


@dataclasses.dataclass
class QaOptions(TaskOptions):
    """``task:`` fields of ``type: qa``.

    question: the question column.
    context: the context (passage) column.
    answers: the gold answers column (``{"text": [...], "answer_start": [...]}``).
    mode: ``v1`` always answers (SQuAD v1.1); ``v2`` answers "" when the null score beats the
        best span by more than ``null_threshold`` (SQuAD v2.0).
    max_length: tokens per window (question + a piece of the context + special tokens).
    doc_stride: context tokens each window shares with the one before (Hugging Face's
        ``stride``); a context longer than one window is covered by several. Default:
        ``min(128, max_length // 3)`` (128 at the usual ``max_length`` 384).
    max_answer_tokens: the longest span the decoder considers.
    n_best: spans kept per window before the best over all windows is taken.
    null_threshold: v2: abstain when ``null score - best span score`` exceeds it.
    """

    question: str = "question"
    context: str = "context"
    answers: str = "answers"
    mode: str = "v2"
    max_length: int = 384
    doc_stride: int | None = None
    max_answer_tokens: int = 30
    n_best: int = 20
    null_threshold: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"task.mode must be one of {list(MODES)}, not {self.mode!r}")
        if self.doc_stride is None:
            self.doc_stride = min(128, self.max_length // 3)
        if not 0 <= self.doc_stride < self.max_length:
            raise ValueError(
                f"task.doc_stride ({self.doc_stride}) must be >= 0 and below task.max_length "
                f"({self.max_length}): it is the overlap between consecutive context windows"
            )
        if self.max_answer_tokens < 1 or self.n_best < 1:
            raise ValueError("task.max_answer_tokens and task.n_best must be at least 1")
        self.null_threshold = float(self.null_threshold)

    @property
    def always_answer(self) -> bool:
        return self.mode == "v1"

    def input_columns(self) -> list[str]:
        return [self.question, self.context]

    def target_columns(self) -> list[str]:
        return [self.answers]

    def answers_of(self, row: Mapping[str, Any]) -> dict[str, list]:
        return row[self.answers]

    def check_records(
        self,
        records: Sequence[dict],
        split: str,
        need_targets: bool,
        labels: Sequence[str] | None = None,
    ) -> list[str]:
        problems = super().check_records(records, split, need_targets, labels)
        if problems or not need_targets:
            return problems
        for i, row in enumerate(records):
            answers = self.answers_of(row)
            if not (isinstance(answers, dict) and "text" in answers and "answer_start" in answers):
                return [
                    f"data.{split}: row {i}: '{self.answers}' must be "
                    "{'text': [...], 'answer_start': [...]}; read SQuAD JSON files for QA"
                ]
        return []


class ExtractiveQA(Task):
    """``task.type: qa``."""

    Options = QaOptions
    best_metric = "f1"

    # --- features -------------------------------------------------------------------------
    def _kept(self, records: Sequence[dict], with_targets: bool) -> list[int]:
        """Rows that become features: all, except unanswerable ones for v1 training/scoring."""
        if not (with_targets and self.options.always_answer):
            return list(range(len(records)))
        return [i for i, r in enumerate(records) if self.options.answers_of(r)["text"]]

    def encode(self, records: Sequence[dict], with_targets: bool = True) -> list[dict[str, Any]]:
        """Windows of every kept row (see :mod:`peftkit.tasks.qa_windows`), ``row`` indexing
        ``records``; with targets, each window's answer tokens or (0, 0)."""
        o = self.options
        kept = self._kept(records, with_targets)
        features = encode_windows(
            self.tokenizer,
            [str(records[i][o.question]) for i in kept],
            [str(records[i][o.context]) for i in kept],
            o.max_length,
            o.doc_stride,
        )
        for f in features:
            f["row"] = kept[f["row"]]
            if with_targets:
                answers = o.answers_of(records[f["row"]])
                f["start_positions"], f["end_positions"] = window_target(f["spans"], answers)
        return features

    def feature_notes(
        self, split: str, records: Sequence[dict], features: Sequence[dict[str, Any]]
    ) -> list[str]:
        questions, windows, several = window_counts(features)
        o = self.options
        notes = [
            f"qa {split}: {windows:,d} windows of <= {o.max_length} tokens (doc_stride "
            f"{o.doc_stride}) for {questions:,d} questions; {several:,d} of them needed more "
            "than one window"
        ]
        left_out = len(records) - questions
        if left_out and o.always_answer:
            notes.append(
                f"qa {split}: mode v1 always answers: {left_out:,d} unanswerable questions are "
                "left out of training and scoring (mode: v2 keeps them)"
            )
        return notes

    def collate(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = pad_encoder_inputs(features, self.tokenizer.pad_token_id)
        if "start_positions" in features[0]:
            batch["start_positions"] = torch.tensor([f["start_positions"] for f in features])
            batch["end_positions"] = torch.tensor([f["end_positions"] for f in features])
        return batch

    def count_targets(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["start_positions"].shape[0])  # the loss is a mean over windows

    # --- decoding and scores --------------------------------------------------------------
    def decode(
        self, features: Sequence[dict[str, Any]], batch: dict[str, torch.Tensor], outputs: Any
    ) -> list[WindowAnswers]:
        """Per window, its null score and n best spans in characters of the row's context."""
        width = batch["input_ids"].shape[1]
        return window_answers(
            input_positions(outputs.start_logits, width),  # (B, T): virtual tokens dropped
            input_positions(outputs.end_logits, width),  # (B, T)
            features,
            self.options.max_answer_tokens,
            self.options.n_best,
        )

    def answers(self, decoded: Sequence[WindowAnswers]) -> dict[int, QuestionAnswer]:
        """Row index -> its answer over all its windows."""
        return question_answers(decoded)

    def _text(self, row: Mapping[str, Any], answer: QuestionAnswer | None) -> str:
        if answer is None:
            return ""
        context = str(row[self.options.context])
        return answer.text(context, self.options.always_answer, self.options.null_threshold)

    def texts(self, records: Sequence[dict], decoded: Sequence[Any]) -> list[str]:
        """Per row, the answer text cut from its context ("" = no answer)."""
        answers = self.answers(decoded)
        return [self._text(row, answers.get(i)) for i, row in enumerate(records)]

    def score(
        self, records: Sequence[dict], predictions: Sequence[Any], eval_loss: float
    ) -> EvalResult:
        """EM / F1 of the questions that have windows (v1: the answerable ones); v2 adds the
        best no-answer threshold on this split, as the official script does."""
        answers = self.answers(predictions)
        scored = sorted(answers)
        rows = [records[i] for i in scored]
        refs = [self.options.answers_of(r) for r in rows]
        preds = [self._text(r, answers[i]) for i, r in zip(scored, rows)]
        scores = squad_em_f1(preds, refs)
        metrics = {k: v / 100.0 for k, v in scores.items() if not k.endswith("total")}
        # right as the official script's exact match says (its answer normalisation)
        correct = [em == 1.0 for em, _ in squad_question_scores(preds, refs)]
        if not self.options.always_answer:
            metrics.update(self._best_thresholds(rows, refs, [answers[i] for i in scored]))
        return EvalResult(
            metrics=metrics,
            predictions=preds,
            references=[list(r["text"]) or [""] for r in refs],  # "" = no answer
            rows=rows,
            correct=correct,
        )

    def _best_thresholds(
        self, rows: Sequence[dict], refs: Sequence[dict], answers: Sequence[QuestionAnswer]
    ) -> dict[str, float]:
        """``best_exact`` / ``best_f1`` (0..1) and the null thresholds that give them."""
        spans = [a.text(str(r[self.options.context]), True) for r, a in zip(rows, answers)]
        answered = squad_question_scores(spans, refs)
        abstained = squad_question_scores([""] * len(refs), refs)
        na = [a.na_score for a in answers]
        out = {}
        for k, name in enumerate(("exact", "f1")):
            best, thresh = squad_best_threshold(
                na, [s[k] for s in answered], [s[k] for s in abstained]
            )
            out[f"best_{name}"], out[f"best_{name}_thresh"] = best / 100.0, thresh
        return out

    def baselines(
        self, train_records: Sequence[dict], eval_records: Sequence[dict]
    ) -> dict[str, Any]:
        """On the rows scored: always "no answer" (its F1 is the share of unanswerable
        questions; 0 in v1 mode), and the sentence with the most question words."""
        rows = [eval_records[i] for i in self._kept(eval_records, True)]
        if not rows:
            return {}
        answers = [self.options.answers_of(r) for r in rows]
        none = squad_em_f1([""] * len(rows), answers)
        o = self.options
        lexical = squad_em_f1(
            [sentence_overlap_answer(str(r[o.question]), str(r[o.context])) for r in rows],
            answers,
        )
        return {
            "no_answer_f1": none["f1"] / 100.0,
            "no_answer_exact": none["exact"] / 100.0,
            "sentence_overlap_f1": lexical["f1"] / 100.0,
            "sentence_overlap_exact": lexical["exact"] / 100.0,
        }
