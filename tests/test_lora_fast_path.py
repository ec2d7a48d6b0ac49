"""The fused LoRA linear node (methods/lora_fused.py) against the plain path: same outputs and
gradients (fp32 tolerances), same dropout masks, the plain path wherever the fused one must not
run, and adapters trained through it saved exactly as before."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftkit
from peftkit.methods import dropout_mask, lora_fused
from peftkit.methods.dropout_mask import pack_mask, unpack_mask
from tiny_models import tiny_model


@pytest.fixture
def plain_only(monkeypatch):
    """Turn the fused path off (the reference)."""
    monkeypatch.setattr(lora_fused, "fast_path_operands", lambda *a: None)


def test_pack_unpack_every_byte():
    bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1  # (256, 8)
    keep = bits.bool()
    packed = pack_mask(keep.reshape(1, -1))
    assert torch.equal(packed.reshape(-1), torch.arange(256, dtype=torch.uint8))
    assert torch.equal(unpack_mask(packed).reshape(256, 8), keep)
    mask = torch.rand(37, 64) < 0.3
    assert torch.equal(unpack_mask(pack_mask(mask)), mask)
    ragged = torch.rand(3, 5, 13) < 0.5  # (..., n) with a ragged last byte: the plain path's
    assert pack_mask(ragged).shape == (3, 5, 2)
    assert torch.equal(unpack_mask(pack_mask(ragged), 13), ragged)


def _layer(bias: bool, p: float, train_base: bool = False):
    torch.manual_seed(0)
    model = peftkit.get_peft_model(
        nn.ModuleDict({"t": nn.Linear(16, 12, bias=bias)}),
        peftkit.LoraConfig(
            target_modules=["t"], r=4, lora_alpha=8, lora_dropout=p, init_lora_weights=False
        ),
    )
    layer = model.base_model.model["t"]
    if train_base:
        layer.base_layer.requires_grad_(True)
    return layer


def _run(layer, x, seed=1):
    torch.manual_seed(seed)
    x = x.clone().requires_grad_(True)
    y = layer(x)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    layer.zero_grad(set_to_none=True)
    return y.detach(), x.grad, grads


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("shape", [(5, 16), (3, 4, 16)])
@pytest.mark.parametrize("train_base", [False, True])
def test_fused_equals_plain(monkeypatch, bias, p, shape, train_base):
    layer = _layer(bias, p, train_base).train()
    x = torch.randn(shape)
    assert lora_fused.fast_path_operands(layer, "default", x)
    calls = []
    real = lora_fused._LoraLinearFn.apply
    monkeypatch.setattr(lora_fused._LoraLinearFn, "apply", lambda *a: calls.append(1) or real(*a))
    fused = _run(layer, x)
    assert calls, "the fused node did not run"
    monkeypatch.setattr(lora_fused, "fast_path_operands", lambda *a: None)
    plain = _run(layer, x)
    torch.testing.assert_close(fused[0], plain[0])
    torch.testing.assert_close(fused[1], plain[1])
    assert fused[2].keys() == plain[2].keys()
    for name in plain[2]:
        torch.testing.assert_close(fused[2][name], plain[2][name], msg=name)
    if train_base:
        assert "base_layer.weight" in plain[2]


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("compute_dtype", [None, torch.bfloat16])
def test_fused_on_a_4bit_base_equals_plain(monkeypatch, p, compute_dtype):
    """QLoRA: the fused node reads the 4-bit weight through ``weight_for_matmul`` (scratch,
    dequantised again in backward); same outputs and gradients as the plain path. A compute
    dtype other than the input's keeps the plain path (its casts are the layer's own)."""
    from peftkit.quant import Linear4bit

    torch.manual_seed(0)
    base = Linear4bit.from_linear(nn.Linear(64, 64), compute_dtype=compute_dtype)
    model = peftkit.get_peft_model(
        nn.ModuleDict({"t": base, "u": Linear4bit.from_linear(nn.Linear(64, 48))}),
        peftkit.LoraConfig(
            target_modules=["t"], r=4, lora_alpha=8, lora_dropout=p, init_lora_weights=False
        ),
    )
    layer, other = model.base_model.model["t"].train(), model.base_model.model["u"]
    x = torch.randn(3, 5, 64)
    assert (lora_fused.fast_path_operands(layer, "default", x) is not None) == (
        compute_dtype is None
    )
    if compute_dtype is not None:
        return

    def run():  # another 4-bit layer after it reuses the same scratch buffers
        torch.manual_seed(7)
        xi = x.clone().requires_grad_(True)
        y = other(torch.tanh(layer(xi)))
        (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
        grads = {n: q.grad.clone() for n, q in layer.named_parameters() if q.grad is not None}
        layer.zero_grad(set_to_none=True)
        return y.detach(), xi.grad, grads

    calls = []
    real = lora_fused._LoraLinearFn.apply
    monkeypatch.setattr(lora_fused._LoraLinearFn, "apply", lambda *a: calls.append(1) or real(*a))
    fused = run()
    assert calls, "the fused node did not run"
    monkeypatch.setattr(lora_fused, "fast_path_operands", lambda *a: None)
    plain = run()
    torch.testing.assert_close(fused[0], plain[0])
    torch.testing.assert_close(fused[1], plain[1])
    assert fused[2].keys() == plain[2].keys() == {"lora_A.default.weight", "lora_B.default.weight"}
    for name in plain[2]:
        torch.testing.assert_close(fused[2][name], plain[2][name], msg=name)


@pytest.mark.parametrize("kind", ["bernoulli", "fast"])
def test_dropout_draws_the_plain_paths_mask(monkeypatch, kind):
    """Same RNG state -> same mask as the plain path; a different seed -> another mask."""
    monkeypatch.setattr(dropout_mask, "_kind", kind)
    layer = _layer(False, 0.5).train()
    x = torch.randn(6, 16)
    fused_1, fused_2 = _run(layer, x, seed=3)[0], _run(layer, x, seed=4)[0]
    monkeypatch.setattr(lora_fused, "fast_path_operands", lambda *a: None)
    torch.testing.assert_close(fused_1, _run(layer, x, seed=3)[0])
    assert not torch.allclose(fused_1, fused_2)


def test_inference_no_grad_equals_plain(monkeypatch):
    layer = _layer(True, 0.1).eval()
    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        fused = layer(x)
    monkeypatch.setattr(lora_fused, "fast_path_operands", lambda *a: None)
    with torch.no_grad():
        torch.testing.assert_close(fused, layer(x))


def test_inference_with_grad_enabled_but_nothing_trainable_equals_plain(monkeypatch):
    """Grad mode on, nothing requiring grad (a frozen model in eval): no node is recorded."""
    layer = _layer(True, 0.1).eval()
    layer.requires_grad_(False)
    x = torch.randn(2, 3, 16)
    fused = layer(x)
    assert fused.grad_fn is None
    monkeypatch.setattr(lora_fused, "fast_path_operands", lambda *a: None)
    torch.testing.assert_close(fused, layer(x))


def test_plain_path_where_the_fused_one_must_not_run():
    x = torch.randn(3, 16)
    layer = _layer(True, 0.0)
    handle = layer.base_layer.register_forward_pre_hook(lambda m, a: None)  # e.g. ZeRO-3
    assert not lora_fused.fast_path_operands(layer, "default", x)
    handle.remove()
    assert lora_fused.fast_path_operands(layer, "default", x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not lora_fused.fast_path_operands(layer, "default", x)
    assert not lora_fused.fast_path_operands(layer, "default", x.double())
    assert not lora_fused.fast_path_operands(
        layer, "default", torch.randn(3, 12)[:, :12].repeat(1, 1)
    )
    for config in (dict(lora_bias=True), dict(use_dora=True)):
        model = peftkit.get_peft_model(
            nn.ModuleDict({"t": nn.Linear(16, 12)}),
            peftkit.LoraConfig(target_modules=["t"], **config),
        )
        t = model.base_model.model["t"]
        assert not lora_fused.fast_path_operands(t, "default", x) or t.lora_magnitude_vector
    conv1d = peftkit.get_peft_model(
        nn.ModuleDict({"t": Conv1D(12, 16)}),
        peftkit.LoraConfig(target_modules=["t"], fan_in_fan_out=True),
    )
    assert not lora_fused.fast_path_operands(conv1d.base_model.model["t"], "default", x)


def _llama_step(model, ids, seed=0):
    torch.manual_seed(seed)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_llama_step_equals_plain(monkeypatch, p, checkpointing):
    base = tiny_model("llama", "CAUSAL_LM")
    model = peftkit.get_peft_model(
        base,
        peftkit.LoraConfig(
            task_type="CAUSAL_LM",
            r=4,
            lora_dropout=p,
            target_modules="all-linear",
            init_lora_weights=False,
        ),
    ).train()
    if checkpointing:
        model.base_model.model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    ids = torch.randint(
        0, base.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0)
    )
    calls = []
    real = lora_fused._LoraLinearFn.apply
    monkeypatch.setattr(lora_fused._LoraLinearFn, "apply", lambda *a: calls.append(1) or real(*a))
    fused = _llama_step(model, ids)
    assert len(calls) >= 14  # every adapted linear layer of the 2-layer model took the fused node
    monkeypatch.setattr(lora_fused, "fast_path_operands", lambda *a: None)
    plain = _llama_step(model, ids)
    torch.testing.assert_close(fused[0], plain[0])
    assert fused[1].keys() == plain[1].keys() and fused[1]
    for name in plain[1]:
        torch.testing.assert_close(fused[1][name], plain[1][name], msg=name)


@pytest.mark.filterwarnings("ignore")
def test_trained_through_fused_path_saves_and_loads_as_before(tmp_path, monkeypatch):
    base = tiny_model("llama", "CAUSAL_LM")
    config = peftkit.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules="all-linear")
    model = peftkit.get_peft_model(copy.deepcopy(base), config).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(
        0, base.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0)
    )
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(tmp_path)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    loaded = peftkit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    monkeypatch.setattr(lora_fused, "fast_path_operands", lambda *a: None)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected)
    import peft

    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, expected)
