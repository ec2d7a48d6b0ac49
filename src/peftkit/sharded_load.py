"""A base model loaded already partitioned for DeepSpeed ZeRO-3: no rank ever holds it whole.

::

    config.json ─> skeleton on meta ─> memory for every parameter, never written
                ─> deepspeed.zero.Init(module=...): each parameter partitioned, the whole freed
                   (every rank keeps ceil(numel / world) elements of each, ``param.ds_tensor``)
    model*.safetensors ─header─> plan (every tensor's place, checked before reading any)
      for each parameter: read THIS rank's flat range of its elements straight into ds_tensor
      buffers (rotary tables, ...): read whole (they are not partitioned)
      parameters the checkpoint lacks (a new task head): gathered, initialised on rank 0
    tie_weights, generation_config, eval()

Invariant: a rank holds its partitions plus, while DeepSpeed partitions it, one whole
parameter (see :func:`_build_partitioned`); it never maps the checkpoint, and reads its
``1/world`` of every tensor with ``readinto`` straight into its partition
(:class:`~peftkit.quant.load.SafetensorsReader`; through one partition-sized buffer when a
dtype cast is needed).

Why not transformers' own ZeRO-3 path (``from_pretrained`` while an ``HfDeepSpeedConfig`` is
alive): it gathers every module whole to initialise it (rank 0 draws random values the
checkpoint then overwrites), then rank 0 maps the whole checkpoint and every module is
gathered again to copy it in; measured on a bloomz-560m shape (2 ranks, CPU) that left
1.4-1.8 GB of gathered temporaries resident per rank after a load whose partitions are
1,066 MB. Anything this loader cannot place for sure (no safetensors file, renamed keys)
raises :class:`~peftkit.quant.load.NotStreamable` before reading a weight, and the caller falls
back to transformers' path (still partitioned, just heavier).

Where partitions are in the flat tensor is DeepSpeed's documented layout: the element count is
padded to a multiple of the world size and rank ``r`` keeps elements
``[r * size, (r + 1) * size)`` with ``size = ceil(numel / world)``
(``partition_parameters.Init._partition_param``); ``tests/test_sharded_load.py`` checks
that a gathered parameter equals the checkpoint's tensor.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .heap import release_freed_memory, trim_heap
from .partitioned import is_partitioned
from .quant.load import (
    NotStreamable,
    SafetensorsReader,
    _heads,
    _model_key,
    _split_kwargs,
    checkpoint_files,
)
from .quant.model_quant import _name_matches

logger = logging.getLogger(__name__)

__all__ = ["load_zero3_partitioned", "partition_range"]


def partition_range(param: torch.Tensor) -> tuple[int, int]:
    """The flat element range ``[start, end)`` of ``param`` this rank keeps, clipped to the
    tensor (the last rank's partition may be partly or wholly padding)."""
    import torch.distributed as dist

    group = getattr(param, "ds_process_group", None)
    world = dist.get_world_size(group=group)
    rank = dist.get_rank(group=group)
    size = -(-param.ds_numel // world)
    start = min(rank * size, param.ds_numel)
    return start, min(start + size, param.ds_numel)


def _build_partitioned(
    auto_cls: Any, config: Any, dtype: torch.dtype, ds_config: dict
) -> nn.Module:
    """``auto_cls``'s model for ``config`` with every parameter partitioned, never initialised
    (the checkpoint provides the values).

    The skeleton is built on the meta device, then every parameter gets real but untouched
    memory at once (the kernel backs pages only when written), and DeepSpeed
    partitions the module (``zero.Init(module=...)``), one parameter at a time: rank 0
    broadcasts it (its pages never written: nothing resident), the others receive it into their
    copy, each keeps its partition and the whole tensor is freed. All the whole tensors were
    allocated before any was freed, so each is its own mapping that goes back to the kernel on
    free, leaving no holes in the heap; a rank holds its partitions plus one whole parameter.
    """
    import deepspeed
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False), _transformers_zero3_off():
        model = auto_cls.from_config(config, dtype=dtype)  # buffers (RoPE tables) are real
    model.tie_weights()
    _parameters_to_empty(model)
    # module by module, the heap trimmed every ~64 MB partitioned: the ranks that receive a
    # broadcast leave holes behind it that would otherwise add up to a GB on a 0.5B model
    done = 0
    for module in model.modules():
        params = [p for p in module.parameters(recurse=False) if not hasattr(p, "ds_id")]
        if not params:
            continue
        deepspeed.zero.Init(module=module, config_dict_or_path=ds_config)
        done += sum(p.ds_numel * p.element_size() for p in params)
        if done > 64 * 2**20:
            trim_heap()
            done = 0
    return model


def _parameters_to_empty(model: nn.Module) -> None:
    """Meta parameters -> CPU memory never written (a tied tensor stays one tensor). Not
    ``Module.to_empty``: that would also replace the buffers, which hold computed values."""
    made: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is None or not param.is_meta:
                continue
            if id(param) not in made:
                empty = torch.empty_like(param, device="cpu")
                made[id(param)] = nn.Parameter(empty, requires_grad=param.requires_grad)
            module._parameters[name] = made[id(param)]


@contextlib.contextmanager
def _transformers_zero3_off() -> Iterator[None]:
    """transformers builds under its own ``zero.Init`` while an ``HfDeepSpeedConfig`` of stage
    3 lives (accelerate keeps one); here the skeleton must be built on meta instead.
    ``set_zero3_state`` is transformers' own switch for "zero.Init already done"."""
    try:
        from transformers.modeling_utils import set_zero3_state
    except ImportError:  # another transformers: build as it would (the test pins this one)
        yield
        return
    with set_zero3_state():
        yield


def _plan(
    model: nn.Module, readers: list[SafetensorsReader], restored_modules: Sequence[str]
) -> tuple[list[tuple[SafetensorsReader, str, str]], list[str], list[str]]:
    """(reader, checkpoint key, model name) for every tensor placed, the parameters the
    checkpoint lacks (heads to initialise), and the checkpoint keys left unused."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, param in model.named_parameters():
        shapes[name] = tuple(param.ds_shape) if is_partitioned(param) else tuple(param.shape)
    for name, buf in model.named_buffers():
        shapes[name] = tuple(buf.shape)
    model_keys = set(shapes)
    prefix = getattr(model, "base_model_prefix", "") or ""
    plan, unused = [], []
    for reader in readers:
        for key, entry in sorted(reader.entries.items(), key=lambda kv: kv[1].start):
            name = _model_key(key, model_keys, prefix)
            if name is None:
                unused.append(key)
                continue
            if entry.shape != shapes[name]:
                raise NotStreamable(
                    f"{key} has shape {entry.shape}, the model's {name} {shapes[name]}"
                )
            plan.append((reader, key, name))
    loaded = {name for _, _, name in plan}
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    missing = []
    for names in groups.values():
        if loaded & set(names):
            continue
        missing.append(names[0])
    heads = _heads(model) | set(restored_modules)
    for name in missing:
        if not _name_matches(name.rpartition(".")[0], heads):
            raise NotStreamable(f"the checkpoint has no {name}, which is not a task head")
    return plan, missing, unused


@dataclass(frozen=True)
class FileRange:
    """Where a rank's partition of a parameter starts in its safetensors file (bytes, the
    partition's dtype and length as the parameter's ``ds_tensor``)."""

    path: Path
    offset: int

    def map(self, like: torch.Tensor) -> torch.Tensor:
        """The partition as a copy-on-write map of the file, shaped as ``like``: a page is
        read (and resident) only when something touches it."""
        import numpy as np

        size = like.numel() * like.element_size()
        raw = np.memmap(self.path, dtype=np.uint8, mode="c", offset=self.offset, shape=(size,))
        return torch.from_numpy(raw).view(like.dtype).view(like.shape)


def _read_partition(reader: SafetensorsReader, key: str, param: torch.Tensor) -> None:
    """This rank's flat range of checkpoint tensor ``key`` into ``param.ds_tensor``; the
    padding beyond the tensor's end is zeroed."""
    start, end = partition_range(param)
    local = param.ds_tensor.data.view(-1)
    count = end - start
    if count:
        reader.read_flat(key, start, local[:count])
    if count < local.numel():
        local[count:].zero_()
    entry = reader.entries[key]
    if count and count == local.numel() and entry.dtype == local.dtype:
        # where this partition lies in the file, for a frozen slice that is better mapped
        # than held (peftkit.vocab_parallel maps its embedding rows from here)
        param.ds_file_range = FileRange(reader.path, entry.start + start * local.element_size())


def _initialise_missing(model: nn.Module, missing: list[str]) -> None:
    """Heads the checkpoint lacks get the model's own initialisation, as ``from_pretrained``
    gives them: gathered (they are small), initialised on rank 0, partitioned back."""
    import deepspeed
    import torch.distributed as dist

    init = getattr(model, "_init_weights", None)
    modules = {name.rpartition(".")[0] for name in missing}
    for module_name in sorted(modules):
        module = model.get_submodule(module_name)
        params = list(module.parameters(recurse=False))
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            if dist.get_rank() == 0:
                if callable(init):
                    init(module)
                elif callable(getattr(module, "reset_parameters", None)):
                    module.reset_parameters()


@torch.no_grad()
def load_zero3_partitioned(
    folder: str | os.PathLike,
    auto_cls: Any,
    model_kw: dict[str, Any],
    ds_config: dict[str, Any],
    restored_modules: Sequence[str] = (),
) -> tuple[nn.Module, dict[str, list]]:
    """Build ``auto_cls``'s model from a safetensors folder, partitioned for ZeRO-3 from the
    start (see the module docstring).

    Args:
        folder: a model folder (``config.json`` + ``model.safetensors`` or sharded files).
        auto_cls: a transformers Auto class.
        model_kw: what ``from_pretrained`` would get: ``dtype`` and config fields
            (``num_labels``, ``id2label``...); other loading options refuse (NotStreamable).
        ds_config: the run's DeepSpeed config (stage 3).
        restored_modules: modules the caller loads next (their absence is expected).

    Returns:
        ``(model, info)`` with ``info`` as transformers' ``output_loading_info``.

    Raises:
        NotStreamable: before any weight is read, when the checkpoint cannot be placed for
            sure; the caller falls back to ``from_pretrained``.
    """
    import transformers

    files = checkpoint_files(folder)
    if not files:
        raise NotStreamable(f"no model.safetensors in {folder}")
    own, config_kw = _split_kwargs(model_kw)
    if own.get("attn_implementation") or own.get("ignore_mismatched_sizes"):
        raise NotStreamable("attn_implementation / ignore_mismatched_sizes")
    config, unused_kw = transformers.AutoConfig.from_pretrained(
        folder, return_unused_kwargs=True, local_files_only=True, **config_kw
    )
    if unused_kw:
        raise NotStreamable(f"from_pretrained options {sorted(unused_kw)}")
    if getattr(config, "quantization_config", None) is not None:
        raise NotStreamable("the checkpoint has a quantization_config")
    dtype = own.get("dtype") or torch.float32
    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype

    readers = [SafetensorsReader(f) for f in files]
    try:
        model = _build_partitioned(auto_cls, config, dtype, ds_config)
        plan, missing, unused = _plan(model, readers, restored_modules)
        params = dict(model.named_parameters())
        for reader, key, name in plan:
            if name in params and is_partitioned(params[name]):
                _read_partition(reader, key, params[name])
                continue
            module_name, _, leaf = name.rpartition(".")
            module = model.get_submodule(module_name)
            target = module._parameters.get(leaf) if leaf in module._parameters else None
            target = target if target is not None else module._buffers[leaf]
            target.data.copy_(reader.read(key).to(target.dtype))
    finally:
        for reader in readers:
            reader.close()
    if missing:
        _initialise_missing(model, missing)
    model.tie_weights()
    if model.can_generate():
        try:
            model.generation_config = transformers.GenerationConfig.from_pretrained(
                folder, local_files_only=True
            )
        except OSError:
            pass
    model.eval()
    release_freed_memory()
    info = {"missing_keys": missing, "unexpected_keys": unused, "mismatched_keys": []}
    return model, info


def local_folder(path: str) -> Path | None:
    """``path`` as a local model folder holding safetensors, else None."""
    folder = Path(path)
    return folder if folder.is_dir() and checkpoint_files(folder) else None
