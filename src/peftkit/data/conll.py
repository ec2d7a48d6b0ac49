"""CoNLL-style token files for token classification (NER).

One token per line, the token first and its tag last, columns split by tabs (or by
whitespace when a line has no tab); a blank or whitespace-only line ends a sentence;
``-DOCSTART-`` lines are skipped::

    Empire    B-location
    State     I-location
              <- blank line: next sentence
"""

from __future__ import annotations

from pathlib import Path

from .errors import DataFormatError, require_file
from .tables import open_text


def read_conll(
    path: str | Path, token_col: int = 0, tag_col: int = -1, encoding: str = "utf-8"
) -> list[dict[str, list[str]]]:
    """Read a CoNLL file into ``[{"tokens": [...], "tags": [...]}, ...]``, one per sentence.

    Args:
        path: the file (e.g. WNUT-17's ``wnut17train.conll``).
        token_col: column of the token (default first).
        tag_col: column of the tag (default last, which also fits CoNLL-2003's 4 columns).
        encoding: text encoding.

    Raises:
        DataFormatError: a token line with a single column (names the line).
    """
    p = require_file(path, "CoNLL file")
    sentences: list[dict[str, list[str]]] = []
    tokens: list[str] = []
    tags: list[str] = []

    def flush() -> None:
        if tokens:
            sentences.append({"tokens": list(tokens), "tags": list(tags)})
            tokens.clear()
            tags.clear()

    with open_text(p, encoding) as f:
        for line_no, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                flush()
                continue
            fields = line.split("\t") if "\t" in line else line.split()
            if fields[0].startswith("-DOCSTART-"):
                flush()
                continue
            if len(fields) < 2:
                raise DataFormatError(
                    p,
                    line_no,
                    f"expected 'token<TAB>tag' but found one column {line[:60]!r}; "
                    "separate sentences with an empty line.",
                )
            try:
                tokens.append(fields[token_col])
                tags.append(fields[tag_col].strip())
            except IndexError as e:
                raise DataFormatError(
                    p,
                    line_no,
                    f"has {len(fields)} columns; token_col={token_col}, "
                    f"tag_col={tag_col} do not fit.",
                ) from e
    flush()
    return sentences
