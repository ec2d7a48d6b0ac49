"""Blockwise 4-bit quantisation (NF4 / FP4) of a weight tensor, with double quantisation.

Data path (``blocksize`` = 64 by default)::

    w (any shape, fp32/fp16/bf16) --flatten, fp32--> blocks (nb, 64)
      absmax[b] = max |w| in block b                                  (nb,) fp32
      code      = nearest table value to w / absmax[b]                 4 bits, two per byte
      double quant: absmax -> 8-bit dynamic codes + fp32 scale per 256 blocks + one fp32 offset

    dequantize: w_hat = table[code] * absmax[b]   (fp32, then cast to the original dtype)

Storage with double quantisation: 4 + 8/64 + 32/(64*256) = 4.127 bits per parameter (4.5 without).

Layout and rounding are bitsandbytes' (0.50): the first value of a pair sits in the high nibble;
a value exactly between two table entries goes to the smaller; a trailing partial block is
normalised by division (full blocks by multiplication with 1/absmax); the absmax offset is the
mean of the absmax values. The same input therefore gives the same packed bytes and statistics,
and a weight quantised by either library dequantises identically in the other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .blockwise8 import NESTED_BLOCKSIZE, dequantize_blockwise_8bit, quantize_blockwise_8bit
from .codebooks import QUANT_TYPES_4BIT, code_4bit, rounding_4bit
from .scratch import FreshTensors, ScratchPool

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SUPPORTED_BLOCKSIZES = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
_TINY = 1e-38  # floor for an all-zero block's absmax, so 0 / absmax stays 0
CHUNK = 1 << 20  # values quantised per pass (bounds the temporaries: ~4 float32 copies)
# bytes widened to int32 per gather on the CPU: the index buffer stays at 256 KB instead of 2 bytes
# per weight (1.8 MB for a 1536x576 weight, 90 MB for a 7B model's MLP), for ~4% of the gather's
# time; on a GPU each chunk would be a kernel launch, so the weight goes in one.
INDEX_CHUNK = 1 << 16


@dataclass
class QuantState4bit:
    """Everything needed to dequantise a packed 4-bit tensor.

    Attributes:
        shape: shape of the original tensor.
        dtype: dtype of the original tensor (dequantisation returns it).
        blocksize: values per absmax block.
        quant_type: "nf4", "fp4" or "int4".
        absmax_fp32: per-block absmax (nb,) float32, when not double-quantised.
        absmax_codes: per-block 8-bit codes (nb,) uint8, when double-quantised.
        absmax_scales: per-256-block float32 scales of the centred absmax (double quant).
        absmax_offset: 0-dim float32 mean subtracted before double quantisation.
    """

    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    absmax_fp32: torch.Tensor | None = None
    absmax_codes: torch.Tensor | None = None
    absmax_scales: torch.Tensor | None = None
    absmax_offset: torch.Tensor | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE

    @property
    def double_quant(self) -> bool:
        return self.absmax_codes is not None

    @property
    def absmax(self) -> torch.Tensor:
        """Per-block absmax (nb,) float32; dequantised from 8 bits when double-quantised."""
        return self.absmax_values()

    def absmax_values(self, scratch: ScratchPool | None = None) -> torch.Tensor:
        """:attr:`absmax`, built in ``scratch``'s buffers when given (valid until its next use)."""
        if not self.double_quant:
            return self.absmax_fp32
        centred = dequantize_blockwise_8bit(
            self.absmax_codes, self.absmax_scales, self.nested_blocksize, scratch
        )
        return centred.add_(self.absmax_offset)

    @property
    def code(self) -> torch.Tensor:
        """The 4-bit value table (16,) float32 on the state's device."""
        ref = self.absmax_fp32 if self.absmax_fp32 is not None else self.absmax_codes
        return code_4bit(self.quant_type, ref.device)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def tensors(self) -> dict[str, torch.Tensor]:
        """The statistic tensors actually stored (what counts towards bits per parameter)."""
        names = ("absmax_fp32", "absmax_codes", "absmax_scales", "absmax_offset")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}

    def to(self, device: torch.device | str) -> QuantState4bit:
        moved = {k: v.to(device) for k, v in self.tensors().items()}
        return QuantState4bit(
            shape=self.shape,
            dtype=self.dtype,
            blocksize=self.blocksize,
            quant_type=self.quant_type,
            nested_blocksize=self.nested_blocksize,
            **moved,
        )


def _check_args(w: torch.Tensor, quant_type: str, blocksize: int) -> None:
    if quant_type not in QUANT_TYPES_4BIT:
        raise ValueError(
            f"quant_type={quant_type!r} is not supported; use 'nf4' (recommended) or 'fp4'"
        )
    if blocksize not in SUPPORTED_BLOCKSIZES:
        raise ValueError(
            f"blocksize={blocksize} is not supported; use a power of two in "
            f"{SUPPORTED_BLOCKSIZES} (64 is the QLoRA default)"
        )
    if w.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"cannot quantise a {w.dtype} tensor; 4-bit quantisation takes float32, float16 or "
            "bfloat16 weights (an integer dtype means it is already quantised)"
        )
    if w.numel() == 0:
        raise ValueError("cannot quantise an empty tensor")


def _absmax_and_scaled(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax (nb,) and the values normalised into [-1, 1] (n,), both float32."""
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    blocks = flat[:full].view(-1, blocksize)  # (nb_full, bs)
    absmax = blocks.abs().amax(dim=1)  # (nb_full,)
    inv = 1.0 / absmax.clamp(min=_TINY)
    scaled = (blocks * inv[:, None]).clamp_(-1.0, 1.0).reshape(-1)  # (full,)
    if rem:
        tail = flat[full:]
        tail_max = tail.abs().max().clamp(min=_TINY)  # stored clamped, like bitsandbytes
        absmax = torch.cat([absmax, tail_max[None]])
        scaled = torch.cat([scaled, (tail / tail_max).clamp(-1.0, 1.0)])
    return absmax, scaled


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes (n,) uint8 into bytes (n/2,): element 2i in the high nibble."""
    return (codes[0::2] << 4) | codes[1::2]


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: codes (n,) uint8."""
    codes = torch.stack([packed >> 4, packed & 0x0F], dim=-1)  # (n/2, 2)
    return codes.reshape(-1)[:n]


def quantize_4bit(
    w: torch.Tensor,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
) -> tuple[torch.Tensor, QuantState4bit]:
    """Quantise ``w`` blockwise to 4 bits.

    Args:
        w: weight tensor of any shape, float32 / float16 / bfloat16, on any device.
        quant_type: "nf4" (normal float, best for normally distributed weights), "fp4", or
            "int4" (comparison only; bitsandbytes cannot read it).
        blocksize: values sharing one absmax (a power of two, 16..4096).
        double_quant: store the absmax values in 8 bits (saves 0.37 bits/param at blocksize 64).

    Returns:
        ``(packed, state)``: ``packed`` is a uint8 tensor of ``ceil(numel/2)`` bytes (flattened
        row-major, two codes per byte); ``state`` holds what :func:`dequantize_4bit` needs.
    """
    _check_args(w, quant_type, blocksize)
    flat = w.detach().reshape(-1)  # (n,)
    n = flat.numel()
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=w.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=w.device)
    midpoints, order = rounding_4bit(quant_type, w.device)
    # Blocks are independent: quantise CHUNK values at a time, so the float32 temporaries stay
    # a few MB whatever the layer's size (same codes as one pass; a partial block can only be
    # the last one, since a chunk is a whole number of blocks).
    step = max(blocksize, CHUNK // blocksize * blocksize)
    for start in range(0, n, step):
        part = flat[start : start + step].float()  # (<= step,)
        part_absmax, scaled = _absmax_and_scaled(part, blocksize)
        absmax[start // blocksize : start // blocksize + part_absmax.numel()] = part_absmax
        if scaled.numel() % 2:
            scaled = torch.nn.functional.pad(scaled, (0, 1))  # pad value 0 -> the code of zero
        codes = order[torch.bucketize(scaled, midpoints, out_int32=True)]  # uint8
        packed[start // 2 : start // 2 + codes.numel() // 2] = pack_nibbles(codes)
    state = QuantState4bit(shape=w.shape, dtype=w.dtype, blocksize=blocksize, quant_type=quant_type)
    if double_quant:
        offset = absmax.mean()
        state.absmax_codes, state.absmax_scales = quantize_blockwise_8bit(absmax - offset)
        state.absmax_offset = offset
    else:
        state.absmax_fp32 = absmax
    return packed, state


_PAIR_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def _pair_table(quant_type: str, device: torch.device) -> torch.Tensor:
    """(256, 2) table: the two dequantised unit values held in each possible byte (cached)."""
    key = (quant_type, torch.device(device))
    if key not in _PAIR_TABLES:
        code = code_4bit(quant_type, device)
        byte = torch.arange(256, device=device)
        _PAIR_TABLES[key] = torch.stack([code[byte >> 4], code[byte & 0x0F]], dim=-1)
    return _PAIR_TABLES[key]


def dequantize_4bit(
    packed: torch.Tensor,
    state: QuantState4bit,
    dtype: torch.dtype | None = None,
    scratch: ScratchPool | None = None,
) -> torch.Tensor:
    """Reconstruct the tensor: ``table[code] * absmax[block]`` in float32, cast to ``state.dtype``.

    Args:
        packed: the uint8 bytes returned by :func:`quantize_4bit` (any shape with that many bytes).
        state: the matching :class:`QuantState4bit`.
        dtype: optional second cast (e.g. a compute dtype) applied after the cast to
            ``state.dtype``, as bitsandbytes does.
        scratch: write the result and every temporary into these reusable buffers instead of
            fresh allocations. The result is then only valid until the pool's next use: for a
            weight consumed at once (one matmul), never for one that is kept.

    Returns:
        Tensor of ``state.shape``.
    """
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed 4-bit data must be uint8, got {packed.dtype}")
    n, bs = state.numel, state.blocksize
    if packed.numel() != (n + 1) // 2:
        raise ValueError(
            f"packed data has {packed.numel()} bytes but shape {tuple(state.shape)} needs "
            f"{(n + 1) // 2}; the state does not belong to this tensor"
        )
    pool = scratch or FreshTensors()
    dev, half = packed.device, packed.numel()
    table = _pair_table(state.quant_type, dev)  # (256, 2)
    # the unit values are gathered straight into the result's buffer and scaled in place there:
    # no second weight-sized buffer (2*half = n, or n + 1 for an odd n)
    values = pool.get("values", 2 * half, torch.float32, dev)
    pairs, flat = values.view(half, 2), packed.reshape(-1)  # (n/2, 2), (n/2,)
    step = INDEX_CHUNK if dev.type == "cpu" else half  # one launch per weight on a GPU
    index = pool.get("index", min(step, half), torch.int32, dev)  # index_select wants int32+
    for start in range(0, half, step):
        stop = min(start + step, half)
        chunk = index[: stop - start].copy_(flat[start:stop])  # (c,) bytes as int32
        torch.index_select(table, 0, chunk, out=pairs[start:stop])  # one gather per byte
    out = values[:n]  # (n,) unit values in [-1, 1], then the weights
    absmax = state.absmax_values(scratch)  # (nb,)
    full = n - n % bs
    out[:full].view(-1, bs).mul_(absmax[: full // bs, None])
    if full < n:
        out[full:].mul_(absmax[-1])
    for i, target in enumerate((state.dtype, dtype)):
        if target is not None and target != out.dtype:
            out = pool.get(f"cast{i}", n, target, dev).copy_(out)
    return out.view(state.shape)


def quantization_error(
    w: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = False
) -> float:
    """Mean squared error of a quantise -> dequantise round trip of ``w`` (float32 maths)."""
    packed, state = quantize_4bit(w.float(), quant_type, blocksize, double_quant)
    return (dequantize_4bit(packed, state) - w.float()).pow(2).mean().item()
