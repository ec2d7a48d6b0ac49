"""The keep-mask LoRA dropout draws, and the choice between PEFT's draw and a cheaper one.

Both LoRA paths (the plain :func:`peftkit.methods.lora.dropout_then_project` and the fused node
of :mod:`peftkit.methods.lora_fused`) draw through :func:`keep_mask`, so the same RNG state
gives the same mask on either path. Two ways to draw it::

    "bernoulli" (default)  bernoulli_(1 - p): the mask nn.Dropout, hence HF PEFT, draws from the
                           same RNG state. With the same seed, init and batches a peftkit run
                           follows PEFT's step for step (losses equal to float rounding), which
                           makes a quality comparison against PEFT exact rather than statistical.
    "fast"                 16 random bits per element: 64-bit words from torch.randint cut into
                           four int16 lanes, an element dropped when its lane falls below
                           round(p * 65536). ~3.5x cheaper on CPU (1024 x 576: 3.06 -> 0.88 ms;
                           with LoRA on every linear layer of SmolLM2 the masks are ~8% of a
                           training step with bernoulli_, profiled); the drop rate is within
                           2^-17 of p (0.05 -> 0.0500030), but the masks are not PEFT's.

Pick with :func:`set_dropout_mask` (the trainer's ``dropout_mask:`` key). Only training draws
masks; nothing saved depends on the choice.

Both paths keep the mask for backward at one bit per element (:func:`pack_mask` /
:func:`unpack_mask`, the one packer): 1/32 of the fp32 copy of ``dropout(x)`` PEFT keeps.
"""

from __future__ import annotations

import math

import torch

KINDS = ("bernoulli", "fast")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_kind = "bernoulli"


def set_dropout_mask(kind: str) -> None:
    """Draw LoRA dropout masks the PEFT way (``"bernoulli"``, default) or the cheap way (``"fast"``)."""
    global _kind
    if kind not in KINDS:
        raise ValueError(f"unknown dropout mask {kind!r}; use one of {list(KINDS)}")
    _kind = kind


def dropout_mask_kind() -> str:
    return _kind


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device) -> torch.Tensor:
    """A dropout keep-mask (bool, ``shape``): each element kept with probability ``1 - p``."""
    if _kind == "bernoulli":
        return torch.empty(shape, dtype=torch.bool, device=device).bernoulli_(1.0 - p)
    return fast_keep_mask(shape, p, device)


def fast_keep_mask(
    shape: torch.Size | tuple[int, ...], p: float, device: torch.device
) -> torch.Tensor:
    """The ``"fast"`` draw: 16 random bits per element (four int16 lanes per 64-bit word)."""
    if p >= 1.0:  # the threshold 32768 does not fit an int16
        return torch.zeros(shape, dtype=torch.bool, device=device)
    n = math.prod(shape)
    words = torch.randint(_INT64_MIN, _INT64_MAX, ((n + 3) // 4,), dtype=torch.int64, device=device)
    lanes = words.view(torch.int16)[:n]  # (n,) uniform over the 65,536 int16 values
    return (lanes >= round(p * 65536) - 32768).view(shape)


# 8 bytes of 0/1 (one int64, little-endian) -> one byte: bit k = byte k. Exact: no two partial
# products meet in the top byte (checked over all 256 patterns in the tests).
_PACK_MAGIC = sum(1 << (56 - 7 * k) for k in range(8))  # 0x0102040810204080
_UNPACK_TABLE: dict[torch.device, torch.Tensor] = {}


def pack_mask(keep: torch.Tensor) -> torch.Tensor:
    """Boolean (..., n) -> uint8 (..., ceil(n / 8)): 8 mask elements per byte, element k of a
    byte in bit k (a ragged last byte is padded with zeros)."""
    if keep.shape[-1] % 8:
        keep = torch.cat([keep, keep.new_zeros(*keep.shape[:-1], -keep.shape[-1] % 8)], dim=-1)
    words = keep.contiguous().view(torch.uint8).view(torch.int64)  # (..., n/8), a byte each
    return ((words * _PACK_MAGIC) >> 56).to(torch.uint8)  # int64 wraps: the top byte survives


def unpack_mask(packed: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: uint8 (..., ceil(n / 8)) -> bool (..., n), by one table
    lookup (``n``: the unpadded width; default every bit)."""
    table = _UNPACK_TABLE.get(packed.device)
    if table is None:
        values = torch.arange(256, dtype=torch.int64)
        bits = (values.unsqueeze(1) >> torch.arange(8)) & 1  # (256, 8)
        table = bits.to(torch.uint8).contiguous().view(torch.int64).reshape(256)  # (256,)
        table = _UNPACK_TABLE.setdefault(packed.device, table.to(packed.device))
    words = table[packed.long()]  # (..., n/8) int64, byte k = bit k
    keep = words.view(torch.uint8).view(torch.bool).reshape(*packed.shape[:-1], -1)  # (..., n8)
    return keep if n is None or n == keep.shape[-1] else keep[..., :n]
