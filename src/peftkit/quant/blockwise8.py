"""Blockwise 8-bit quantisation with the dynamic code: how double quantisation stores absmax.

QLoRA's double quantisation stores the per-block fp32 absmax values of a 4-bit weight in
8 bits: subtract their mean (``offset``), cut the result into blocks of 256, and keep one fp32
scale per block plus one 8-bit dynamic code per value::

    absmax  (n,) fp32 --(- offset)--> centred --blocks of 256--> codes (n,) uint8
                                                               + scales (ceil(n/256),) fp32
    absmax ~= dynamic[codes] * scales[block] + offset

Rounding follows bitsandbytes' CPU kernel exactly (a 65536-bin grid, see
:func:`peftkit.quant.codebooks.dynamic_lut_8bit`), so the statistics are bit-identical.
"""

from __future__ import annotations

import torch

from .codebooks import LUT_BINS, dynamic_code_8bit, dynamic_lut_8bit
from .scratch import FreshTensors, ScratchPool

NESTED_BLOCKSIZE = 256


def quantize_blockwise_8bit(
    x: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise a float32 vector to dynamic 8-bit codes with one absmax scale per block.

    Args:
        x: 1-D float32 tensor.
        blocksize: values per block (the last block may be shorter).

    Returns:
        ``(codes, scales)``: uint8 codes shaped like ``x`` and float32 scales ``(ceil(n/blocksize),)``.
    """
    if x.dim() != 1 or x.dtype != torch.float32:
        raise ValueError(f"expected a 1-D float32 tensor, got shape {tuple(x.shape)} {x.dtype}")
    n = x.numel()
    n_blocks = -(-n // blocksize)
    padded = torch.zeros(n_blocks * blocksize, dtype=torch.float32, device=x.device)
    padded[:n] = x  # zero padding leaves each block's absmax unchanged
    blocks = padded.view(n_blocks, blocksize)  # (nb, bs)
    scales = blocks.abs().amax(dim=1)  # (nb,)
    safe = torch.where(scales == 0, torch.ones_like(scales), scales)
    normed = (blocks * (1.0 / safe)[:, None]).clamp_(-1.0, 1.0)  # (nb, bs)
    grid = ((normed + 1.0) * 0.5 * (LUT_BINS - 1) + 0.5).to(torch.int64)  # trunc toward 0
    codes = dynamic_lut_8bit(x.device)[grid]  # (nb, bs) uint8
    codes[scales == 0] = 0
    return codes.reshape(-1)[:n], scales


def dequantize_blockwise_8bit(
    codes: torch.Tensor,
    scales: torch.Tensor,
    blocksize: int = NESTED_BLOCKSIZE,
    scratch: ScratchPool | None = None,
) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise_8bit`: ``dynamic[codes] * scales[block]`` in float32.

    ``scratch``: build the result in that pool's buffers (valid until the pool's next use).
    """
    pool = scratch or FreshTensors()
    n, dev = codes.numel(), codes.device
    index = pool.get("absmax_index", n, torch.int32, dev).copy_(codes.reshape(-1))  # (n,)
    values = pool.get("absmax", n, torch.float32, dev)
    torch.index_select(dynamic_code_8bit(dev), 0, index, out=values)  # (n,)
    full = n - n % blocksize
    values[:full].view(-1, blocksize).mul_(scales[: full // blocksize, None])  # (nb, bs)
    if full < n:
        values[full:].mul_(scales[-1])
    return values
