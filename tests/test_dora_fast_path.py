"""DoRA's fused no-dropout forward against the plain, written-out one: same outputs, same grads."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftkit
from peftkit.methods import dora

LAYERS = {
    "linear+bias": (lambda: nn.Linear(6, 5), (3, 4, 6)),
    "linear": (lambda: nn.Linear(6, 5, bias=False), (3, 6)),
    "gpt2-conv1d": (lambda: Conv1D(5, 6), (3, 4, 6)),
    "conv2d+bias": (lambda: nn.Conv2d(3, 4, 3), (2, 3, 5, 5)),
}


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("kind", list(LAYERS))
def test_fused_dora_equals_plain(kind):
    make, shape = LAYERS[kind]
    torch.manual_seed(0)
    model = peftkit.get_peft_model(
        nn.ModuleDict({"t": make()}),
        peftkit.LoraConfig(target_modules=["t"], r=2, use_dora=True, init_lora_weights=False),
    )
    layer = model.base_model.model["t"]
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].mul_(1.5)
    layer.train()
    x = torch.randn(shape)
    params = [p for p in layer.parameters() if p.requires_grad]
    outs, grads = [], []
    for run in (
        dora.forward,
        lambda *a: dora.forward_plain(*a, dora.magnitude_scale(layer, "default")),
    ):
        result = layer.base_layer(x)
        y = run(layer, "default", x, result)
        outs.append(y)
        grads.append(
            torch.autograd.grad((y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum(), params)
        )
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-6)
    for fast, plain in zip(*grads):
        torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-6)
