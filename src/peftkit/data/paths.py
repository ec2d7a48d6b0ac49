"""Where the project's bundled real data sets live (``../shared/data`` beside the repository)."""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "PEFTKIT_SHARED_DATA"

# src/peftkit/data/paths.py -> parents[3] is the repository root in a source checkout.
_REPO_ROOT = Path(__file__).resolve().parents[3]


def _candidates() -> list[Path]:
    cwd = Path.cwd()
    return [
        _REPO_ROOT.parent / "shared" / "data",
        cwd.parent / "shared" / "data",
        cwd / "shared" / "data",
    ]


def shared_data_dir() -> Path:
    """Folder holding the shared real data sets (``cls_sst2/``, ``ner_wnut17/``, ...).

    Looked up in this order: the ``PEFTKIT_SHARED_DATA`` environment variable, then
    ``../shared/data`` next to the repository root, then ``../shared/data`` and
    ``./shared/data`` relative to the working directory.

    Raises:
        FileNotFoundError: nothing found; the message lists every place tried.
    """
    env = os.environ.get(ENV_VAR)
    if env:
        p = Path(env).expanduser()
        if not p.is_dir():
            raise FileNotFoundError(
                f"{ENV_VAR}={env!r} is not a directory; point it at the shared data folder "
                "(the one holding cls_sst2/, ner_wnut17/, ...) or unset it."
            )
        return p
    tried = _candidates()
    for p in tried:
        if p.is_dir():
            return p.resolve()
    raise FileNotFoundError(
        "shared data folder not found; tried "
        + ", ".join(str(p) for p in tried)
        + f". Set {ENV_VAR}=/path/to/shared/data."
    )
