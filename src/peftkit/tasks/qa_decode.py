"""Extractive-QA decoding: logits of every window -> one answer per question, in characters.

::

    per window (a batch of them at once)                     per question (all its windows)
    start (T,) + end (T,) logits ──> scores s_i + e_j of     WindowAnswers ──> QuestionAnswer:
      context spans i <= j < i + max_answer_tokens,            best span over ALL windows,
      the n best, mapped to characters by the feature's        null score = min over windows
      spans; null score s_0 + e_0 (the [CLS] slot)              of s_0 + e_0
                                                                 │
      v1: always the best span        v2: "" when null - best span > threshold (na score)

The character offsets come with the features (:mod:`peftkit.tasks.qa_windows`), so a question's
answer is cut from its original context without tokenizing anything again. The v2 rule and the
threshold search follow the official SQuAD v2 script (``best_f1_thresh``), with the score
difference ``null - best span`` in the role of its no-answer probability.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..metrics import _squad_normalize

Span = tuple[int, int]


@dataclasses.dataclass(frozen=True)
class WindowAnswers:
    """What one window proposes for its question.

    Attributes:
        row: the question's row index (the feature's ``row``).
        null_score: ``start[0] + end[0]``, the "no answer here" pair.
        spans: up to ``n_best`` ``(score, first char, one past last char)``, best first.
    """

    row: int
    null_score: float
    spans: tuple[tuple[float, int, int], ...]


@dataclasses.dataclass(frozen=True)
class QuestionAnswer:
    """A question's answer over all its windows.

    Attributes:
        row: the question's row index.
        span: characters of the best span in any window (None: no window had a context token).
        span_score: its ``start + end`` logit (-inf without a span).
        null_score: the lowest null score of its windows (the window most sure it holds the
            answer speaks for the question).
        windows: how many windows the question had.
    """

    row: int
    span: Span | None
    span_score: float
    null_score: float
    windows: int

    @property
    def na_score(self) -> float:
        """``null_score - span_score``: how much more "no answer" scores than the best span."""
        return self.null_score - self.span_score

    def text(self, context: str, always_answer: bool, threshold: float = 0.0) -> str:
        """The answer cut from ``context``; "" when abstaining (v2: ``na_score > threshold``)."""
        if self.span is None or (not always_answer and self.na_score > threshold):
            return ""
        return context[self.span[0] : self.span[1]]


def window_answers(
    start_logits: torch.Tensor,
    end_logits: torch.Tensor,
    features: Sequence[Mapping[str, Any]],
    max_answer_tokens: int,
    n_best: int = 20,
) -> list[WindowAnswers]:
    """The ``n_best`` spans of each window by ``start + end`` logit, in characters.

    Args:
        start_logits, end_logits: (B, T) logits of the windows' own tokens.
        features: the B windows (their ``row`` and per-token character ``spans``).
        max_answer_tokens: spans ``i <= j < i + max_answer_tokens`` only.
        n_best: how many spans to keep per window.
    """
    b, t = start_logits.shape
    start, end = start_logits.float().cpu(), end_logits.float().cpu()
    context = torch.zeros(b, t, dtype=torch.bool)  # (B, T): tokens decoding may point at
    for k, f in enumerate(features):
        context[k, : len(f["spans"])] = torch.tensor([s is not None for s in f["spans"]])
    i = torch.arange(t)
    length = i[None, :] - i[:, None]  # (T, T): j - i
    allowed = (length >= 0) & (length < max_answer_tokens)  # (T, T)
    allowed = allowed[None] & context[:, :, None] & context[:, None, :]  # (B, T, T)
    scores = start[:, :, None] + end[:, None, :]  # (B, T, T): s_i + e_j
    scores = scores.masked_fill(~allowed, -math.inf).view(b, t * t)
    top, where = scores.topk(min(n_best, t * t), dim=1)  # (B, n)
    out = []
    for k, f in enumerate(features):
        spans = f["spans"]
        best = []
        for score, flat in zip(top[k].tolist(), where[k].tolist()):
            if score == -math.inf:
                break
            first, last = divmod(flat, t)
            best.append((score, spans[first][0], spans[last][1]))
        null = float(start[k, 0] + end[k, 0])
        out.append(WindowAnswers(int(f["row"]), null, tuple(best)))
    return out


def question_answers(decoded: Sequence[WindowAnswers]) -> dict[int, QuestionAnswer]:
    """Row index -> the question's answer over all its windows (rows in first-seen order)."""
    grouped: dict[int, list[WindowAnswers]] = {}
    for w in decoded:
        grouped.setdefault(w.row, []).append(w)
    out = {}
    for row, windows in grouped.items():
        spans = [s for w in windows for s in w.spans]
        score, first, last = max(spans, key=lambda s: s[0]) if spans else (-math.inf, 0, 0)
        out[row] = QuestionAnswer(
            row=row,
            span=(first, last) if spans else None,
            span_score=score,
            null_score=min(w.null_score for w in windows),
            windows=len(windows),
        )
    return out


# --- the lexical baseline --------------------------------------------------------------------

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_QUESTION_WORDS = frozenset(
    "what which who whom whose when where why how is are was were be been do does did the a an "
    "of in on at to for from by with as and or that this it its many much".split()
)


def sentence_overlap_answer(question: str, context: str) -> str:
    """The context sentence sharing the most (SQuAD-normalised, non-question) words with the
    question; the first such sentence on ties. A lexical baseline: no model, no training."""
    asked = set(_squad_normalize(question).split()) - _QUESTION_WORDS
    best, best_overlap = "", -1
    for sentence in _SENTENCE_END.split(context.strip()):
        overlap = len(asked & set(_squad_normalize(sentence).split()))
        if overlap > best_overlap:
            best, best_overlap = sentence, overlap
    return best
