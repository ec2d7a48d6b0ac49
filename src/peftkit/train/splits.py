"""Read a run's train / eval / test rows from files or hub names, hold out eval rows, apply limits.

::

    data.train.path exists? --yes--> read_records(path, reader options)
                            --no---> data.train.hub given? --> read_records("hf:" + hub)
    no data.eval + eval_size --> shuffle train with split_seed, the first eval_size rows are eval
    <split>.limit            --> keep the first N rows of that split (test: predict on N)

Everything here runs before any model is loaded, so a bad column or file fails in a second.
"""

from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path
from typing import Any

from ..data import read_records
from .config import ConfigError, DataSource, RunConfig, resolve_path


@dataclasses.dataclass
class Splits:
    """Rows per split, plus a line per split saying where they came from."""

    train: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    eval: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    test: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    test_total: int = 0
    origins: dict[str, str] = dataclasses.field(default_factory=dict)  # split -> file / hub id


def _reader_kwargs(source: DataSource) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    for key in ("columns", "has_header", "delimiter", "encoding", "chunk_chars"):
        value = getattr(source, key)
        if value is not None:
            kwargs[key] = value
    if source.text_split is not None:
        kwargs["split"] = source.text_split
    return kwargs


def read_source(source: DataSource, split: str, config_dir: str | None) -> tuple[list[dict], str]:
    """Rows of one split and where they came from; errors name ``data.<split>``."""
    path = resolve_path(source.path, config_dir) if source.path else None
    try:
        if path is not None:
            rows = read_records(path, format=source.format, **_reader_kwargs(source))
            origin = os.path.relpath(path) if not Path(source.path).is_absolute() else str(path)
        elif source.hub:
            rows = read_records("hf:" + source.hub)
            origin = f"hub {source.hub}" + (
                f" (local file {source.path} not found)" if source.path else ""
            )
        else:
            raise ConfigError([f"data.{split}.path: file not found: {source.path}"])
    except TypeError as exc:
        raise ConfigError(
            [
                f"data.{split}: a reader option does not apply to this file ({exc}); remove it "
                "or set data." + split + ".format"
            ]
        ) from exc
    except (ValueError, FileNotFoundError, ImportError, ConnectionError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError([f"data.{split}: {exc}"]) from exc
    return rows, origin


def load_splits(config: RunConfig, need_train: bool = True) -> Splits:
    """Read every configured split (see the module docstring)."""
    data = config.data
    config_dir = os.path.dirname(os.path.abspath(config.source)) if config.source else None
    out = Splits()
    if data.train is not None and (need_train or data.eval is None):
        rows, origin = read_source(data.train, "train", config_dir)
        if data.eval is None and data.eval_size:
            size = data.eval_size
            n_eval = int(size) if isinstance(size, int) else round(float(size) * len(rows))
            if not 0 < n_eval < len(rows):
                raise ConfigError(
                    [f"data.eval_size: {size} leaves no train or no eval rows out of {len(rows)}"]
                )
            seed = data.split_seed if data.split_seed is not None else config.seed
            order = list(range(len(rows)))
            random.Random(seed).shuffle(order)
            out.eval = [rows[i] for i in sorted(order[:n_eval])]
            out.origins["eval"] = origin
            rows = [rows[i] for i in sorted(order[n_eval:])]
            out.notes.append(f"eval: {n_eval} rows held out of {origin} (split_seed {seed})")
        total = len(rows)
        if data.train.limit is not None:
            rows = rows[: data.train.limit]
        out.train = rows
        out.origins["train"] = origin
        out.notes.insert(
            0,
            f"train: {len(rows)} rows from {origin}"
            + (f" (first {len(rows)} of {total})" if len(rows) < total else ""),
        )
    if data.eval is not None:
        rows, origin = read_source(data.eval, "eval", config_dir)
        total = len(rows)
        if data.eval.limit is not None:
            rows = rows[: data.eval.limit]
        out.eval = rows
        out.origins["eval"] = origin
        out.notes.append(
            f"eval: {len(rows)} rows from {origin}"
            + (f" (first {len(rows)} of {total}; data.eval.limit)" if len(rows) < total else "")
        )
    if data.test is not None:
        rows, origin = read_source(data.test, "test", config_dir)
        out.test_total = len(rows)
        if data.test.limit is not None:
            rows = rows[: data.test.limit]
        out.test = rows
        out.origins["test"] = origin
        note = f"test: {len(rows)} rows from {origin}"
        if len(rows) < out.test_total:
            note += (
                f" (the first {len(rows)} of {out.test_total}: data.test.limit="
                f"{data.test.limit}; set data.test.limit=null for all)"
            )
        out.notes.append(note)
    return out
