"""SQuAD (v1.1 / v2.0) JSON files, flattened to one record per question.

The file nests ``data[] -> paragraphs[] -> qas[]``; the records have the flat shape of the
Hugging Face ``squad_v2`` data set, which extractive-QA preprocessing expects::

    {"id", "title", "context", "question", "answers": {"text": [...], "answer_start": [...]}}

An unanswerable question (SQuAD v2 ``is_impossible``) has empty answer lists.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import DataFormatError, require_file


def read_squad(path: str | Path, check_spans: bool = True) -> list[dict[str, Any]]:
    """Read a SQuAD JSON file into flat question records.

    Args:
        path: the JSON file.
        check_spans: verify ``context[start:start+len(text)] == text`` for every answer, so a
            wrong offset is caught here rather than as silently bad training labels.

    Raises:
        DataFormatError: not SQuAD-shaped, or an answer span does not match its context.
    """
    p = require_file(path, "SQuAD JSON file")
    try:
        with open(p, encoding="utf-8-sig") as f:
            doc = json.load(f)
    except json.JSONDecodeError as e:
        raise DataFormatError(p, e.lineno, f"invalid JSON ({e.msg}).") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise DataFormatError(
            p, None, "not a SQuAD file: expected {'data': [{'paragraphs': [{'qas': ...}]}]}."
        )
    try:
        return _flatten(doc, p, check_spans)
    except (KeyError, TypeError) as e:
        raise DataFormatError(
            p,
            None,
            f"not SQuAD-shaped: missing or bad field {e}; each question needs "
            "'id', 'question' and 'answers' [{'text', 'answer_start'}], each paragraph 'context'.",
        ) from e


def _flatten(doc: dict[str, Any], p: Path, check_spans: bool) -> list[dict[str, Any]]:
    """Walk data -> paragraphs -> qas and emit one record per question."""
    records = []
    for article in doc["data"]:
        title = article.get("title", "")
        for paragraph in article.get("paragraphs", []):
            context = paragraph["context"]
            for qa in paragraph.get("qas", []):
                answers = [] if qa.get("is_impossible", False) else qa.get("answers", [])
                texts = [a["text"] for a in answers]
                starts = [int(a["answer_start"]) for a in answers]
                if check_spans:
                    for t, s in zip(texts, starts):
                        if context[s : s + len(t)] != t:
                            raise DataFormatError(
                                p,
                                None,
                                f"question {qa.get('id')!r}: answer {t!r} is not at offset {s} "
                                f"of its context (found {context[s : s + len(t)]!r}); fix the "
                                "offset or pass check_spans=False.",
                            )
                records.append(
                    {
                        "id": qa["id"],
                        "title": title,
                        "context": context,
                        "question": qa["question"],
                        "answers": {"text": texts, "answer_start": starts},
                    }
                )
    return records
