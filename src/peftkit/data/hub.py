"""Hugging Face Hub data sets by name, through the optional ``datasets`` package.

``datasets`` is imported only here and only when called, so peftkit runs without it; where
the hub cannot be reached (offline machines, ``HF_DATASETS_OFFLINE=1``), the error says so
and points at the local readers instead of surfacing a long network traceback.
"""

from __future__ import annotations

import importlib
from typing import Any

_OFFLINE_HINT = (
    "Download it where there is network access (datasets.load_dataset(...).to_json(...)) "
    "and read the local file with peftkit.data.read_records(path) instead."
)


def load_hub_dataset(
    name: str, subset: str | None = None, split: str = "train", **kwargs: Any
) -> list[dict[str, Any]]:
    """Load ``split`` of a hub data set (``datasets.load_dataset(name, subset, split=split)``).

    Args:
        name: hub id, e.g. ``"ought/raft"`` or ``"glue"``.
        subset: configuration name, e.g. ``"twitter_complaints"`` or ``"sst2"``.
        split: split name or slice (``"train[:100]"``).
        **kwargs: passed to ``datasets.load_dataset``.

    Returns:
        The rows as a list of dicts.

    Raises:
        ImportError: ``datasets`` is not installed.
        ConnectionError: the hub could not be reached and the data set is not cached.
    """
    try:
        datasets = importlib.import_module("datasets")
    except ImportError as e:
        raise ImportError(
            f"loading hub data set {name!r} needs the 'datasets' package: "
            "pip install 'peftkit[hub]' (or pip install datasets). " + _OFFLINE_HINT
        ) from e
    try:
        ds = datasets.load_dataset(name, subset, split=split, **kwargs)
    except (ConnectionError, OSError, TimeoutError) as e:
        raise ConnectionError(
            f"could not load hub data set {name!r}"
            + (f" (subset {subset!r})" if subset else "")
            + f" split {split!r}: the hub is unreachable or offline and it is not cached "
            f"({type(e).__name__}: {e}). " + _OFFLINE_HINT
        ) from e
    if hasattr(ds, "to_list"):
        return ds.to_list()
    return [dict(row) for row in ds]
