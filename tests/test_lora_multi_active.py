"""Several LoRA adapters active at once (set_adapter([...])): bookkeeping beyond the matrix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftkit


def _model() -> peftkit.PeftModel:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    model = peftkit.get_peft_model(base, peftkit.LoraConfig(target_modules=["0"], r=2))
    model.add_adapter("b", peftkit.LoraConfig(target_modules=["0", "2"], r=2))
    return model


def test_both_active_adapters_train_and_switching_back_freezes_one():
    model = _model()
    model.set_adapter(["default", "b"])
    assert model.active_adapters == ["default", "b"] and model.active_adapter == "default"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".default." in n for n in trainable) and any(".b." in n for n in trainable)
    model(torch.randn(3, 4)).sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_A" in n)
    model.set_adapter("b")
    assert not any(".default." in n for n, p in model.named_parameters() if p.requires_grad)


def test_deleting_one_active_adapter_keeps_the_other():
    model = _model()
    model.set_adapter(["default", "b"])
    model.delete_adapter("default")
    assert model.active_adapters == ["b"]


def test_unknown_name_is_refused():
    with pytest.raises(ValueError, match="no adapter named 'c'"):
        _model().set_adapter(["default", "c"])
