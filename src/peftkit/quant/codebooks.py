"""Codebooks (quantisation maps) for 4-bit weights and the 8-bit absmax statistics.

A k-bit code is an index into a small table of values in [-1, 1]; a block of weights is
stored as codes plus one scale (its absmax), and dequantised as ``table[code] * absmax``.

* NF4 (QLoRA, Dettmers et al. 2023): the 16 values are quantiles of N(0, 1), chosen so each
  code covers equal probability mass of a normal weight, with an exact zero. Built from
  ``Phi^-1(linspace(0.9677083, 0.5, 9))`` (8 positive), ``-Phi^-1(linspace(0.9677083, 0.5, 8))``
  (7 negative) and 0, normalised by the largest value. We store the published float32 values
  (the test suite re-derives them from the normal quantiles).
* FP4: 1 sign bit, 2 exponent bits, 1 mantissa bit, in the bit layout bitsandbytes uses
  (index = bit pattern, so the table is not sorted; index 8 is negative zero).
* INT4: symmetric integers -7..7 over 7 plus a spare -0 (for comparisons; bitsandbytes cannot
  read it).
* Dynamic 8-bit: the signed "dynamic tree" map of Dettmers (2015): for exponent level
  i = 0..6 the 2^i midpoints of a linear grid on [0.1, 1] times 10^(i-6), both signs, plus 0
  and 1. It quantises the per-block absmax values in double quantisation.

All tables are float32 and cached per device.
"""

from __future__ import annotations

from functools import cache

import torch

QUANT_TYPES_4BIT = ("nf4", "fp4", "int4")

# The 16 NF4 values of the QLoRA paper (float32), sorted; index 7 is exactly 0.
_NF4_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

# Offset of the outermost normal quantile used to build NF4 (QLoRA appendix).
NF4_OFFSET = 0.9677083


def _fp4_magnitude(bits3: int) -> float:
    """Unnormalised FP4 magnitude of the 3 non-sign bits ``eem`` in bitsandbytes' layout.

    Exponent field 0 is subnormal (``m * 2^-4``); exponent e in 1..3 gives ``2^(4-e) * (1 + m/2)``,
    so the patterns 000..111 read 0, 0.0625, 8, 12, 4, 6, 2, 3 (largest 12).
    """
    e, m = bits3 >> 1, bits3 & 1
    if e == 0:
        return m * 0.0625
    return 2.0 ** (4 - e) * (1.0 + 0.5 * m)


def normal_quantile_map(offset: float = NF4_OFFSET) -> torch.Tensor:
    """Derive the NF4 table from normal quantiles in float64 (for checking the stored values).

    Returns a sorted float64 tensor of 16 values in [-1, 1].
    """
    grid_pos = torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1]  # 8 probabilities
    grid_neg = torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1]  # 7 probabilities
    pos = torch.special.ndtri(grid_pos)
    neg = -torch.special.ndtri(grid_neg)
    values = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).sort().values
    return values / values.max()


@cache
def _code_4bit_cpu(quant_type: str) -> torch.Tensor:
    if quant_type == "nf4":
        return torch.tensor(_NF4_VALUES, dtype=torch.float32)
    if quant_type == "fp4":
        mags = [_fp4_magnitude(b) for b in range(8)]
        table = torch.tensor(mags + [-v for v in mags], dtype=torch.float32)
        table[8] = -0.0  # sign bit set on zero
        return table / 12.0
    if quant_type == "int4":
        # -7..7 over 7; the 16th code is a second (negative) zero, as in bitsandbytes' map
        return torch.cat([torch.arange(-7, 8, dtype=torch.float32), torch.tensor([-0.0])]) / 7.0
    raise ValueError(
        f"unknown 4-bit quant_type {quant_type!r}; use one of {', '.join(QUANT_TYPES_4BIT)}"
    )


def code_4bit(quant_type: str, device: torch.device | str | None = None) -> torch.Tensor:
    """The 4-bit table for ``quant_type`` ("nf4", "fp4" or "int4"): float32, indexed by code."""
    table = _code_4bit_cpu(quant_type)
    return table if device is None else table.to(device)


@cache
def _rounding_4bit_cpu(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    table = _code_4bit_cpu(quant_type)
    # stable sort: equal values (+0 / -0 in FP4) keep index order, so ties resolve reproducibly
    order = torch.sort(table, stable=True).indices
    ordered = table[order]
    midpoints = (ordered[:-1] + ordered[1:]) / 2  # (n_codes - 1,) float32
    return midpoints, order.to(torch.uint8)


def rounding_4bit(quant_type: str, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest-value rounding for a 4-bit table: (midpoints between sorted values, sort order).

    ``order[bucketize(x, midpoints)]`` is the code of the value nearest to ``x``; an ``x`` exactly
    on a midpoint goes to the smaller value.
    """
    mid, order = _rounding_4bit_cpu(quant_type)
    return mid.to(device), order.to(device)


@cache
def _dynamic_code_cpu() -> torch.Tensor:
    parts = []
    for level in range(7):
        edges = torch.linspace(0.1, 1.0, 2**level + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2  # (2^level,)
        scaled = means * 10.0 ** (level - 6)
        parts += [scaled, -scaled]
    parts.append(torch.tensor([0.0, 1.0]))
    table = torch.cat(parts).sort().values
    assert table.numel() == 256
    return table


def dynamic_code_8bit(device: torch.device | str | None = None) -> torch.Tensor:
    """The signed dynamic 8-bit table (256 sorted float32 values in [-0.993, 1])."""
    table = _dynamic_code_cpu()
    return table if device is None else table.to(device)


LUT_BINS = 65536


@cache
def _dynamic_lut_cpu() -> torch.Tensor:
    code = _dynamic_code_cpu()
    midpoints = 0.5 * (code[:-1] + code[1:])  # (255,)
    bins = torch.arange(LUT_BINS, dtype=torch.float32)
    grid = -1.0 + (2.0 * bins) / (LUT_BINS - 1)  # bin centres on [-1, 1], float32
    # code index = number of midpoints strictly below the bin value
    return torch.bucketize(grid, midpoints).to(torch.uint8)  # (65536,)


def dynamic_lut_8bit(device: torch.device | str) -> torch.Tensor:
    """Lookup table from a 16-bit grid position on [-1, 1] to the nearest dynamic 8-bit code.

    Rounding a normalised value ``v`` goes through the grid: ``lut[int((v + 1) / 2 * 65535 + 0.5)]``.
    This is how bitsandbytes' CPU kernel rounds, so our double-quantised statistics match it bit
    for bit; the grid step (3e-5) only matters for values that are tiny relative to their block.
    """
    return _dynamic_lut_cpu().to(device)
