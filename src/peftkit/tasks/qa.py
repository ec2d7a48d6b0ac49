"""Extractive question answering (SQuAD v1.1 / v2.0): the answer is a span of the context.

Rows are questions as :func:`peftkit.data.read_squad` gives them,
``{"question", "context", "answers": {"text": [...], "answer_start": [...]}}``; empty answer lists
mean "unanswerable" (SQuAD v2). Each question + context becomes one sequence (the context is cut
at ``max_length``, never the question). The model's start/end heads are trained on the token span
of the first gold answer; an unanswerable question, or an answer the cut removed, points both
heads at the first token (``[CLS]``), as the SQuAD v2 recipes do.

Decoding: the best context span with ``start <= end < start + max_answer_tokens`` by
``start_logit + end_logit``, mapped back to characters through the tokenizer's offsets; when the
``[CLS]`` pair scores higher the prediction is "" (no answer). Scored with the official SQuAD v2
exact match and F1 (0..1 here, like every other peftkit metric), split into answerable
(``HasAns_*``) and unanswerable (``NoAns_*``) questions, next to the always-"no answer" baseline.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..metrics import squad_em_f1
from .base import EvalResult, Task, TaskOptions, input_positions, pad_encoder_inputs


@dataclasses.dataclass
class QaOptions(TaskOptions):
    """``task:`` fields of ``type: qa``.

    question: the question column.
    context: the context (passage) column.
    answers: the gold answers column (``{"text": [...], "answer_start": [...]}``).
    max_length: tokens per question + context (the context is truncated).
    max_answer_tokens: the longest span the decoder considers.
    """

    question: str = "question"
    context: str = "context"
    answers: str = "answers"
    max_length: int = 384
    max_answer_tokens: int = 30

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
    def encode(self, records: Sequence[dict], with_targets: bool = True) -> list[dict[str, Any]]:
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError(
                "qa needs a fast tokenizer (it maps tokens back to characters of the context); "
                "use a model folder with tokenizer.json, or set model.tokenizer to one"
            )
        enc = self.tokenizer(
            [str(r[self.options.question]) for r in records],
            [str(r[self.options.context]) for r in records],
            truncation="only_second",
            max_length=self.options.max_length,
            return_offsets_mapping=True,
        )
        features = []
        for i, ids in enumerate(enc["input_ids"]):
            sequence = enc.sequence_ids(i)
            # character span of each context token; None for question and special tokens
            spans = [
                tuple(span) if seq == 1 else None
                for span, seq in zip(enc["offset_mapping"][i], sequence)
            ]
            feature: dict[str, Any] = {"input_ids": list(ids), "spans": spans}
            if "token_type_ids" in enc:
                feature["token_type_ids"] = list(enc["token_type_ids"][i])
            if with_targets:
                start, end = self._target(spans, self.options.answers_of(records[i]))
                feature["start_positions"], feature["end_positions"] = start, end
            features.append(feature)
        return features

    @staticmethod
    def _target(spans: list[tuple[int, int] | None], answers: dict) -> tuple[int, int]:
        """Token span of the first gold answer, or (0, 0) when there is none in view."""
        if not answers["text"]:
            return 0, 0
        first = int(answers["answer_start"][0])
        last = first + len(answers["text"][0])  # one past the answer's last character
        inside = [t for t, span in enumerate(spans) if span is not None]
        if not inside or spans[inside[0]][0] > first or spans[inside[-1]][1] < last:
            return 0, 0  # the answer lies (partly) in the part of the context that was cut
        start = next(t for t in inside if spans[t][1] > first)
        end = next(t for t in reversed(inside) if spans[t][0] < last)
        return start, end

    def collate(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = pad_encoder_inputs(features, self.tokenizer.pad_token_id)
        if "start_positions" in features[0]:
            batch["start_positions"] = torch.tensor([f["start_positions"] for f in features])
            batch["end_positions"] = torch.tensor([f["end_positions"] for f in features])
        return batch

    def count_targets(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["start_positions"].shape[0])  # the loss is a mean over questions

    # --- decoding and scores --------------------------------------------------------------
    def decode(
        self, features: Sequence[dict[str, Any]], batch: dict[str, torch.Tensor], outputs: Any
    ) -> list[tuple[int, int] | None]:
        """Per row, the character span of the best answer, or None for "no answer"."""
        width = batch["input_ids"].shape[1]
        starts = input_positions(outputs.start_logits, width).float().cpu().tolist()  # (B, T)
        ends = input_positions(outputs.end_logits, width).float().cpu().tolist()  # (B, T)
        return [self._best_span(s, e, f) for s, e, f in zip(starts, ends, features)]

    def _best_span(
        self, start: list[float], end: list[float], feature: dict
    ) -> tuple[int, int] | None:
        """The best-scoring span's characters, or None when the [CLS] pair (no answer) wins."""
        spans = feature["spans"]
        inside = [t for t, span in enumerate(spans) if span is not None]
        best, best_score = None, start[0] + end[0]  # the [CLS] pair: "no answer"
        top_starts = sorted(inside, key=lambda t: start[t], reverse=True)[:20]
        top_ends = set(sorted(inside, key=lambda t: end[t], reverse=True)[:20])
        for s in top_starts:
            for e in range(s, min(s + self.options.max_answer_tokens, len(spans))):
                if e in top_ends and spans[e] is not None and start[s] + end[e] > best_score:
                    best, best_score = (s, e), start[s] + end[e]
        if best is None:
            return None
        return spans[best[0]][0], spans[best[1]][1]

    def texts(self, records: Sequence[dict], decoded: Sequence[Any]) -> list[str]:
        """The answer text cut from each row's context ("" = no answer)."""
        out = []
        for row, span in zip(records, decoded):
            out.append("" if span is None else str(row[self.options.context])[span[0] : span[1]])
        return out

    def score(
        self, records: Sequence[dict], predictions: Sequence[Any], eval_loss: float
    ) -> EvalResult:
        preds = self.texts(records, predictions)
        refs = [self.options.answers_of(r) for r in records]
        scores = squad_em_f1(preds, refs)
        metrics = {k: v / 100.0 for k, v in scores.items() if not k.endswith("total")}
        return EvalResult(
            metrics=metrics,
            predictions=preds,
            references=[list(r["text"]) or [""] for r in refs],  # "" = no answer
            rows=list(records),
        )

    def baselines(
        self, train_records: Sequence[dict], eval_records: Sequence[dict]
    ) -> dict[str, Any]:
        """Always answering "no answer": its F1 is the share of unanswerable questions."""
        if not eval_records:
            return {}
        answers = [self.options.answers_of(r) for r in eval_records]
        scores = squad_em_f1([""] * len(eval_records), answers)
        return {"no_answer_f1": scores["f1"] / 100.0, "no_answer_exact": scores["exact"] / 100.0}
