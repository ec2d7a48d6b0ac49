"""``read_records``: one entry point that picks the right reader for a path or hub spec.

::

    "hf:glue/sst2"  or {"hub": ...}  -> load_hub_dataset
    dir/<class>/*.jpg                -> read_image_folder
    dir/*.jpg (no sub-folders)       -> read_image_files (rows without labels: DreamBooth)
    *-images-idx3-ubyte[.gz]         -> read_idx (labels file found beside it)
    .csv .tsv .tab [.gz]             -> read_table
    .jsonl .ndjson                   -> read_jsonl
    .json                            -> read_squad if SQuAD-shaped, else read_json
    .conll .conllu .bio .iob         -> read_conll
    .txt .tokens .raw                -> read_financial_phrasebank if every line ends in
                                        @negative/@neutral/@positive, else read_text
    anything else                    -> read_conll if it looks like token<TAB>tag lines
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .conll import read_conll
from .hub import load_hub_dataset
from .images import IMAGE_SUFFIXES, read_idx, read_image_files, read_image_folder
from .squad import read_squad
from .tables import _base_suffix, open_text, read_json, read_jsonl, read_table
from .text import PHRASEBANK_LABELS, read_financial_phrasebank, read_text

HUB_PREFIX = "hf:"

READERS = {
    "table": read_table,
    "jsonl": read_jsonl,
    "json": read_json,
    "squad": read_squad,
    "conll": read_conll,
    "text": read_text,
    "phrasebank": read_financial_phrasebank,
    "image_folder": read_image_folder,
    "image_files": read_image_files,
    "idx": read_idx,
}

_TAG = re.compile(r"^(O|[BIESLU]-\S+)$")


def parse_hub_spec(spec: str) -> dict[str, str | None]:
    """``"hf:NAME[:SUBSET][@SPLIT]"`` -> ``{"name", "subset", "split"}`` (split default train).

    Example: ``"hf:ought/raft:twitter_complaints@train"``.
    """
    body = spec[len(HUB_PREFIX) :]
    body, _, split = body.partition("@")
    name, _, subset = body.partition(":")
    if not name:
        raise ValueError(f"empty hub data set name in {spec!r}; write 'hf:NAME[:SUBSET][@SPLIT]'.")
    return {"name": name, "subset": subset or None, "split": split or "train"}


def read_records(
    path_or_spec: str | Path | Mapping[str, Any], format: str | None = None, **kwargs: Any
) -> list[dict[str, Any]]:
    """Read a data set from a file, a folder or a hub spec, choosing the reader by its shape.

    Args:
        path_or_spec: a path; ``"hf:NAME[:SUBSET][@SPLIT]"``; or a mapping
            ``{"hub": NAME, "subset": ..., "split": ...}``.
        format: force a reader instead of guessing: one of ``READERS`` (``"table"``,
            ``"jsonl"``, ``"json"``, ``"squad"``, ``"conll"``, ``"text"``, ``"phrasebank"``,
            ``"image_folder"``, ``"idx"``) or ``"hub"``.
        **kwargs: passed to the chosen reader (e.g. ``columns=``, ``has_header=``).

    Raises:
        FileNotFoundError: the path does not exist (with a hint about ``hf:`` specs).
        ValueError: the format cannot be told from the path; pass ``format=``.
    """
    if isinstance(path_or_spec, Mapping):
        spec = dict(path_or_spec)
        if "hub" not in spec:
            raise ValueError(f"data spec {spec} has no 'hub' key; pass a path or {{'hub': NAME}}.")
        return load_hub_dataset(spec.pop("hub"), **spec, **kwargs)
    text = str(path_or_spec)
    if format == "hub" or text.startswith(HUB_PREFIX):
        hub = parse_hub_spec(text if text.startswith(HUB_PREFIX) else HUB_PREFIX + text)
        return load_hub_dataset(hub.pop("name"), **hub, **kwargs)
    path = Path(text).expanduser()
    if format is not None:
        if format not in READERS:
            raise ValueError(f"unknown format {format!r}; use one of {sorted(READERS)} or 'hub'.")
        if format == "idx":
            return read_idx(path, kwargs.pop("labels", None) or _idx_labels(path))
        return READERS[format](path, **kwargs)
    if not path.exists():
        raise FileNotFoundError(
            f"data not found: {path} (resolved to {path.resolve()}). For a Hugging Face Hub "
            f"data set write '{HUB_PREFIX}NAME[:SUBSET][@SPLIT]'."
        )
    if path.is_dir():
        return _read_dir(path, **kwargs)
    name = path.name.lower()
    if "idx3-ubyte" in name:
        return read_idx(path, kwargs.pop("labels", None) or _idx_labels(path))
    suffix = _base_suffix(path)
    if suffix in (".csv", ".tsv", ".tab"):
        return read_table(path, **kwargs)
    if suffix in (".jsonl", ".ndjson"):
        return read_jsonl(path, **kwargs)
    if suffix == ".json":
        return read_squad(path, **kwargs) if _is_squad(path) else read_json(path, **kwargs)
    if suffix in (".conll", ".conllu", ".bio", ".iob"):
        return read_conll(path, **kwargs)
    if suffix in (".txt", ".tokens", ".raw"):
        if _is_phrasebank(path):
            return read_financial_phrasebank(path, **kwargs)
        return read_text(path, **kwargs)
    if _looks_like_conll(path):
        return read_conll(path, **kwargs)
    raise ValueError(
        f"cannot tell the format of {path}; pass format= (one of {sorted(READERS)}), e.g. "
        "read_records(path, format='table', columns=['label', 'text'], has_header=False)."
    )


def _read_dir(path: Path, **kwargs: Any) -> list[dict[str, Any]]:
    """A folder is an image-class tree, a plain folder of images, or holds exactly one idx
    images file."""
    idx = sorted(path.glob("*images-idx3-ubyte*"))
    if len(idx) == 1:
        return read_idx(idx[0], _idx_labels(idx[0]))
    if any(d.is_dir() and not d.name.startswith(".") for d in path.iterdir()):
        return read_image_folder(path, **kwargs)
    if any(f.suffix.lower() in IMAGE_SUFFIXES for f in path.iterdir() if f.is_file()):
        return read_image_files(path, **kwargs)
    raise ValueError(
        f"{path} is a folder but neither <class>/<image> sub-folders, images, nor one idx "
        "images file; name the file to read instead."
    )


def _idx_labels(images: Path) -> Path | None:
    """MNIST naming: ``X-images-idx3-ubyte[.gz]`` pairs with ``X-labels-idx1-ubyte[.gz]``."""
    stem = images.name.removesuffix(".gz").replace("images-idx3", "labels-idx1")
    if stem == images.name.removesuffix(".gz"):
        return None
    for name in (stem + ".gz", stem):
        if (images.parent / name).exists():
            return images.parent / name
    return None


def _is_squad(path: Path) -> bool:
    """A JSON object whose ``data`` list holds articles with ``paragraphs``."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            doc = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False  # let read_json report the error with a line number
    data = doc.get("data") if isinstance(doc, dict) else None
    return (
        isinstance(data, list)
        and bool(data)
        and isinstance(data[0], dict)
        and "paragraphs" in data[0]
    )


def _head_lines(path: Path, n: int = 50) -> list[str]:
    """First ``n`` non-blank lines, decoded leniently (only used for sniffing)."""
    out = []
    with open_text(path, "latin-1") as f:
        for line in f:
            if line.strip():
                out.append(line.rstrip("\r\n"))
                if len(out) == n:
                    break
    return out


def _is_phrasebank(path: Path) -> bool:
    lines = _head_lines(path)
    return bool(lines) and all(
        line.rpartition("@")[2].strip() in PHRASEBANK_LABELS for line in lines
    )


def _looks_like_conll(path: Path) -> bool:
    lines = _head_lines(path)
    if not lines:
        return False
    for line in lines:
        fields = line.split("\t") if "\t" in line else line.split()
        if fields[0].startswith("-DOCSTART-"):
            continue
        if len(fields) < 2 or not _TAG.match(fields[-1].strip()):
            return False
    return True
