"""Weights that live in a memory-mapped checkpoint file, and handing their pages back.

transformers loads a ``.safetensors`` file as one private memory map (``/proc/self/maps``
shows it ``rw-p`` with the file's path) and makes every parameter a view into it. A page of
such a parameter costs resident memory only once something reads it, and it can be dropped
again (``madvise(MADV_DONTNEED)``: the next read faults it back in from the file)::

    model.safetensors  [ embed | layer 0 | layer 1 | ... | head ]   one private map
    params             [  view | views   | views   | ... | view ]   resident where read

Two things follow. A frozen slice of such a weight is better kept as a view than copied
(``peftkit.vocab_parallel``: a lookup touches a few rows of a rank's embedding slice). And a
sharding pass that copies each rank's part out of the map should drop the pages it read once
the full tensor is no longer used (``peftkit.train.fsdp_units``), or every page read stays
resident next to its copy until the whole map is freed.

Only pages wholly inside a tensor are dropped, and only pages of a file mapping (dropping an
anonymous page would zero it). On systems without ``/proc`` or ``madvise`` nothing is
file-backed and nothing is dropped.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
from collections.abc import Iterable
from functools import cache

import torch

_SUFFIX = ".safetensors"
MADV_DONTNEED = 4  # linux


def _file_maps() -> list[tuple[int, int]]:
    """Address ranges of this process's memory maps of checkpoint files."""
    ranges = []
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                fields = line.split()
                if len(fields) >= 6 and fields[-1].endswith(_SUFFIX):
                    lo, hi = fields[0].split("-")
                    ranges.append((int(lo, 16), int(hi, 16)))
    except OSError:
        return []
    return ranges


def _span(tensor: torch.Tensor) -> tuple[int, int]:
    start = tensor.data_ptr()
    return start, start + tensor.numel() * tensor.element_size()


def is_file_backed(tensor: torch.Tensor, maps: list[tuple[int, int]] | None = None) -> bool:
    """Whether ``tensor``'s bytes lie in a memory map of a checkpoint file (CPU only)."""
    if tensor.device.type != "cpu" or tensor.numel() == 0:
        return False
    lo, hi = _span(tensor)
    return any(a <= lo and hi <= b for a, b in (maps if maps is not None else _file_maps()))


@cache
def _madvise():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def drop_pages(tensors: Iterable[torch.Tensor]) -> int:
    """Drop the resident pages that lie wholly inside each file-backed tensor; returns the
    bytes dropped. The tensors stay valid (a later read faults the pages back in from the
    file), so this is for weights that are no longer read, or read rarely. A tensor written
    in place since it was mapped must not be passed: its private copy would be lost."""
    madvise = _madvise()
    if madvise is None:
        return 0
    maps = _file_maps()
    page = mmap.PAGESIZE
    dropped = 0
    for tensor in tensors:
        if not is_file_backed(tensor, maps):
            continue
        lo, hi = _span(tensor)
        lo = -(-lo // page) * page  # inward to whole pages
        hi = hi // page * page
        if hi > lo and madvise(lo, hi - lo, MADV_DONTNEED) == 0:
            dropped += hi - lo
    return dropped
