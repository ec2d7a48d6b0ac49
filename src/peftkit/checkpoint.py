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
Every write goes to a temporary file in the same folder and is renamed over the target, so a crash
mid-save leaves the previous adapter intact.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"


def _default_file_mode() -> int:
    """The mode ``open(path, "w")`` would give a new file: 0666 less the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename the temp file over ``path``.

    The temp file lives in the target's folder so the rename never crosses file systems.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(path), dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _default_file_mode())  # mkstemp makes it 0600; give it the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    atomic_write(path, write)


def save_tensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Atomic safetensors save (tensors made contiguous and un-shared first)."""
    clean = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(clean, tmp, metadata=metadata or {"format": "pt"}))


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
