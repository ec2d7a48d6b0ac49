"""Extractive-QA features: each question + its context as one or more overlapping windows.

::

    question "Which region?"   context "The Normans gave ... Normandy ... France."  (row i)
        │ tokenizer(question, context, truncation="only_second", stride=doc_stride,
        │           return_overflowing_tokens=True, return_offsets_mapping=True)
        v
    window 0: [CLS] which region ? [SEP] the normans ... gave [SEP]       row=i window=0
    window 1: [CLS] which region ? [SEP] gave their ... normandy ... [SEP] row=i window=1
                                         └ doc_stride tokens shared ┘

The question is kept whole in every window; only the context is cut, into windows of
``max_length`` tokens in all, each sharing ``doc_stride`` context tokens with the one before (the
Hugging Face ``stride``). Every feature carries what decoding needs, so evaluation never
tokenizes a row again:

* ``row``: the question's index in the rows given to :func:`encode_windows`;
* ``window``: the window's number within its question (0, 1, ...);
* ``spans``: per token, its ``(first, one past last)`` characters in the ORIGINAL context, or
  None for question and special tokens (which decoding never proposes);
* ``start_positions`` / ``end_positions`` (training): the answer's first and last token when the
  whole answer lies inside the window, else both 0 (the ``[CLS]`` slot: "not in this window").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

Span = tuple[int, int]


def encode_windows(
    tokenizer: Any,
    questions: Sequence[str],
    contexts: Sequence[str],
    max_length: int,
    doc_stride: int,
) -> list[dict[str, Any]]:
    """Features (see the module docstring) of each ``questions[i]`` / ``contexts[i]`` pair.

    Raises:
        ValueError: the tokenizer is not a fast one (offsets come from it), or a question leaves
            a window no more context tokens than ``doc_stride`` (no window could advance).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            "qa needs a fast tokenizer (it maps tokens back to characters of the context); "
            "use a model folder with tokenizer.json, or set model.tokenizer to one"
        )
    if not questions:
        return []
    questions = [q.lstrip() for q in questions]  # SQuAD has questions led by runs of spaces
    _check_room(tokenizer, questions, max_length, doc_stride)
    enc = tokenizer(
        list(questions),
        list(contexts),
        truncation="only_second",
        max_length=max_length,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )
    features: list[dict[str, Any]] = []
    previous_row, window = -1, 0
    for f, ids in enumerate(enc["input_ids"]):
        row = int(enc["overflow_to_sample_mapping"][f])
        window = window + 1 if row == previous_row else 0
        previous_row = row
        spans = [
            (int(span[0]), int(span[1])) if seq == 1 else None
            for span, seq in zip(enc["offset_mapping"][f], enc.sequence_ids(f))
        ]
        feature: dict[str, Any] = {
            "input_ids": list(ids),
            "row": row,
            "window": window,
            "spans": spans,
        }
        if "token_type_ids" in enc:
            feature["token_type_ids"] = list(enc["token_type_ids"][f])
        features.append(feature)
    return features


def _check_room(tokenizer: Any, questions: Sequence[str], max_length: int, doc_stride: int) -> None:
    """ValueError when the longest question leaves a window ``<= doc_stride`` context tokens."""
    lengths = [
        len(ids) for ids in tokenizer(list(questions), add_special_tokens=False)["input_ids"]
    ]
    longest = max(range(len(lengths)), key=lengths.__getitem__)
    room = max_length - lengths[longest] - tokenizer.num_special_tokens_to_add(pair=True)
    if room <= doc_stride:
        raise ValueError(
            f"question {longest} ({questions[longest][:60]!r}) takes {lengths[longest]} tokens: "
            f"with task.max_length {max_length} each window holds {room} context tokens, which "
            f"must be more than task.doc_stride {doc_stride} (the overlap between windows); "
            "raise max_length or lower doc_stride"
        )


def window_target(spans: Sequence[Span | None], answers: Mapping[str, list]) -> tuple[int, int]:
    """Token span ``(start, end)`` of the first gold answer in this window, both ends inclusive;
    ``(0, 0)`` (the ``[CLS]`` slot) when there is no answer or it is not wholly inside."""
    if not answers["text"]:
        return 0, 0
    first = int(answers["answer_start"][0])
    last = first + len(answers["text"][0])  # one past the answer's last character
    inside = [t for t, span in enumerate(spans) if span is not None]
    if not inside or spans[inside[0]][0] > first or spans[inside[-1]][1] < last:
        return 0, 0  # (partly) outside this window: another window holds it
    start = next(t for t in inside if spans[t][1] > first)
    end = next(t for t in reversed(inside) if spans[t][0] < last)
    return start, end


def window_counts(features: Sequence[Mapping[str, Any]]) -> tuple[int, int, int]:
    """``(questions, windows, questions with more than one window)`` of ``features``."""
    per_row: dict[int, int] = {}
    for f in features:
        per_row[f["row"]] = per_row.get(f["row"], 0) + 1
    return len(per_row), len(features), sum(1 for n in per_row.values() if n > 1)
