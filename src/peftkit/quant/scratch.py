"""Where dequantisation writes: fresh tensors, or named buffers reused across calls.

A QLoRA step dequantises every 4-bit layer twice (forward and backward), each time into a
weight-sized buffer, the byte indices it gathers from (a weight's worth on a GPU, one chunk on
the CPU) and a few block-statistics temporaries that live for one matmul.
Allocated fresh, they interleave with the step's activations in the C allocator's heap
(glibc malloc), and the holes they leave keep the process's resident memory far above its live
tensors. Reused, each buffer costs one allocation per thread until the pool is dropped (the
trainer drops it where it trims the heap: :func:`peftkit.heap.register_cache`).
"""

from __future__ import annotations

import torch


class FreshTensors:
    """The allocation policy of a plain call: every buffer is a new tensor."""

    def get(self, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A new 1-D tensor of ``numel`` elements (``name`` is ignored)."""
        return torch.empty(numel, dtype=dtype, device=device)


class ScratchPool(FreshTensors):
    """Named 1-D buffers reused across calls, each grown to the largest request.

    What :meth:`get` returns is valid until the next ``get`` of the same name: use it for
    values consumed at once (one matmul), never for ones that are kept.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}

    def get(self, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The first ``numel`` elements of buffer ``name`` (grown, if needed, to hold them)."""
        key = (name, dtype, torch.device(device))
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel]
