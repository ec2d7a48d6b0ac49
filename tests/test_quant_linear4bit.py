"""Linear4bit: forward/backward by per-call dequantisation, storage, casts, the LoRA contract."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peftkit.quant import Linear4bit, dequantize_4bit, quantize_4bit


def _layer(in_f=128, out_f=96, bias=True, **kw) -> tuple[nn.Linear, Linear4bit]:
    torch.manual_seed(0)
    linear = nn.Linear(in_f, out_f, bias=bias)
    return linear, Linear4bit.from_linear(linear, **kw)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_forward_is_linear_with_dequantized_weight(quant_type, double_quant):
    linear, q = _layer(quant_type=quant_type, double_quant=double_quant)
    packed, state = quantize_4bit(linear.weight.detach(), quant_type, 64, double_quant)
    w_hat = dequantize_4bit(packed, state)
    torch.testing.assert_close(q.dequantize(), w_hat, rtol=0, atol=0)
    x = torch.randn(3, 7, 128)
    torch.testing.assert_close(q(x), F.linear(x, w_hat, linear.bias), rtol=0, atol=0)
    # and it approximates the original layer
    err = (q(x) - linear(x)).abs().max() / linear(x).abs().max()
    assert 0 < err < 0.15


def test_backward_matches_autograd_reference_and_saves_no_weight():
    linear, q = _layer()
    q.bias.requires_grad_(True)
    w_hat = q.dequantize()
    x = torch.randn(4, 9, 128, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    b_ref = q.bias.detach().clone().requires_grad_(True)

    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = q(x)
    assert 128 * 96 not in saved  # the dequantised weight is recomputed, not kept
    y_ref = F.linear(x_ref, w_hat, b_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(q.bias.grad, b_ref.grad, rtol=1e-6, atol=1e-6)
    assert not any(t.requires_grad for t in q.buffers())


@pytest.mark.parametrize("wrap", ["checkpoint", "save_on_cpu"])
def test_backward_through_checkpointing_and_outer_saved_tensor_hooks(wrap):
    """The layer's own saved-tensor hook (the weight saved as a reference to the layer) sits
    inside whatever hooks the caller set: non-reentrant checkpointing recomputes the forward
    in backward, ``save_on_cpu`` packs every saved tensor. Two 4-bit layers share the scratch,
    so a weight that was saved as a tensor would be the second layer's by backward time."""
    from torch.utils.checkpoint import checkpoint

    _, q1 = _layer(128, 128)
    q2 = Linear4bit.from_linear(nn.Linear(128, 96))
    for q in (q1, q2):
        q.bias.requires_grad_(True)
    w1, w2 = q1.dequantize(), q2.dequantize()
    b1, b2 = (q.bias.detach().clone().requires_grad_(True) for q in (q1, q2))
    x = torch.randn(2, 5, 128, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)

    def block(t):
        return q2(torch.tanh(q1(t)))

    if wrap == "checkpoint":
        y = checkpoint(block, x, use_reentrant=False)
    else:
        with torch.autograd.graph.save_on_cpu():
            y = block(x)
    y_ref = F.linear(torch.tanh(F.linear(x_ref, w1, b1)), w2, b2)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(q1.bias.grad, b1.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(q2.bias.grad, b2.grad, rtol=1e-6, atol=1e-6)


def test_bf16_compute_dtype_returns_input_dtype():
    linear, q = _layer(compute_dtype=torch.bfloat16)
    x = torch.randn(2, 128)
    y = q(x)
    assert y.dtype == torch.float32
    ref = F.linear(x.bfloat16(), q.dequantize(), q.bias.bfloat16()).float()
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    assert q.dequantize().dtype == torch.bfloat16


def test_bf16_weights_dequantize_through_weight_dtype():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32).to(torch.bfloat16)
    q = Linear4bit.from_linear(linear, compute_dtype=torch.float32)
    assert q.weight_dtype == torch.bfloat16 and q.compute_dtype == torch.float32
    packed, state = quantize_4bit(linear.weight.detach())
    expected = dequantize_4bit(packed, state).float()  # rounded to bf16 first, like bitsandbytes
    torch.testing.assert_close(q.dequantize(), expected, rtol=0, atol=0)


def test_module_casts_do_not_touch_quantized_storage():
    _, q = _layer()
    before = {k: v.clone() for k, v in q.storage_tensors().items()}
    x = torch.randn(2, 128)
    y = q(x)
    q.to(torch.bfloat16)
    q.half().float()
    for name, tensor in q.storage_tensors().items():
        assert tensor.dtype == before[name].dtype
        assert torch.equal(tensor, before[name]), name
    assert q.bias.dtype == torch.float32  # the bias went through fp16 and back
    torch.testing.assert_close(q(x), y, rtol=1e-3, atol=1e-3)


def test_state_dict_round_trip_into_fresh_layer():
    _, q = _layer()
    fresh = Linear4bit(128, 96, bias=True)
    assert set(fresh.state_dict()) == set(q.state_dict())
    fresh.load_state_dict(q.state_dict())
    x = torch.randn(5, 128)
    torch.testing.assert_close(fresh(x), q(x), rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(1024, 1024), (1536, 576), (576, 576)])
def test_bits_per_param_measured_on_storage(shape):
    out_f, in_f = shape
    _, q = _layer(in_f, out_f, bias=False)
    bits = sum(t.numel() * t.element_size() * 8 for t in q.buffers()) / (in_f * out_f)
    assert bits == q.storage_bits_per_param()
    assert 4.12 < bits <= 4.13
    _, plain = _layer(in_f, out_f, bias=False, double_quant=False)
    assert plain.storage_bits_per_param() == 4.5


def test_to_linear_and_requantize():
    linear, q = _layer()
    full = q.to_linear()
    assert isinstance(full, nn.Linear) and full.weight.dtype == torch.float32
    torch.testing.assert_close(full.weight, q.dequantize(), rtol=0, atol=0)
    torch.testing.assert_close(full.bias, linear.bias, rtol=0, atol=0)
    x = torch.randn(3, 128)
    torch.testing.assert_close(full(x), q(x), rtol=0, atol=0)
    assert q.to_linear(torch.bfloat16).weight.dtype == torch.bfloat16

    new_w = torch.randn(96, 128)
    q.requantize_(new_w)
    packed, state = quantize_4bit(new_w)
    torch.testing.assert_close(q.dequantize(), dequantize_4bit(packed, state), rtol=0, atol=0)
    with pytest.raises(ValueError, match="expected"):
        q.requantize_(torch.randn(128, 96))


def test_transformers_conv1d_is_transposed():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(96, 128)  # nf=out, nx=in; weight (in, out)
    nn.init.normal_(conv.weight, std=0.02)
    q = Linear4bit.from_linear(conv)
    assert (q.in_features, q.out_features) == (128, 96)
    x = torch.randn(2, 128)
    err = (q(x) - conv(x)).abs().max() / conv(x).abs().max()
    assert err < 0.15
    back = q.to_linear()  # de-quantises to the original layer type and layout
    assert type(back) is Conv1D and back.weight.shape == conv.weight.shape
    torch.testing.assert_close(back(x), q(x), rtol=1e-5, atol=1e-6)  # addmm vs linear rounding


def test_lora_contract_attributes():
    _, q = _layer(compute_dtype=torch.bfloat16)
    for attr in ("in_features", "out_features", "bias", "compute_dtype", "quant_type"):
        assert hasattr(q, attr)
    assert q.quantized_param_count() == 128 * 96
    assert "nf4" in repr(q)


def test_clear_errors():
    with pytest.raises(ValueError, match="in_features=40.*multiple of blocksize=64"):
        Linear4bit.from_linear(nn.Linear(40, 8), name="model.proj")
    with pytest.raises(ValueError, match="'model.proj'"):
        Linear4bit.from_linear(nn.Linear(40, 8), name="model.proj")
    with pytest.raises(TypeError, match="float64 weights.*cast the model"):
        Linear4bit.from_linear(nn.Linear(64, 8).to(torch.float64))
    int_layer = nn.Linear(64, 8)
    int_layer.weight = nn.Parameter(torch.ones(8, 64, dtype=torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match="already quantised"):
        Linear4bit.from_linear(int_layer)
    with pytest.raises(TypeError, match="compute_dtype"):
        Linear4bit.from_linear(nn.Linear(64, 8), compute_dtype=torch.float64)
    with pytest.raises(ValueError, match="'nf4' or 'fp4'"):
        Linear4bit(64, 8, quant_type="int4")
    with pytest.raises(ValueError, match="blocksize"):
        Linear4bit(64, 8, blocksize=48)
    meta = nn.Linear(64, 8, device="meta")
    with pytest.raises(ValueError, match="meta"):
        Linear4bit.from_linear(meta)


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(96, 128), (7, 9)])  # (7, 9): odd count, a partial block
def test_scratch_dequantize_equals_plain_and_reuses_buffers(weight_dtype, shape):
    from peftkit.quant.scratch import ScratchPool

    torch.manual_seed(0)
    w = torch.randn(*shape).to(weight_dtype)
    packed, state = quantize_4bit(w, "nf4", 64, True)
    pool = ScratchPool()
    plain = dequantize_4bit(packed, state, torch.float32)
    pooled = dequantize_4bit(packed, state, torch.float32, scratch=pool)
    assert pooled.dtype == plain.dtype and pooled.shape == plain.shape
    torch.testing.assert_close(pooled, plain, rtol=0, atol=0)
    ptr = pooled.data_ptr()
    # a smaller tensor next reuses the same storage (no new weight-sized allocation)
    small_packed, small_state = quantize_4bit(torch.randn(1, 32).to(weight_dtype), "nf4", 64)
    again = dequantize_4bit(small_packed, small_state, torch.float32, scratch=pool)
    assert again.data_ptr() == ptr
    torch.testing.assert_close(again, dequantize_4bit(small_packed, small_state, torch.float32))


def test_scratch_gathers_in_chunks_bounded_index(monkeypatch):
    """On the CPU the bytes are widened to int32 a chunk at a time: a weight over several
    chunks (and a last partial one) dequantises to the same bits as the unpacked reference,
    and the pool's index buffer is one chunk, not two bytes per weight."""
    from peftkit.quant import nf4
    from peftkit.quant.scratch import ScratchPool

    monkeypatch.setattr(nf4, "INDEX_CHUNK", 1000)
    torch.manual_seed(0)
    w = torch.randn(96, 128)  # 6144 bytes: 6 full chunks and one of 144
    packed, state = quantize_4bit(w, "nf4", 64, True)
    codes = nf4.unpack_nibbles(packed.reshape(-1), w.numel()).long()
    reference = nf4.code_4bit("nf4")[codes].view(-1, 64) * state.absmax[:, None]
    pool = ScratchPool()
    out = dequantize_4bit(packed, state, torch.float32, scratch=pool)
    torch.testing.assert_close(out, reference.view(96, 128), rtol=0, atol=0)
    index = [b for (name, *_), b in pool._buffers.items() if name == "index"]
    assert [b.numel() for b in index] == [1000]


def test_training_step_through_shared_scratch_matches_plain_weights():
    """Two 4-bit layers share one scratch pool in forward and backward: the gradients must be
    those of plain linears on each layer's own dequantised weight (a layer reading the other's
    buffer would show here)."""
    _, q1 = _layer(128, 128, bias=False)
    torch.manual_seed(1)
    q2 = Linear4bit.from_linear(nn.Linear(128, 64, bias=False))
    w1, w2 = q1.dequantize(), q2.dequantize()
    x = torch.randn(5, 128, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = q2(torch.tanh(q1(x)))
    y_ref = F.linear(torch.tanh(F.linear(x_ref, w1)), w2)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
