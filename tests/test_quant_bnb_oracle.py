"""Bit-exact agreement with bitsandbytes 0.50 (CPU) as the oracle: same packed codes, same absmax
and double-quantised statistics, and each library dequantises the other's output identically."""

from __future__ import annotations

import itertools

import pytest
import torch

from conftest import require
from peftkit.quant import (
    Linear4bit,
    dequantize_4bit,
    from_bnb_quant_state,
    get_dequant_backend,
    quantize_4bit,
    set_dequant_backend,
    to_bnb_quant_state,
)
from peftkit.quant.codebooks import code_4bit, dynamic_code_8bit

bnb = require("bitsandbytes")
BF = bnb.functional


def _bnb_quantize(w, quant_type, blocksize, double_quant):
    return BF.quantize_4bit(
        w, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant
    )


def test_codebooks_match_bitsandbytes():
    for quant_type in ("nf4", "fp4"):
        ref = BF.get_4bit_type(quant_type, device="cpu")
        assert torch.equal(code_4bit(quant_type), ref)
    assert torch.equal(dynamic_code_8bit(), BF.create_dynamic_map())


CASES = list(
    itertools.product(
        ["nf4", "fp4"],
        [32, 64, 256],
        [True, False],
        [torch.float32, torch.bfloat16, torch.float16],
    )
)


@pytest.mark.parametrize("quant_type, blocksize, double_quant, dtype", CASES)
def test_same_codes_and_statistics(quant_type, blocksize, double_quant, dtype):
    torch.manual_seed(blocksize)
    # a weight-like matrix with varied row scales, plus exact zeros and an all-zero block
    w = torch.randn(96, 512) * torch.rand(96, 1) * 0.1
    w[3, :] = 0.0
    w[5, ::7] = 0.0
    w = w.to(dtype)
    packed, state = quantize_4bit(w, quant_type, blocksize, double_quant)
    ref_packed, ref = _bnb_quantize(w, quant_type, blocksize, double_quant)
    assert torch.equal(packed, ref_packed.view(-1))
    if double_quant:
        assert torch.equal(state.absmax_codes, ref.absmax)
        assert torch.equal(state.absmax_scales, ref.state2.absmax)
        assert torch.equal(state.absmax_offset, ref.offset)
    else:
        assert torch.equal(state.absmax_fp32, ref.absmax)
    # each side dequantises the other's quantisation to the same tensor
    ours = dequantize_4bit(packed, state)
    theirs = BF.dequantize_4bit(ref_packed, ref)
    assert ours.dtype == theirs.dtype == dtype
    assert torch.equal(ours, theirs)
    assert torch.equal(BF.dequantize_4bit(packed.view(-1, 1), to_bnb_quant_state(state)), ours)
    assert torch.equal(dequantize_4bit(ref_packed, from_bnb_quant_state(ref)), theirs)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("numel", [7, 65, 1000, 64 * 256 * 3 + 40])
def test_partial_blocks_and_odd_sizes(quant_type, numel):
    """Trailing partial 4-bit block, odd element count, partial 256-block of absmax."""
    torch.manual_seed(numel)
    w = torch.randn(numel)
    packed, state = quantize_4bit(w, quant_type, 64, True)
    ref_packed, ref = _bnb_quantize(w, quant_type, 64, True)
    assert torch.equal(packed, ref_packed.view(-1))
    assert torch.equal(state.absmax_codes, ref.absmax)
    assert torch.equal(state.absmax_scales, ref.state2.absmax)
    theirs = BF.dequantize_4bit(ref_packed, ref)  # bitsandbytes returns (1, n) for 1-D input
    assert torch.equal(dequantize_4bit(packed, state), theirs.reshape(w.shape))


def test_ties_tiny_values_and_extremes():
    """Values exactly on midpoints, tiny and huge magnitudes, and +/- absmax."""
    nf4 = code_4bit("nf4")
    fp4 = code_4bit("fp4").sort().values
    mids = torch.cat([(nf4[:-1] + nf4[1:]) / 2, (fp4[:-1] + fp4[1:]) / 2])
    torch.manual_seed(0)
    w = torch.cat([mids, -mids, torch.randn(64) * 1e-30, torch.randn(64) * 1e30])
    w = torch.cat([w, torch.full((64 - w.numel() % 64,), 1.0)])  # whole blocks with absmax 1
    w[::64] = 1.0
    for quant_type in ("nf4", "fp4"):
        packed, state = quantize_4bit(w, quant_type, 64, True)
        ref_packed, ref = _bnb_quantize(w, quant_type, 64, True)
        assert torch.equal(packed, ref_packed.view(-1))
        assert torch.equal(state.absmax_codes, ref.absmax)
        assert torch.equal(state.absmax_scales, ref.state2.absmax)


def test_nested_statistics_for_many_blocks():
    """Thousands of absmax values spanning orders of magnitude go through the 8-bit map."""
    torch.manual_seed(0)
    w = torch.randn(2048, 1024) * torch.logspace(-4, 1, 2048)[:, None]
    packed, state = quantize_4bit(w, "nf4", 64, True)
    ref_packed, ref = _bnb_quantize(w, "nf4", 64, True)
    assert torch.equal(state.absmax_codes, ref.absmax)
    assert torch.equal(state.absmax_scales, ref.state2.absmax)
    assert torch.equal(state.absmax_offset, ref.offset)
    assert torch.equal(dequantize_4bit(packed, state), BF.dequantize_4bit(ref_packed, ref))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_linear4bit_matches_bnb_linear4bit(quant_type):
    """Our Linear4bit computes exactly what bitsandbytes' Linear4bit computes from the same layer."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 96)
    ours = Linear4bit.from_linear(linear, quant_type=quant_type, compute_dtype=torch.float32)
    theirs = bnb.nn.Linear4bit(
        128, 96, compute_dtype=torch.float32, quant_type=quant_type, compress_statistics=True
    )
    theirs.load_state_dict(linear.state_dict())
    theirs = theirs.to("cpu")  # quantises on the move
    theirs.support_avx512bf16_for_cpu = False  # keep bnb on its exact (dequantise) CPU path
    assert torch.equal(ours.packed_weight, theirs.weight.data.view(-1))
    x = torch.randn(4, 5, 128, requires_grad=True)
    y_ours = ours(x)
    y_theirs = theirs(x)
    torch.testing.assert_close(y_ours, y_theirs, rtol=0, atol=0)
    (g_ours,) = torch.autograd.grad(y_ours.sum(), x)
    (g_theirs,) = torch.autograd.grad(y_theirs.sum(), x)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-6, atol=1e-6)


def test_bitsandbytes_dequant_backend_gives_identical_layers():
    """The optional bitsandbytes fast path (default on CUDA) computes the same layer output."""
    torch.manual_seed(0)
    layer = Linear4bit.from_linear(torch.nn.Linear(256, 64), compute_dtype=torch.bfloat16)
    x = torch.randn(3, 256)
    assert get_dequant_backend() == "auto"  # on CPU: our PyTorch path
    ours = layer(x)
    set_dequant_backend("bitsandbytes")
    try:
        theirs = layer(x)
        w_theirs = layer.dequantize()
    finally:
        set_dequant_backend("auto")
    torch.testing.assert_close(theirs, ours, rtol=0, atol=0)
    torch.testing.assert_close(w_theirs, layer.dequantize(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="backend"):
        set_dequant_backend("triton")


def test_state_conversion_round_trip():
    packed, state = quantize_4bit(torch.randn(64, 128), "fp4", 64, True)
    back = from_bnb_quant_state(to_bnb_quant_state(state))
    assert back.shape == state.shape and back.quant_type == "fp4" and back.double_quant
    assert torch.equal(dequantize_4bit(packed, back), dequantize_4bit(packed, state))
