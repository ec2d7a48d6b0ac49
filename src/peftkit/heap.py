"""Handing freed C-heap pages back to the kernel, so resident memory follows live tensors.

Tensors on the CPU live in glibc's heap. A freed block stays resident until the heap's top
shrinks past it, and a training step frees and re-allocates activations of many sizes, so the
heap keeps holes: pages the process no longer uses but still holds. The allocation pattern
decides how many, which is why two runs with the same live tensors can peak ~100-200 MB
apart (LoRA and QLoRA steps on SmolLM2, README "QLoRA memory"). ``malloc_trim(0)`` returns
every free page to the kernel (``madvise``), interior holes included; a later allocation that
reuses the hole takes a page fault instead.

When it pays to trim: just before a step allocates its largest blocks, so they land in memory
that was given back instead of on top of resident holes. In a language model that is the
output head::

    forward: embeddings -> decoder layers (activations kept for backward, temporaries freed:
             resident holes) --[trim: holes given back, caches dropped]--> output head:
             (batch, seq, vocab) logits, log-softmax, loss  <- the step's peak
    backward: logits' gradients (the same size again), then the layers in reverse

The trainer's ``trim_heap``: ``head`` (default) trims there; ``blocks`` also before every
repeated block (decoder layer), so one block's holes are given back before the next allocates;
``none`` never; with either of the first two the trainer also trims once before each
evaluation (:func:`trim_now`). A trim costs a few ms plus a page fault per reused page: on
SmolLM2 on the CPU, ``head`` took 120-430 MB off the peak RSS for at most ~2% of step time and
``blocks`` nothing more for +5-15% (``benchmarks/bench_trim_heap.py``; README, "QLoRA
memory"). Elsewhere than glibc (macOS, musl) these functions do nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
from collections.abc import Callable, Iterator
from functools import cache
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = [
    "TRIM_POINTS",
    "output_head",
    "register_cache",
    "release_freed_memory",
    "repeated_blocks",
    "trim_before",
    "trim_heap",
    "trim_now",
    "trim_points",
    "trimming_heap",
]


@cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_CACHES: list[Callable[[], None]] = []


def register_cache(release: Callable[[], None]) -> None:
    """Have every :func:`trim_heap` first call ``release``, which drops a cache of reusable
    buffers that is rebuilt on its next use (the 4-bit layers' dequantisation scratch). Where
    the trainer trims, before the output head, the scratch is not needed again until backward
    reaches the decoder layers: dropped there, it is not part of the step's peak."""
    _CACHES.append(release)


def trim_heap() -> bool:
    """Drop the registered caches, then give the heap's free pages back to the kernel; False
    (and nothing dropped) where that is not possible."""
    trim = _malloc_trim()
    if trim is None:
        return False
    for release in _CACHES:
        release()
    trim(0)
    return True


def release_freed_memory() -> None:
    """:func:`trim_heap` after collecting cyclic garbage: a reference cycle can hold a freed
    tensor's memory until the next collection (~30 MB after loading SmolLM2)."""
    gc.collect()
    trim_heap()


def output_head(model: nn.Module) -> nn.Module | None:
    """The module that turns hidden states into vocabulary logits (transformers'
    ``get_output_embeddings``) of the first model inside ``model`` that has one, else None."""
    for module in model.modules():
        get = getattr(module, "get_output_embeddings", None)
        if not callable(get):
            continue
        try:
            head = get()
        except (NotImplementedError, AttributeError):  # a model class that declares none
            continue
        if isinstance(head, nn.Module):
            return head
    return None


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks (decoder layers...): modules whose class a transformers model
    names in ``_no_split_modules``, in forward order; empty for a model that names none. A
    block FSDP2 has sharded counts too (its class is a subclass, ``FSDP<name>``)."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return [m for m in model.modules() if any(c.__name__ in names for c in type(m).__mro__)]


def trim_before(
    module: nn.Module, inference: bool = False, backward: bool = False
) -> RemovableHandle | _Handles | None:
    """Trim the heap each time ``module`` runs with gradients on (a training forward, or a
    checkpointed block's recomputation in backward), with ``inference`` without them too, and
    with ``backward`` before its backward pass.

    Returns the hook's handle (``.remove()`` undoes it), or None where trimming does nothing.
    Plain inference needs none: it keeps no activations, so its holes are reused at once; a
    sharded model's (ZeRO-3, FSDP2) gathers and frees each block's weights around the KV
    cache it grows, and those holes stay resident unless given back.
    """
    if _malloc_trim() is None:
        return None

    def before_forward(_module: nn.Module, _args: tuple) -> None:
        if inference or torch.is_grad_enabled():
            trim_heap()

    def before_backward(_grad: torch.Tensor) -> None:
        trim_heap()

    def after_forward(_module: nn.Module, _args: tuple, output: Any) -> None:
        # a hook on the output's gradient runs just before the block's backward; a module
        # backward hook would too, but its wrapping of the outputs aborts FSDP2's processes
        # at exit ("terminate called without an active exception")
        out = output[0] if isinstance(output, (tuple, list)) and output else output
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(before_backward)

    handles = [module.register_forward_pre_hook(before_forward)]
    if backward:
        handles.append(module.register_forward_hook(after_forward))
    return _Handles(handles)


class _Handles:
    """Several hook handles removed as one."""

    def __init__(self, handles: list[RemovableHandle]) -> None:
        self.handles = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


TRIM_POINTS = ("head", "blocks", "none")


def _on_cpu(module: nn.Module) -> bool:
    tensors = [*module.parameters(), *module.buffers()]
    return bool(tensors) and all(t.device.type == "cpu" for t in tensors)


def trim_points(model: nn.Module, where: str = "head") -> list[nn.Module]:
    """The modules before which the trainer trims (``trim_heap``), those on the CPU only:

    * ``"head"``: the output head (one trim per training forward);
    * ``"blocks"``: the head and every repeated block, so the holes a block's temporaries
      leave are given back before the next block allocates (lowest peak; see the README
      for what the extra page faults cost);
    * ``"none"``: none.
    """
    if where not in TRIM_POINTS:
        raise ValueError(f"trim_heap={where!r}: use one of {', '.join(TRIM_POINTS)}")
    head = output_head(model) if where != "none" else None
    points = [head] if head is not None else []
    if where == "blocks":
        points = repeated_blocks(model) + points
    return [m for m in points if _on_cpu(m)]


def trim_now(model: nn.Module, where: str = "head") -> bool:
    """One trim now where :func:`trimming_heap` would trim at all (``where`` other than
    ``"none"``, a model on the CPU): the trainer's evaluation calls it first, so inference
    starts on a heap without training's holes and without the 4-bit scratch. True if it did."""
    return bool(trim_points(model, where)) and trim_heap()


@contextlib.contextmanager
def trimming_heap(
    model: nn.Module, where: str = "head", inference: bool = False, backward: bool = False
) -> Iterator[int]:
    """While inside, trim the heap before each training forward of :func:`trim_points` (with
    ``inference``, before every forward of them; with ``backward``, before their backward
    too: a sharded model gathers and frees each block's weights again there); yields how many
    hooks are in place (0 where trimming does nothing)."""
    handles = [trim_before(m, inference, backward) for m in trim_points(model, where)]
    handles = [h for h in handles if h is not None]
    try:
        yield len(handles)
    finally:
        for handle in handles:
            handle.remove()
