"""Plain-text files: raw corpora for causal LM, and the ``sentence@label`` Financial PhraseBank."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from .errors import DataFormatError, require_file
from .tables import open_text

PHRASEBANK_LABELS = ("negative", "neutral", "positive")


def read_text(
    path: str | Path,
    split: Literal["file", "line", "paragraph"] = "file",
    chunk_chars: int | None = None,
    keep_empty: bool = False,
    encoding: str = "utf-8",
) -> list[dict[str, str]]:
    """Read a plain text file as ``[{"text": ...}, ...]``.

    Causal-LM corpora come in two shapes: one long text (tiny Shakespeare), tokenised later
    into fixed blocks, or one document per line (wikitext). ``split`` picks the unit;
    ``chunk_chars`` then cuts each unit into consecutive pieces of at most that many
    characters (the last may be shorter), which keeps tokenisation of a 1 MB file cheap.

    Args:
        path: the text file (``.gz`` is gunzipped).
        split: ``"file"`` (one record), ``"line"`` or ``"paragraph"`` (blank-line separated).
        chunk_chars: if set, split each unit into chunks of this many characters.
        keep_empty: keep empty / whitespace-only lines or paragraphs (default: drop them).
        encoding: text encoding.
    """
    if split not in ("file", "line", "paragraph"):
        raise ValueError(f"read_text: split={split!r}; use 'file', 'line' or 'paragraph'.")
    if chunk_chars is not None and chunk_chars <= 0:
        raise ValueError(f"read_text: chunk_chars must be a positive int, got {chunk_chars}.")
    p = require_file(path, "text file")
    try:
        with open_text(p, encoding) as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise DataFormatError(p, None, f"not valid {encoding} text ({e}); pass encoding=.") from e
    text = text.replace("\r\n", "\n")
    if split == "file":
        units = [text]
    elif split == "line":
        units = text.split("\n")
        if units and units[-1] == "":
            units.pop()  # the final newline does not start another line
    else:
        units = [u.strip("\n") for u in _paragraphs(text)]
    if not keep_empty:
        units = [u for u in units if u.strip()]
    if chunk_chars is None:
        return [{"text": u} for u in units]
    return [
        {"text": u[i : i + chunk_chars]}
        for u in units
        for i in range(0, max(len(u), 1), chunk_chars)
    ]


def _paragraphs(text: str) -> list[str]:
    """Split on lines that are empty or whitespace only."""
    out, cur = [], []
    for line in text.split("\n"):
        if line.strip():
            cur.append(line)
        elif cur:
            out.append("\n".join(cur))
            cur = []
    if cur:
        out.append("\n".join(cur))
    return out


def read_financial_phrasebank(
    path: str | Path, encoding: str | None = None
) -> list[dict[str, str]]:
    """Read a Financial PhraseBank file: one ``sentence@label`` per line.

    The label is after the last ``@`` and is one of negative / neutral / positive. The
    ``Sentences_AllAgree.txt`` file is UTF-8 while the 50/66/75Agree files are Latin-1, so by
    default the file is decoded as UTF-8 when it is valid UTF-8 and as Latin-1 otherwise.

    Returns:
        ``[{"sentence": str, "label": str}, ...]``

    Raises:
        DataFormatError: a line without ``@`` or with an unknown label (names the line).
    """
    p = require_file(path, "Financial PhraseBank file")
    raw = p.read_bytes()
    if encoding is None:
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
    else:
        text = raw.decode(encoding)
    records = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        sentence, at, label = line.rpartition("@")
        label = label.strip()
        if not at or label not in PHRASEBANK_LABELS:
            raise DataFormatError(
                p,
                line_no,
                f"expected 'sentence@label' with label in {PHRASEBANK_LABELS}, got {line[:80]!r}.",
            )
        records.append({"sentence": sentence.strip(), "label": label})
    return records
