"""LoRA on nn.MultiheadAttention beyond the matrix rows: what PEFT computes, what is refused."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import peftkit
from peftkit.methods.lora import LoraLinear


class Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha, self.lin0 = nn.MultiheadAttention(8, 2), nn.Linear(8, 2)

    def forward(self, x):
        return self.lin0(self.mha(x, x, x)[0])


def _adapted(config: dict) -> peftkit.PeftModel:
    torch.manual_seed(0)
    return peftkit.get_peft_model(Attn(), peftkit.LoraConfig(init_lora_weights=False, **config))


def test_forward_is_peft_arithmetic_in_proj_once_out_proj_twice():
    """PEFT 0.21 adds the out_proj update twice (value), once in gradient; in_proj once."""
    model = _adapted(dict(target_modules=["mha"], r=2)).eval()
    layer = model.base_model.model.mha
    plain = copy.deepcopy(layer.base_layer)
    plain.out_proj = plain.out_proj.base_layer
    with torch.no_grad():
        d_in = (
            layer.lora_B["default"].weight
            @ layer.lora_A["default"].weight
            * layer.scaling["default"]
        )
        out = layer.out_layer
        d_out = out.lora_B["default"].weight @ out.lora_A["default"].weight * out.scaling["default"]
        plain.in_proj_weight += d_in
        plain.out_proj.weight += 2 * d_out
    x = torch.randn(5, 3, 8)
    with torch.no_grad():
        torch.testing.assert_close(layer(x, x, x)[0], plain(x, x, x)[0])
    # gradient of the out_proj factors: as for a single update evaluated at W + 2 d
    layer.zero_grad()
    layer(x, x, x)[0].sum().backward()
    ref = copy.deepcopy(layer)
    ref.zero_grad()
    single = LoraLinear.delta_weight(ref.out_layer, "default")  # s B'A' with its gradient
    w = ref.out_layer.base_layer.weight + d_out + single
    w_in = ref.base_layer.in_proj_weight + ref.delta_weight("default")
    y = torch.func.functional_call(
        ref.base_layer, {"in_proj_weight": w_in, "out_proj.base_layer.weight": w}, (x, x, x)
    )[0]
    y.sum().backward()
    grad, ref_grad = out.lora_A["default"].weight.grad, ref.out_layer.lora_A["default"].weight.grad
    torch.testing.assert_close(grad, ref_grad)


def test_merge_unmerge_and_switching_adapters():
    model = _adapted(dict(target_modules=["mha"], r=2)).eval()
    torch.manual_seed(1)
    model.add_adapter("b", peftkit.LoraConfig(target_modules=["mha"], r=4, init_lora_weights=False))
    x = torch.randn(5, 3, 8)
    with torch.no_grad():
        with model.disable_adapter():
            plain = model(x)
        a = model(x)
        model.set_adapter("b")
        b = model(x)
        assert not torch.allclose(a, b) and not torch.allclose(a, plain)
        model.merge_adapter()
        torch.testing.assert_close(model(x), b, rtol=1e-5, atol=1e-6)
        model.unmerge_adapter()
        with model.disable_adapter():
            torch.testing.assert_close(model(x), plain, rtol=1e-5, atol=1e-6)
        merged = copy.deepcopy(model).merge_and_unload()
        assert type(merged.mha.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
        assert isinstance(merged.mha.in_proj_weight, nn.Parameter)
        torch.testing.assert_close(merged(x), b, rtol=1e-5, atol=1e-6)


def test_out_proj_alone_is_refused_and_skipped_by_all_linear():
    with pytest.raises(ValueError, match="inside an nn.MultiheadAttention"):
        _adapted(dict(target_modules=["out_proj"]))
    with pytest.raises(ValueError, match="inside an nn.MultiheadAttention"):
        _adapted(dict(target_modules=["mha", "out_proj"]))
    with pytest.warns(UserWarning, match="out_proj of an nn.MultiheadAttention"):
        model = _adapted(dict(target_modules="all-linear"))
    assert not hasattr(model.base_model.model.mha, "lora_A")


@pytest.mark.parametrize("option", ["use_dora", "lora_bias"])
def test_dora_and_lora_bias_refused_on_mha(option):
    with pytest.raises(ValueError, match=f"{option}=True on nn.MultiheadAttention"):
        _adapted({"target_modules": ["mha"], option: True})
