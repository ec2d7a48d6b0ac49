"""Row-per-record files: CSV / TSV tables and JSON Lines.

Values are returned as the strings in the file (CSV has no types); the task layer maps label
strings to ids. ``.gz`` files are read transparently.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import DataFormatError, require_file

_TAB_SUFFIXES = {".tsv", ".tab"}


def open_text(path: Path, encoding: str = "utf-8-sig") -> io.TextIOBase:
    """Open a text file for reading, gunzipping ``*.gz``; newlines kept as in the file."""
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding=encoding, newline="")
    return open(path, encoding=encoding, newline="")


def _base_suffix(path: Path) -> str:
    """``x.tsv.gz`` -> ``.tsv``; ``x.csv`` -> ``.csv``."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _guess_delimiter(path: Path, encoding: str) -> str:
    """Tab for .tsv/.tab; comma for .csv; otherwise tab if the first line has one, else comma."""
    suffix = _base_suffix(path)
    if suffix in _TAB_SUFFIXES:
        return "\t"
    if suffix == ".csv":
        return ","
    with open_text(path, encoding) as f:
        first = f.readline()
    return "\t" if "\t" in first else ","


def read_table(
    path: str | Path,
    columns: Sequence[str] | None = None,
    delimiter: str | None = None,
    has_header: bool = True,
    encoding: str = "utf-8-sig",
) -> list[dict[str, str]]:
    """Read a CSV or TSV file into one dict per row.

    CSV follows RFC 4180 quoting (fields may hold commas, quotes and newlines). TSV is read
    without any quoting, as GLUE-style files expect: a ``"`` inside a sentence is just text.

    Args:
        path: the file (``.csv``, ``.tsv``, ``.tab``, optionally ``.gz``, or no extension).
        columns: with a header, the columns to keep (in this order); without a header, the
            names of the fields (default ``col0, col1, ...``).
        delimiter: field separator; default from the extension (tab for .tsv) or the first line.
        has_header: whether the first row names the columns.
        encoding: text encoding (``utf-8-sig`` also accepts a byte-order mark).

    Example: the UCI SMS spam file is ``label<TAB>text`` without a header::

        read_table(".../SMSSpamCollection", columns=["label", "text"], has_header=False)

    Raises:
        FileNotFoundError: no such file.
        DataFormatError: a row has the wrong number of fields, or a requested column is absent.
    """
    p = require_file(path, "table file")
    delim = delimiter if delimiter is not None else _guess_delimiter(p, encoding)
    quoting = csv.QUOTE_NONE if delim == "\t" else csv.QUOTE_MINIMAL
    records: list[dict[str, str]] = []
    with open_text(p, encoding) as f:
        reader = csv.reader(f, delimiter=delim, quoting=quoting, strict=True)
        try:
            header: list[str] | None = None
            keep: list[int] | None = None
            for row in reader:
                line = reader.line_num
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue  # blank line
                if header is None:
                    if has_header:
                        header = [h.strip() for h in row]
                        keep = _select(p, header, columns)
                        continue
                    header = list(columns) if columns else [f"col{i}" for i in range(len(row))]
                    keep = list(range(len(header)))
                if len(row) != len(header):
                    raise DataFormatError(
                        p,
                        line,
                        f"expected {len(header)} fields separated by {delim!r} "
                        f"({', '.join(header)}) but found {len(row)}; fix the row, or pass "
                        "delimiter=/columns=/has_header= to match the file.",
                    )
                records.append({header[i]: row[i] for i in keep})
        except csv.Error as e:
            raise DataFormatError(p, reader.line_num, f"malformed CSV ({e}).") from e
        except UnicodeDecodeError as e:
            raise DataFormatError(
                p, None, f"not valid {encoding} text ({e}); pass encoding='latin-1' or similar."
            ) from e
    if header is None:
        raise DataFormatError(p, None, "the file is empty.")
    return records


def _select(path: Path, header: list[str], columns: Sequence[str] | None) -> list[int]:
    """Indices of the requested header columns, or all of them."""
    if columns is None:
        return list(range(len(header)))
    missing = [c for c in columns if c not in header]
    if missing:
        raise DataFormatError(
            path, 1, f"no column(s) {missing} in the header; the columns are {header}."
        )
    return [header.index(c) for c in columns]


def read_jsonl(path: str | Path, encoding: str = "utf-8-sig") -> list[dict[str, Any]]:
    """Read a JSON Lines file: one JSON object per line, blank lines ignored.

    Raises:
        FileNotFoundError: no such file.
        DataFormatError: a line is not valid JSON or not an object (names the line).
    """
    p = require_file(path, "JSON Lines file")
    records: list[dict[str, Any]] = []
    with open_text(p, encoding) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(
                    p, line_no, f"invalid JSON ({e.msg}, column {e.colno})."
                ) from e
            if not isinstance(obj, dict):
                raise DataFormatError(
                    p, line_no, f"expected a JSON object per line, got {type(obj).__name__}."
                )
            records.append(obj)
    return records


def read_json(path: str | Path, encoding: str = "utf-8-sig") -> list[dict[str, Any]]:
    """Read a ``.json`` file holding a list of objects (or ``{"data": [...]}`` around one)."""
    p = require_file(path, "JSON file")
    with open_text(p, encoding) as f:
        try:
            obj = json.load(f)
        except json.JSONDecodeError as e:
            raise DataFormatError(p, e.lineno, f"invalid JSON ({e.msg}).") from e
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
        raise DataFormatError(
            p,
            None,
            "expected a JSON list of objects (or {'data': [...]}); use read_jsonl for "
            "one object per line, read_squad for SQuAD files.",
        )
    return obj
