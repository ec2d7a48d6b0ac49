"""LoRA on bare parameters (target_parameters) beyond the matrix rows: the rules PEFT applies."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftkit
from peftkit.methods.lora_param import LoraParam


class Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.lin1 = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.lin1(self.lin0(x))


def _model(**kwargs) -> peftkit.PeftModel:
    torch.manual_seed(0)
    return peftkit.get_peft_model(Two(), peftkit.LoraConfig(init_lora_weights=False, **kwargs))


def test_two_adapters_share_the_wrapper_and_switch():
    model = _model(target_parameters=["lin0.weight"]).eval()
    model.add_adapter("b", peftkit.LoraConfig(target_parameters=["lin0.weight"], r=2))
    layer = model.base_model.model.lin0
    assert isinstance(layer, LoraParam) and not isinstance(layer.base_layer, LoraParam)
    assert sorted(layer.r) == ["b", "default"]
    x = torch.randn(3, 4)
    with torch.no_grad():
        a = model(x)
        model.set_adapter("b")
        torch.testing.assert_close(model(x), model.base_model.model.lin1(layer.base_layer(x)))
        model.set_adapter("default")
        model.merge_adapter()
        torch.testing.assert_close(model(x), a)
        model.unmerge_adapter()
        torch.testing.assert_close(model(x), a)


def test_adapters_must_target_the_same_parameters():
    model = _model(target_parameters=["lin0.weight"])
    with pytest.raises(ValueError, match="same parameters"):
        model.add_adapter("b", peftkit.LoraConfig(target_parameters=["lin1.weight"]))


@pytest.mark.parametrize(
    "kwargs, option",
    [
        ({"lora_dropout": 0.1}, "lora_dropout"),
        ({"lora_bias": True}, "lora_bias"),
        ({"use_dora": True}, "use_dora"),
    ],
)
def test_options_refused_with_target_parameters(kwargs, option):
    with pytest.raises(ValueError, match=f"target_parameters.*{option}.*not supported"):
        _model(target_parameters=["lin0.weight"], **kwargs)


def test_parameter_of_an_adapted_module_or_unmatched_is_refused():
    with pytest.raises(ValueError, match="target_modules already adapts"):
        _model(target_modules=["lin0"], target_parameters=["lin0.weight"])
    with pytest.raises(ValueError, match="matched no parameter"):
        _model(target_parameters=["lin9.weight"])


def test_adalora_refuses_target_parameters():
    with pytest.raises(ValueError, match="target_parameters.*not implemented"):
        peftkit.AdaLoraConfig(target_parameters=["lin0.weight"], total_step=10)
