"""AdaLoRA layer maths: ``y = W x + B (A ⊙ E) x · alpha / (init_r + 1e-5)``, merge, disable, dropout."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import assert_rel_close, logits_of
from peftkit import AdaLoraConfig, LoraConfig, get_peft_model
from peftkit.methods.adalora import SVDLinear


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.lin = nn.Linear(8, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.lin(self.emb(ids)))).mean(1)  # (B, 3)


IDS = torch.randint(0, 20, (3, 5), generator=torch.Generator().manual_seed(0))


def _cfg(**kw) -> AdaLoraConfig:
    base = dict(target_modules=["lin"], init_r=4, target_r=2, total_step=20, lora_alpha=6)
    return AdaLoraConfig(**{**base, **kw})


def test_forward_is_the_svd_formula():
    torch.manual_seed(0)
    toy = Toy()
    lin = copy.deepcopy(toy.lin)
    model = get_peft_model(toy, _cfg(init_lora_weights=False)).eval()
    layer = model.base_model.model.lin
    assert isinstance(layer, SVDLinear)
    A, E, B = layer.lora_A["default"], layer.lora_E["default"], layer.lora_B["default"]
    assert (A.shape, E.shape, B.shape) == ((4, 8), (4, 1), (6, 4))
    x = torch.randn(2, 3, 8)
    x64 = x.double()
    expected = lin(x).double() + x64 @ (A.double() * E.double()).T @ B.double().T * 6 / (
        4 + 1e-5
    )  # W x + b + B (A ⊙ E) x · alpha / (ranknum + eps)
    with torch.no_grad():
        assert_rel_close(layer(x).double(), expected)
        assert_rel_close(
            layer.delta_weight("default").double(),
            B.double() @ (A.double() * E.double()) * 6 / (4 + 1e-5),
        )


def test_fresh_adapter_is_identity_and_trains_only_the_triplets():
    torch.manual_seed(0)
    toy = Toy().eval()
    ref = toy(IDS)
    model = get_peft_model(copy.deepcopy(toy), _cfg()).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), ref)  # E starts at zero
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {f"base_model.model.lin.lora_{f}.default" for f in ("A", "E", "B")}


def test_merge_unmerge_and_disable_on_gpt2_conv1d(tiny_model):
    base, inputs = tiny_model("gpt2")
    plain = copy.deepcopy(base)
    cfg = AdaLoraConfig(
        target_modules=["c_attn", "c_proj"],
        init_r=4,
        target_r=2,
        total_step=10,
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    with pytest.warns(UserWarning, match="fan_in_fan_out=True"):
        model = get_peft_model(base, cfg).eval()
    with torch.no_grad():
        unmerged = logits_of(model(**inputs))
        reference = logits_of(plain(**inputs))
        assert not torch.allclose(unmerged, reference, atol=1e-3)
        with model.disable_adapter():
            assert_rel_close(logits_of(model(**inputs)), reference)
        model.merge_adapter()
        assert_rel_close(logits_of(model(**inputs)), unmerged)
        model.unmerge_adapter()
        assert_rel_close(logits_of(model(**inputs)), unmerged)
        merged = model.merge_and_unload()
        assert not any("lora" in n for n, _ in merged.named_parameters())
        assert_rel_close(logits_of(merged(**inputs)), unmerged)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    model = get_peft_model(Toy(), _cfg(init_lora_weights=False, lora_dropout=0.5))
    layer = model.base_model.model.lin
    x = torch.randn(4, 8)
    layer.eval()
    with torch.no_grad():
        off = layer(x)
        A, E, B = layer.triplet("default")
        no_dropout = layer.base_layer(x) + x @ (A * E).T @ B.T * 6 / (4 + 1e-5)
        assert_rel_close(off, no_dropout)
    layer.train()
    on = layer(x)
    assert not torch.allclose(on, off)
    on.sum().backward()  # gradients reach every factor through the seeded-dropout path
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (A, E, B))


def test_unsupported_target_and_second_trainable_adapter_are_refused():
    with pytest.raises(TypeError, match="AdaLoRA cannot adapt a Embedding"):
        get_peft_model(Toy(), _cfg(target_modules=["emb"]))
    model = get_peft_model(Toy(), _cfg())
    with pytest.raises(ValueError, match="one adapter at a time"):
        model.add_adapter("other", _cfg())
    model.add_adapter("frozen", _cfg(inference_mode=True))  # a second, frozen adapter is fine
    assert model.base_model.trainable_adapter_name == "default"
    with pytest.raises(ValueError, match="cannot add a LORA adapter"):
        model.add_adapter("lora", LoraConfig(target_modules=["lin"]))
