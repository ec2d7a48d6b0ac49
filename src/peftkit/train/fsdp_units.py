"""FSDP2 sharding unit by unit, each unit's full weights released as soon as it is cut.

accelerate's ``fsdp2_prepare_model`` (with ``cpu_ram_efficient_loading`` off, as it must be
for an adapter run on a model loaded on every rank) keeps ``model.state_dict()`` alive for the
whole call: every full weight stays referenced until the last unit is sharded. For a model
memory-mapped from its checkpoint (what transformers loads) each rank then holds the pages it
read of every full weight next to its shards: the whole model's worth on a 2-rank run, which
is why FSDP2 peaked above DDP at ``prepare`` (llama-554m shape: 2,629 MB per rank vs DDP's
2,862 at its training peak, where FSDP2 should sit ~1 GB lower).

Here the same units are cut before ``accelerator.prepare`` (which then finds an
``FSDPModule`` and leaves it alone), in the same order and with the same options as
accelerate's policy::

    for each block (the plugin's transformer classes), bottom-up:
        fully_shard(block)            -> this rank's slice copied out of the file map
        drop_pages(block's old views) -> the pages read from the file are handed back
        trim the heap                 -> the allocator's holes too
    fully_shard(input embedding)      (its own unit, unless tied or vocabulary-parallel)
    fully_shard(model)                root: what is left (final norm, head), not resharded
                                      after forward, as accelerate's tail group

Invariant: after each step the rank holds its shards so far plus at most one unit's full
weights. The optimizer must be built after this (its parameters are the DTensors).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..file_pages import drop_pages
from ..heap import trim_heap


def _input_embedding(model: nn.Module) -> nn.Module | None:
    base = model
    while hasattr(base, "get_base_model") and base.get_base_model() is not base:
        base = base.get_base_model()
    getter = getattr(base, "get_input_embeddings", None)
    try:
        found = getter() if callable(getter) else None
    except (NotImplementedError, AttributeError):
        return None
    return found if isinstance(found, nn.Module) else None


def _kwargs(plugin: Any) -> dict[str, Any]:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return {
        "reshard_after_forward": plugin.reshard_after_forward,
        "offload_policy": plugin.cpu_offload,
        "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy(),
    }


def can_shard_here(plugin: Any) -> bool:
    """Whether the run's FSDP2 options are the ones this pass reproduces (otherwise
    accelerate shards the model itself)."""
    return (
        plugin is not None
        and bool(plugin.transformer_cls_names_to_wrap)
        and not plugin.cpu_ram_efficient_loading
        and not plugin.activation_checkpointing
        and plugin.ignored_modules is None
    )


def _shard(module: nn.Module | list[nn.Module], **kwargs: Any) -> None:
    from torch.distributed.fsdp import fully_shard

    modules = module if isinstance(module, list) else [module]
    old = [p.detach() for m in modules for p in m.parameters()]
    fully_shard(module, **kwargs)
    drop_pages(old)
    del old
    trim_heap()


def shard_units(model: nn.Module, plugin: Any, mixed_precision: bool = False) -> int:
    """Cut ``model`` into FSDP2 units as described in the module docstring; returns the
    number of units. Modules already sharded (tied groups) are left as they are."""
    from torch.distributed.fsdp import FSDPModule

    if mixed_precision:  # FSDP2 wants one dtype among trainable parameters: fp32 masters
        for param in model.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.to(torch.float32)
    kwargs = _kwargs(plugin)
    classes = set(plugin.transformer_cls_names_to_wrap)
    units = 0
    for module in reversed(list(model.modules())):  # children before their parents
        if module is model or isinstance(module, FSDPModule):
            continue
        if type(module).__name__ in classes:
            _shard(module, **kwargs)
            units += 1
    embed = _input_embedding(model)
    owned = list(embed.parameters(recurse=False)) if embed is not None else []
    shared = {id(p) for m in model.modules() if m is not embed for p in m.parameters(False)}
    if owned and not isinstance(embed, FSDPModule) and not any(id(p) in shared for p in owned):
        _shard(embed, **kwargs)
        units += 1
    root = {k: v for k, v in kwargs.items() if k != "reshard_after_forward"}
    _shard(model, **root)
    # fully_shard renamed the classes (FSDP<name>); accelerate looks the names up again
    plugin.transformer_cls_names_to_wrap = sorted(
        {
            type(m).__name__
            for m in model.modules()
            if type(m).__name__.removeprefix("FSDP") in classes
        }
    )
    return units + 1
