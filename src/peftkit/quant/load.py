"""Quantise while loading: a 4-bit model straight from safetensors, one tensor at a time.

::

    config.json --from_config, parameters on meta--> skeleton (no weight memory; buffers real)
    model*.safetensors --header only--> names, dtypes, shapes, offsets --> plan (checked first)
      for each tensor, in file order:  read its bytes into a private buffer  (one tensor)
        target Linear weight  -> cast to dtype -> quantize_4bit (on ``device``) -> Linear4bit
        anything else         -> cast to dtype -> assigned as it is (owned, not mapped)
    tie_weights, missing heads initialised, generation_config, eval()

Why not ``from_pretrained`` then :func:`~peftkit.quant.quantize_model`: transformers maps the
checkpoint file and the tensors it keeps unquantised (embeddings, norms, the output head) are
views of that mapping, so every page the quantisation pass reads stays resident (file-backed
RSS) for the life of the model: a 1.1B bf16 checkpoint held 2,992 MB of RSS for 727 MB of
tensors. Here the file is never mapped: each tensor is read with ``readinto`` into memory the
model owns, so RSS after the load is the 4-bit model, and at any moment during it the 4-bit
layers done so far plus one full-precision tensor (and the quantisation's temporaries).

The result is the one :func:`~peftkit.quant.quantize_model` gives on a model loaded in memory
(same codes, same statistics, bit for bit): the same targets (:func:`quantization_targets`),
the same cast to ``dtype`` before quantising, the same :func:`~peftkit.quant.quantize_4bit`.

Checkpoint keys map onto the model's as transformers maps them in the common cases (same name,
base-model prefix added or dropped). Anything this loader cannot place for sure (no safetensors
file, a renamed or reshaped tensor, config options it does not handle) raises
:class:`NotStreamable` *before* any weight is read; :func:`load_4bit` then falls back to
``from_pretrained`` + ``quantize_model`` and says why in the log.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..heap import release_freed_memory, trim_heap
from .linear4bit import Linear4bit, check_layer_args
from .model_quant import (
    DEFAULT_SKIP_NAMES,
    _name_matches,
    _set_submodule,
    mark_quantized,
    quantization_targets,
    quantize_model,
)

__all__ = ["NotStreamable", "SafetensorsReader", "checkpoint_files", "load_4bit", "load_quantized"]

logger = logging.getLogger(__name__)

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
# Keys transformers drops without a word (old checkpoints kept these buffers).
_IGNORED_UNEXPECTED = (r"rotary_emb\.inv_freq", r"(^|\.)position_ids$", r"\.masked_bias$")
# Extra model kwargs this loader understands (everything else goes to the config or refuses).
_MODEL_KW = ("local_files_only", "dtype", "attn_implementation", "ignore_mismatched_sizes")


class NotStreamable(Exception):
    """This checkpoint cannot be loaded tensor by tensor here; the message says why."""


@dataclass(frozen=True)
class _Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


class SafetensorsReader:
    """Reads single tensors of a ``.safetensors`` file into memory the caller owns.

    The format: 8 bytes little-endian header length, a JSON header ``{name: {dtype, shape,
    data_offsets: [begin, end]}}`` (offsets relative to the end of the header), then the
    bytes. Nothing is memory-mapped, so nothing read stays resident once its tensor is freed.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(length))
        base = 8 + length
        self.entries: dict[str, _Entry] = {}
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            if meta["dtype"] not in _DTYPES:
                raise NotStreamable(f"{self.path.name}: tensor {name} has dtype {meta['dtype']}")
            begin, end = meta["data_offsets"]
            dtype, shape = _DTYPES[meta["dtype"]], tuple(meta["shape"])
            if end - begin != math.prod(shape) * dtype.itemsize:
                raise NotStreamable(f"{self.path.name}: tensor {name} has a corrupt header entry")
            self.entries[name] = _Entry(dtype, shape, base + begin, base + end)
        self._fh = open(self.path, "rb")  # noqa: SIM115 - closed by close()

    def read(self, name: str) -> torch.Tensor:
        """The tensor ``name`` in a fresh CPU buffer (its stored dtype and shape)."""
        entry = self.entries[name]
        out = torch.empty(entry.end - entry.start, dtype=torch.uint8)
        self._fh.seek(entry.start)
        if self._fh.readinto(out.numpy()) != out.numel():
            raise OSError(f"{self.path}: file ends inside tensor {name}")
        return out.view(entry.dtype).view(entry.shape)

    def read_flat(self, name: str, start: int, out: torch.Tensor) -> None:
        """Elements ``[start, start + out.numel())`` of tensor ``name`` in row-major order into
        the 1-D CPU tensor ``out`` (a rank's partition: the rest is not read). Straight into
        ``out``'s memory when the dtypes agree, through one buffer of its size otherwise."""
        entry = self.entries[name]
        size, count = entry.dtype.itemsize, out.numel()
        if start < 0 or entry.start + (start + count) * size > entry.end:
            raise ValueError(f"{self.path.name}: elements {start}+{count} outside tensor {name}")
        same = out.dtype == entry.dtype and out.is_contiguous() and out.device.type == "cpu"
        raw = out.view(torch.uint8) if same else torch.empty(count * size, dtype=torch.uint8)
        self._fh.seek(entry.start + start * size)
        if self._fh.readinto(raw.numpy()) != raw.numel():
            raise OSError(f"{self.path}: file ends inside tensor {name}")
        if not same:
            out.copy_(raw.view(entry.dtype))

    def close(self) -> None:
        self._fh.close()


def checkpoint_files(folder: str | os.PathLike) -> list[Path] | None:
    """The safetensors files of a model folder (one file or an index's shards), or None."""
    folder = Path(folder)
    if (folder / SAFE_WEIGHTS).is_file():
        return [folder / SAFE_WEIGHTS]
    if (folder / SAFE_INDEX).is_file():
        weight_map = json.loads((folder / SAFE_INDEX).read_text())["weight_map"]
        return [folder / name for name in dict.fromkeys(weight_map.values())]
    return None


def _cached_folder(repo_id: str) -> Path | None:
    """The local snapshot folder of a hub id whose safetensors are in the HF cache."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for name in (SAFE_WEIGHTS, SAFE_INDEX):
        found = try_to_load_from_cache(repo_id, name)
        if isinstance(found, str):
            folder = Path(found).parent
            files = checkpoint_files(folder)
            if files and all(f.is_file() for f in files):
                return folder
    return None


def _model_key(key: str, model_keys: set[str], prefix: str) -> str | None:
    """The model's name for checkpoint key ``key``: the same, or with the base-model prefix
    added (checkpoint of the bare base model) or dropped (a head model's checkpoint loaded
    into the bare base model); None if neither exists."""
    if key in model_keys:
        return key
    if prefix and f"{prefix}.{key}" in model_keys:
        return f"{prefix}.{key}"
    if prefix and key.startswith(prefix + ".") and key[len(prefix) + 1 :] in model_keys:
        return key[len(prefix) + 1 :]
    return None


def _heads(model: nn.Module) -> set[str]:
    """Module names that are task heads (may be missing from a checkpoint and initialised)."""
    heads = set(DEFAULT_SKIP_NAMES)
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if module is head:
            heads.add(name)
    return heads


def _assign(model: nn.Module, key: str, value: torch.Tensor) -> None:
    module_name, _, leaf = key.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._parameters:
        old = module._parameters[leaf]
        module._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        module._buffers[leaf] = value


def _split_kwargs(model_kw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    model_kw = dict(model_kw)
    own = {k: model_kw.pop(k) for k in _MODEL_KW if k in model_kw}
    return own, model_kw  # the rest belongs to the config (num_labels, id2label, ...)


@torch.no_grad()
def load_quantized(
    folder: str | os.PathLike,
    auto_cls: Any,
    model_kw: dict[str, Any] | None = None,
    *,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
    blocksize: int = 64,
    skip_modules: Iterable[str] | None = None,
    device: torch.device | str | None = None,
    restored_modules: Sequence[str] = (),
) -> tuple[nn.Module, dict[str, list]]:
    """Build ``auto_cls``'s model from a safetensors folder with Linear layers in 4 bits.

    Args:
        folder: a model folder (``config.json`` + ``model.safetensors`` or sharded files).
        auto_cls: a transformers Auto class (``AutoModelForCausalLM``...).
        model_kw: what ``from_pretrained`` would get: ``dtype`` (default float32; ``"auto"``:
            the config's), ``attn_implementation``, ``ignore_mismatched_sizes``, and config
            fields (``num_labels``, ``id2label``...).
        quant_type, double_quant, compute_dtype, blocksize, skip_modules: as
            :func:`~peftkit.quant.quantize_model`.
        device: where weights are quantised and kept (e.g. ``"cuda"``: each tensor is moved
            there as it is read and quantised on the device); default CPU.
        restored_modules: modules the caller loads next (their absence is expected).

    Returns:
        ``(model, info)`` with ``info`` as transformers' ``output_loading_info``
        (``missing_keys``, ``unexpected_keys``, ``mismatched_keys``).

    Raises:
        NotStreamable: before any weight is read, when the checkpoint cannot be placed for
            sure (see the module docstring); the caller falls back to ``from_pretrained``.
    """
    import transformers
    from accelerate import init_empty_weights

    check_layer_args(quant_type, blocksize, compute_dtype)
    files = checkpoint_files(folder)
    if not files:
        raise NotStreamable(f"no {SAFE_WEIGHTS} in {folder}")
    own, config_kw = _split_kwargs(model_kw or {})
    config, unused = transformers.AutoConfig.from_pretrained(
        folder, return_unused_kwargs=True, local_files_only=True, **config_kw
    )
    if unused:
        raise NotStreamable(f"from_pretrained options {sorted(unused)}")
    if getattr(config, "quantization_config", None) is not None:  # already quantised: refused
        raise NotStreamable("the checkpoint has a quantization_config")
    dtype = own.get("dtype") or torch.float32
    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    device = torch.device(device or "cpu")

    # 1. the skeleton: parameters on meta (no memory), buffers (rotary tables) computed for real
    build_kw = {"dtype": dtype}
    if own.get("attn_implementation"):
        build_kw["attn_implementation"] = own["attn_implementation"]
    with init_empty_weights(include_buffers=False):
        model = auto_cls.from_config(config, **build_kw)
    if getattr(model, "_keep_in_fp32_modules_strict", None) or (
        dtype == torch.float16 and getattr(model, "_keep_in_fp32_modules", None)
    ):
        raise NotStreamable(f"{type(model).__name__} keeps some modules in float32")
    model.tie_weights()
    targets = set(quantization_targets(model, skip_modules, blocksize))

    # 2. the plan, from the headers alone: every tensor's place, checked before reading any
    readers = [SafetensorsReader(f) for f in files]
    try:
        plan, info = _plan(model, readers, targets, own, restored_modules)
        # 3. the weights, one tensor at a time, in file order
        done = 0
        where = {name: (reader, key) for reader, key, name in plan}
        for reader, key, name in plan:
            module_name, _, leaf = name.rpartition(".")
            if module_name in targets and leaf == "bias":
                continue  # read with its weight below
            value = reader.read(key).to(device=device)
            if module_name in targets:
                bias = where.get(f"{module_name}.bias")
                if bias is not None:
                    bias = nn.Parameter(bias[0].read(bias[1]).to(device=device, dtype=dtype))
                if not (dtype == torch.float32 or value.dtype == dtype):
                    value = value.to(dtype)  # a narrowing cast rounds: quantise what it gives
                layer = Linear4bit.from_weight(
                    value,  # a widening cast to float32 happens chunk by chunk inside
                    bias,
                    quant_type,
                    double_quant,
                    compute_dtype,
                    blocksize,
                    name=module_name,
                    transposed=not isinstance(model.get_submodule(module_name), nn.Linear),
                    weight_dtype=dtype,
                )
                _set_submodule(model, module_name, layer)
            else:
                old = _tensor(model, name)  # meta parameter / real buffer: its dtype counts
                if value.is_floating_point() and old.is_floating_point():
                    value = value.to(old.dtype)
                _assign(model, name, value)
            done += value.numel() * value.element_size()
            del value
            if done > 16 * 2**20:  # every ~16 MB read: give the freed temporaries back
                trim_heap()  # no cycles form per tensor: the full collection runs once, at the end
                done = 0
    finally:
        for reader in readers:
            reader.close()

    # 4. what from_pretrained does after the weights: ties, missing heads, generation config
    model.tie_weights()
    _initialise_missing(model, device)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # cannot happen when the plan is right; never hand out a half-loaded model
        raise RuntimeError(f"weights left unloaded: {left[:5]}")
    if device.type != "cpu":
        model.to(device)  # the buffers built on the CPU (Linear4bit statistics are not cast)
    if model.can_generate():
        try:
            model.generation_config = transformers.GenerationConfig.from_pretrained(
                folder, local_files_only=True
            )
        except OSError:
            pass
    mark_quantized(model, quant_type, double_quant, blocksize, compute_dtype, sorted(targets))
    model.eval()
    release_freed_memory()
    return model, info


def _tensor(model: nn.Module, name: str) -> torch.Tensor:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    return module._parameters[leaf] if leaf in module._parameters else module._buffers[leaf]


def _plan(
    model: nn.Module,
    readers: list[SafetensorsReader],
    targets: set[str],
    own: dict[str, Any],
    restored_modules: Sequence[str],
) -> tuple[list[tuple[SafetensorsReader, str, str]], dict[str, list]]:
    """(reader, checkpoint key, model key) in file order, and the loading info; raises
    NotStreamable for a checkpoint this loader cannot place for sure."""
    shapes = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    model_keys = set(shapes)
    prefix = getattr(model, "base_model_prefix", "") or ""
    ignored = list(_IGNORED_UNEXPECTED) + list(
        getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []
    )
    ignore = re.compile("|".join(f"({p})" for p in ignored))
    plan, unexpected, mismatched = [], [], []
    for reader in readers:
        for key, entry in sorted(reader.entries.items(), key=lambda kv: kv[1].start):
            name = _model_key(key, model_keys, prefix)
            if name is None:
                if not ignore.search(key):
                    unexpected.append(key)
                continue
            if entry.shape != shapes[name]:
                module_name = name.rpartition(".")[0]
                if module_name in targets or not own.get("ignore_mismatched_sizes"):
                    raise NotStreamable(
                        f"{key} has shape {entry.shape}, the model's {name} {shapes[name]}"
                    )
                mismatched.append((name, entry.shape, shapes[name]))
                continue
            plan.append((reader, key, name))
    loaded = {name for _, _, name in plan}
    # names of one tied tensor: loaded if any of them is
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    tied_loaded = {n for names in groups.values() if loaded & set(names) for n in names}
    params = {n for names in groups.values() for n in names}
    missing = sorted(params - loaded - tied_loaded - {m[0] for m in mismatched})
    heads = _heads(model) | set(restored_modules)
    for name in missing + [m[0] for m in mismatched]:
        module_name = name.rpartition(".")[0]
        if module_name in targets:
            raise NotStreamable(f"the checkpoint has no {name} (renamed keys?)")
        if not _name_matches(module_name, heads):
            raise NotStreamable(f"the checkpoint has no {name}, which is not a task head")
    info = {"missing_keys": missing, "unexpected_keys": unexpected, "mismatched_keys": mismatched}
    return plan, info


def _initialise_missing(model: nn.Module, device: torch.device) -> None:
    """Give parameters the checkpoint lacked (a new task head) memory and the model's own
    initialisation, as ``from_pretrained`` does."""
    modules = []
    for module in model.modules():
        fresh = [k for k, p in module._parameters.items() if p is not None and p.is_meta]
        if not fresh:
            continue
        for k, p in module._parameters.items():
            if p is None:
                continue
            if k in fresh:
                module._parameters[k] = nn.Parameter(
                    torch.empty_like(p, device=device), requires_grad=p.requires_grad
                )
            else:
                p._is_hf_initialized = True  # loaded: transformers' init leaves it alone
        modules.append(module)
    init = getattr(model, "_init_weights", None)
    for module in modules:
        if callable(init):
            init(module)
        elif callable(getattr(module, "reset_parameters", None)):
            module.reset_parameters()


def load_4bit(
    auto_cls: Any,
    path: str,
    model_kw: dict[str, Any],
    quant_type: str,
    *,
    load_plain: Callable[[], nn.Module],
    report: Callable[[nn.Module, dict[str, list]], None],
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    restored_modules: Sequence[str] = (),
) -> nn.Module:
    """What ``models.load_base_model`` calls for a 4-bit model: :func:`load_quantized` from the
    folder (or the hub id's cached snapshot); where it cannot, ``load_plain()`` (transformers'
    ``from_pretrained``) then :func:`~peftkit.quant.quantize_model`, with the reason logged.
    ``report(model, info)`` tells the load's missing / unused weights."""
    folder = Path(path) if Path(path).is_dir() else _cached_folder(path)
    reason = "the model is not a local folder or a cached hub snapshot"
    if folder is not None:
        try:
            model, info = load_quantized(
                folder,
                auto_cls,
                model_kw,
                quant_type=quant_type,
                double_quant=double_quant,
                compute_dtype=compute_dtype,
                device=device,
                restored_modules=restored_modules,
            )
        except NotStreamable as e:
            reason = str(e)
        else:
            report(model, info)
            return model
    logger.info(
        "4-bit: loading %s in full precision, then quantising (%s): the load holds the whole "
        "full-precision model for a while",
        path,
        reason,
    )
    model = load_plain()
    quantize_model(model, quant_type, double_quant, compute_dtype)
    if device is not None:
        model.to(device)
    return model
