"""Adapter files on disk, in HF PEFT's format, written atomically.

::

    <dir>/adapter_config.json         the config (PEFT's keys)
    <dir>/adapter_model.safetensors   adapter tensors under PEFT's names, adapter name stripped:
                                      base_model.model.<path>.lora_A.weight
                                      base_model.model.<path>.weight   (a modules_to_save copy)
    <dir>/README.md                   a model card
    <dir>/<name>/...                  adapters other than "default"

In memory the adapter name sits after the per-adapter container (``lora_A.default.weight``,
``classifier.modules_to_save.default.weight``); :func:`saved_key_map` pairs the two spellings.

Every file peftkit writes goes through :func:`atomic_file` (a temporary file in the same folder,
renamed over the target), and every folder written as a whole (a checkpoint, the best adapter,
a merged model, a converted GGUF model) through :func:`atomic_folder` (a temporary folder beside
it, swapped in): a crash mid-save leaves the previous file or folder intact, never half of one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _default_file_mode() -> int:
    """The mode ``open(path, "w")`` would give a new file: 0666 less the process umask."""
    return 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary file name to write ``path``'s content to; when the block ends, the file
    is renamed over ``path`` (given the mode ``open(path, "w")`` would), or removed on an error.

    The temp file lives in the target's folder so the rename never crosses file systems::

        with atomic_file(out / "optimizer.pt") as tmp:
            torch.save(state, tmp)
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    name = os.path.basename(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + name, dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, _default_file_mode())  # mkstemp makes it 0600; give it the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """``text`` into ``path`` (UTF-8) through :func:`atomic_file`."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)


def save_tensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict | None = None
) -> None:
    """Atomic safetensors save (tensors made contiguous and un-shared first)."""
    clean = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    with atomic_file(path) as tmp:
        save_file(clean, tmp, metadata=metadata or {"format": "pt"})


def temp_folder_for(path: str | os.PathLike, shared: bool = False, create: bool = True) -> Path:
    """A new, empty folder beside ``path`` to write its content into (see :func:`atomic_folder`).

    ``shared``: the fixed name ``.tmp-<name>`` (emptied first), for several processes that
    write parts of one folder (a sharded checkpoint: one process creates it, ``create=False``
    gives the others its name); otherwise a unique name, so concurrent writers of the same
    folder never mix their files.
    """
    path = Path(path)
    if not shared:
        path.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
    tmp = path.with_name(f".tmp-{path.name}")
    if create:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    return tmp


def replace_folder(tmp: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Swap the complete folder ``tmp`` in as ``path``; returns ``path``.

    An existing ``path`` is renamed aside first and deleted after, so at every moment ``path`` is
    the old complete folder or the new one (a crash between the two renames leaves the old one
    inside ``.old-<name>-*``).
    """
    tmp, path = Path(tmp), Path(path)
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; give it the usual mode
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".old-{path.name}-", dir=path.parent))
        os.replace(path, old / path.name)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a new folder beside ``path`` to write into; when the block ends it is swapped in as
    ``path`` (:func:`replace_folder`), or removed on an error, leaving ``path`` as it was::

        with atomic_folder(run / "best") as tmp:
            model.save_pretrained(tmp / "adapter")
    """
    tmp = temp_folder_for(path)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_folder(tmp, path)


def load_adapter_tensors(directory: str) -> dict[str, torch.Tensor]:
    """Read the adapter tensors of a folder: safetensors first, legacy ``.bin`` safely."""
    st_path = os.path.join(directory, WEIGHTS_NAME)
    bin_path = os.path.join(directory, LEGACY_WEIGHTS_NAME)
    if os.path.isfile(st_path):
        try:
            return load_file(st_path)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise ValueError(
                f"{st_path} is corrupt or truncated ({exc}); re-save the adapter or restore "
                f"the file from a backup"
            ) from exc
    if os.path.isfile(bin_path):
        try:
            state = torch.load(bin_path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle errors come in many types
            raise ValueError(
                f"{bin_path} could not be read as a plain tensor file ({exc}); peftkit only "
                f"loads .bin adapters with weights_only=True"
            ) from exc
        if not isinstance(state, dict):
            raise ValueError(f"{bin_path} does not hold a dict of tensors")
        return state
    raise FileNotFoundError(
        f"no {WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME}) in {directory!r}: is this the folder "
        f"save_pretrained() wrote?"
    )


def saved_key(key: str, adapter_name: str, dict_names: Iterable[str]) -> str | None:
    """PEFT's on-disk name for an in-memory state-dict key, or None when it is not adapter state.

    ``x.lora_A.default.weight`` -> ``x.lora_A.weight``;
    ``x.modules_to_save.default.weight`` -> ``x.weight``.
    """
    parts = key.split(".")
    for i in range(len(parts) - 1):
        if parts[i + 1] != adapter_name:
            continue
        if parts[i] in dict_names:
            return ".".join(parts[: i + 1] + parts[i + 2 :])
        if parts[i] == "modules_to_save":
            return ".".join(parts[:i] + parts[i + 2 :])
    return None


def describe_keys(keys: Iterable[str], limit: int = 5) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


MODEL_CARD = """---
library_name: peftkit
base_model: {base}
tags:
- peft
- {method}
---

# {method} adapter

An adapter for `{base}` trained with [peftkit](https://pypi.org/project/peftkit/).
It is stored in Hugging Face PEFT's format, so both libraries load it:

```python
from peftkit import PeftModel            # or: from peft import PeftModel
model = PeftModel.from_pretrained(base_model, "<this folder>")
```

- method: {method}
- task type: {task}
- trainable parameters: {trainable:,}
"""
