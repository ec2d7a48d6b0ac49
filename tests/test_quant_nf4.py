"""peftkit.quant tensor-level quantisation: codebooks, packing, round trip, error table, errors."""

from __future__ import annotations

import pytest
import torch

from peftkit.quant import code_4bit, dequantize_4bit, quantization_error, quantize_4bit
from peftkit.quant.blockwise8 import dequantize_blockwise_8bit, quantize_blockwise_8bit
from peftkit.quant.codebooks import dynamic_code_8bit, normal_quantile_map
from peftkit.quant.nf4 import pack_nibbles, unpack_nibbles


def test_nf4_table_is_the_normal_quantiles():
    derived = normal_quantile_map().float()  # from Phi^-1, independent of the stored table
    torch.testing.assert_close(code_4bit("nf4"), derived, rtol=0, atol=2e-7)
    assert code_4bit("nf4")[7] == 0 and code_4bit("nf4").diff().gt(0).all()


def test_fp4_table_layout():
    fp4 = code_4bit("fp4") * 12  # unnormalised: sign | 2 exponent bits | 1 mantissa bit
    expected = torch.tensor([0, 0.0625, 8, 12, 4, 6, 2, 3], dtype=torch.float32)
    torch.testing.assert_close(fp4[:8], expected, rtol=0, atol=0)
    torch.testing.assert_close(fp4[8:], -expected, rtol=0, atol=0)
    assert torch.signbit(fp4[8])  # the sign bit is set on zero too


def test_dynamic_code_shape_and_range():
    code = dynamic_code_8bit()
    assert code.numel() == 256 and code.diff().ge(0).all()
    assert code.max() == 1.0 and -1.0 < code.min() < -0.99
    assert (code == 0).sum() == 1


def test_pack_order_high_nibble_first():
    codes = torch.tensor([0x1, 0x2, 0xF, 0x0], dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.tolist() == [0x12, 0xF0]
    assert torch.equal(unpack_nibbles(packed, 4), codes)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_table_values_round_trip_exactly(quant_type):
    # a block holding every table value times its absmax dequantises to itself
    table = code_4bit(quant_type)
    w = torch.cat([table, table.flip(0), table, table]) * 3.0  # (64,), absmax 3
    packed, state = quantize_4bit(w, quant_type, 64, double_quant=False)
    torch.testing.assert_close(dequantize_4bit(packed, state), w, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(128, 64), (7,), (3, 5, 64), (33, 65)])
@pytest.mark.parametrize("double_quant", [True, False])
def test_round_trip_shapes_and_error_bound(shape, double_quant):
    torch.manual_seed(0)
    w = torch.randn(shape)
    packed, state = quantize_4bit(w, "nf4", 64, double_quant)
    n = w.numel()
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 1) // 2
    assert state.shape == w.shape and state.dtype == w.dtype and state.blocksize == 64
    assert state.absmax.shape == (-(-n // 64),)
    out = dequantize_4bit(packed, state)
    assert out.shape == w.shape and out.dtype == w.dtype
    # each value is within half the largest NF4 gap (0.28 / 2) of its block's absmax
    absmax = state.absmax.repeat_interleave(64)[:n].view(w.shape)
    assert ((out - w).abs() <= 0.16 * absmax + 1e-6).all()


def test_double_quant_absmax_close_to_exact():
    torch.manual_seed(0)
    w = torch.randn(256, 512) * torch.rand(256, 1)  # varied block scales
    _, exact = quantize_4bit(w, "nf4", 64, double_quant=False)
    _, nested = quantize_4bit(w, "nf4", 64, double_quant=True)
    assert nested.absmax_codes.dtype == torch.uint8 and nested.absmax_scales.numel() == 8
    # the error is at most half a dynamic-code gap (< 0.75%) of each 256-block's centred range
    err = (nested.absmax - exact.absmax).abs().view(8, 256)
    assert (err <= 0.0075 * nested.absmax_scales[:, None]).all()
    assert err.max() > 0  # it really was quantised


def test_blockwise8_round_trip():
    torch.manual_seed(0)
    x = torch.randn(1000) * 0.1
    codes, scales = quantize_blockwise_8bit(x)
    assert codes.shape == (1000,) and scales.shape == (4,)
    torch.testing.assert_close(scales[0], x[:256].abs().max())
    back = dequantize_blockwise_8bit(codes, scales)
    assert (back - x).abs().max() < 0.02 * x.abs().max()


def test_zero_and_constant_blocks():
    w = torch.zeros(2, 64)
    w[1] = -2.5
    packed, state = quantize_4bit(w, "nf4", 64, double_quant=False)
    torch.testing.assert_close(dequantize_4bit(packed, state), w, rtol=0, atol=0)
    assert state.absmax.tolist() == [0.0, 2.5]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_in_and_out(dtype):
    torch.manual_seed(0)
    w = torch.randn(64, 128).to(dtype)
    packed, state = quantize_4bit(w)
    out = dequantize_4bit(packed, state)
    assert out.dtype == dtype
    ref = dequantize_4bit(*quantize_4bit(w.float()))  # same codes from the fp32 view of w
    torch.testing.assert_close(out, ref.to(dtype), rtol=0, atol=0)
    assert dequantize_4bit(packed, state, dtype=torch.float32).dtype == torch.float32


def test_mse_ordering_on_normal_data():
    """Blockwise-64 MSE on N(0, 1): NF4 ~ 0.0085 < INT4 ~ 0.0116 < FP4 ~ 0.0149."""
    torch.manual_seed(0)
    w = torch.randn(1 << 20)
    mse = {t: quantization_error(w, t, 64) for t in ("nf4", "int4", "fp4")}
    assert mse["nf4"] < mse["int4"] < mse["fp4"]
    assert mse["nf4"] == pytest.approx(0.0085, abs=3e-4)
    assert mse["int4"] == pytest.approx(0.0116, abs=3e-4)
    assert mse["fp4"] == pytest.approx(0.0149, abs=3e-4)
    # double quantisation costs almost nothing in accuracy
    assert quantization_error(w, "nf4", 64, double_quant=True) < mse["nf4"] * 1.01


def test_bits_per_param_of_storage():
    w = torch.randn(1024, 1024)
    for double_quant, limit in ((True, 4.13), (False, 4.5)):
        packed, state = quantize_4bit(w, double_quant=double_quant)
        stored = [packed, *state.tensors().values()]
        bits = sum(t.numel() * t.element_size() * 8 for t in stored) / w.numel()
        assert bits <= limit
    assert bits == 4.5  # without double quant: 4 + 32/64 exactly


def test_state_to_device_keeps_values():
    packed, state = quantize_4bit(torch.randn(64, 64))
    moved = state.to("cpu")
    assert moved is not state
    torch.testing.assert_close(dequantize_4bit(packed, moved), dequantize_4bit(packed, state))


@pytest.mark.parametrize(
    "kwargs, exc, needle",
    [
        ({"quant_type": "nf3"}, ValueError, "quant_type"),
        ({"blocksize": 48}, ValueError, "blocksize"),
    ],
)
def test_bad_arguments(kwargs, exc, needle):
    with pytest.raises(exc, match=needle):
        quantize_4bit(torch.randn(64, 64), **kwargs)


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.float64])
def test_unsupported_dtypes(dtype):
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        quantize_4bit(torch.ones(64, 64, dtype=dtype))


def test_mismatched_state_is_rejected():
    packed, _ = quantize_4bit(torch.randn(64, 64))
    _, other = quantize_4bit(torch.randn(64, 128))
    with pytest.raises(ValueError, match="does not belong"):
        dequantize_4bit(packed, other)
    with pytest.raises(TypeError, match="uint8"):
        dequantize_4bit(packed.float(), other)
    with pytest.raises(ValueError, match="empty"):
        quantize_4bit(torch.empty(0))
