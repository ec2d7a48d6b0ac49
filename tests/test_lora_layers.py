"""LoRA layer maths, targeting rules and adapter management, checked against HF PEFT."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn

from conftest import ARCHS, assert_rel_close, logits_of
from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.methods.dropout_mask import pack_mask, unpack_mask
from peftkit.methods.lora import (
    LoraConv,
    LoraEmbedding,
    LoraLinear,
    _DropoutThenProject,
    dropout_then_project,
)


class Toy(nn.Module):
    """One of each layer type LoRA supports."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.conv1 = nn.Conv1d(8, 8, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(1, 4, kernel_size=3, padding=1)
        self.lin = nn.Linear(8, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)  # (B, T, 8)
        h = self.conv1(h.transpose(1, 2)).transpose(1, 2)  # (B, T, 8)
        img = self.conv2(h.unsqueeze(1)).mean(1)  # (B, T, 8)
        return self.head(torch.relu(self.lin(img))).mean(1)  # (B, 3)


TOY_TARGETS = ["emb", "conv1", "conv2", "lin"]
IDS = torch.randint(0, 20, (3, 5), generator=torch.Generator().manual_seed(0))


def _pair(config_kwargs):
    torch.manual_seed(0)
    base = Toy().eval()
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(**config_kwargs)).eval()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config_kwargs)).eval()
    theirs.load_state_dict(_to_peft_names(ours.state_dict()), strict=False)
    return base, ours, theirs


def _to_peft_names(state):
    return dict(state)  # identical in-memory layout: base_layer / lora_A.<name> / ...


@pytest.mark.parametrize("use_rslora", [False, True])
def test_every_layer_type_matches_peft(use_rslora):
    base, ours, theirs = _pair(
        dict(
            r=2,
            lora_alpha=6,
            target_modules=TOY_TARGETS,
            init_lora_weights=False,
            use_rslora=use_rslora,
        )
    )
    assert isinstance(ours.base_model.model.emb, LoraEmbedding)
    assert isinstance(ours.base_model.model.conv2, LoraConv)
    assert isinstance(ours.base_model.model.lin, LoraLinear)
    with torch.no_grad():
        a, b, plain = ours(IDS), theirs(IDS), base(IDS)
        assert_rel_close(a, b)
        assert (a - plain).abs().max() > 1e-3
        ours.merge_adapter()
        assert_rel_close(ours(IDS), a)
        ours.unmerge_adapter()
        # unmerge restores the base weights exactly up to fp32 rounding
        for name, p in base.named_parameters():
            restored = ours.base_model.model.get_parameter(
                name.replace("weight", "base_layer.weight").replace("bias", "base_layer.bias")
                if name.split(".")[0] in TOY_TARGETS
                else name
            )
            torch.testing.assert_close(restored, p, rtol=0, atol=1e-6)


def test_fresh_adapter_is_identity_and_gaussian_init():
    torch.manual_seed(0)
    base = Toy().eval()
    for init in (True, "gaussian"):
        model = get_peft_model(
            copy.deepcopy(base), LoraConfig(r=4, target_modules=TOY_TARGETS, init_lora_weights=init)
        )
        with torch.no_grad():
            torch.testing.assert_close(model(IDS), base(IDS))
    a = model.base_model.model.lin.lora_A["default"].weight
    assert abs(a.std().item() - 1 / 4) < 0.15  # gaussian: std 1/r


def test_rank_and_alpha_patterns_match_peft():
    kw = dict(
        r=2,
        lora_alpha=4,
        target_modules=TOY_TARGETS,
        init_lora_weights=False,
        rank_pattern={"lin": 5, "^conv.*": 3},
        alpha_pattern={"emb": 12},
    )
    _, ours, theirs = _pair(kw)
    layers = ours.base_model.model
    assert layers.lin.r["default"] == 5 and layers.conv1.r["default"] == 3
    assert layers.emb.scaling["default"] == 12 / 2
    for name in TOY_TARGETS:
        ref = theirs.base_model.model.get_submodule(name)
        assert getattr(layers, name).r == ref.r and getattr(layers, name).scaling == ref.scaling
    with torch.no_grad():
        assert_rel_close(ours(IDS), theirs(IDS))


def _targeted(model):
    return sorted(
        n for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")
    )


@pytest.mark.parametrize(
    "spec",
    [
        dict(target_modules="all-linear"),
        dict(target_modules=r".*\.(q_proj|v_proj)"),
        dict(
            target_modules=["q_proj", "v_proj", "gate_proj"],
            exclude_modules=["layers.0.self_attn.q_proj"],
        ),
        dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[1]),
        dict(target_modules=["q_proj"], layers_to_transform=0, layers_pattern="layers"),
    ],
)
def test_targeting_rules_select_what_peft_selects(spec, tiny_model):
    base, _ = tiny_model("llama")
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(task_type="CAUSAL_LM", **spec))
    theirs = peft.get_peft_model(base, peft.LoraConfig(task_type="CAUSAL_LM", **spec))
    assert _targeted(ours) == _targeted(theirs) and _targeted(ours)
    assert all("lm_head" not in n for n in _targeted(ours))


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_training_round_trips_with_peft(bias, tiny_model, tmp_path):
    base, inputs = tiny_model("bert")
    ours = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(task_type="SEQ_CLS", r=2, bias=bias, target_modules=["query", "value"]),
    )
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad and n.endswith("bias")]
    theirs_fresh = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(task_type="SEQ_CLS", r=2, bias=bias, target_modules=["query", "value"]),
    )
    expected = [
        n for n, p in theirs_fresh.named_parameters() if p.requires_grad and n.endswith("bias")
    ]
    assert sorted(trainable) == sorted(expected)
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        assert_rel_close(logits_of(theirs(**inputs)), logits_of(ours.eval()(**inputs)))
        assert_rel_close(logits_of(back(**inputs)), logits_of(ours(**inputs)))


@pytest.mark.parametrize("width", [8, 13])  # a multiple of 8 and a ragged last byte
def test_dropout_projection_gradients_match_explicit_dropout(width):
    x = torch.randn(4, 6, width, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, width, dtype=torch.float64, requires_grad=True)
    keep = torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) >= 0.3
    assert torch.equal(unpack_mask(pack_mask(keep), width), keep)
    out = _DropoutThenProject.apply(x, w, 0.3, keep)
    torch.testing.assert_close(out, (x * keep / 0.7) @ w.T)
    torch.autograd.gradcheck(lambda a, b: _DropoutThenProject.apply(a, b, 0.3, keep), (x, w))


def test_dropout_keeps_a_one_bit_mask_not_a_copy_of_the_input():
    x = torch.randn(2, 5, 64, requires_grad=True)
    w = torch.randn(4, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        dropout_then_project(x, w, 0.1).sum().backward()
    sizes = sorted(t.numel() * t.element_size() for t in saved)
    assert sizes == sorted([x.numel() * 4, w.numel() * 4, x.numel() // 8])
    # the mask really is random dropout at rate p: about 10% of the inputs are dropped
    big = torch.ones(200_000, 1, requires_grad=True)
    dropout_then_project(big, torch.ones(1, 1), 0.1).sum().backward()
    dropped = (big.grad == 0).float().mean().item()
    assert 0.09 < dropped < 0.11
    assert torch.allclose(big.grad[big.grad != 0], torch.tensor(1 / 0.9))


def test_dropout_is_active_in_training_only(tiny_model):
    base, inputs = tiny_model("llama")
    model = get_peft_model(
        base, LoraConfig(r=4, lora_dropout=0.5, target_modules=["q_proj"], init_lora_weights=False)
    )
    model.train()
    a, b = logits_of(model(**inputs)), logits_of(model(**inputs))
    assert not torch.allclose(a, b)
    model.eval()
    torch.testing.assert_close(logits_of(model(**inputs)), logits_of(model(**inputs)))


def test_named_adapters_add_set_delete_disable(tiny_model):
    base, inputs = tiny_model("llama")
    with torch.no_grad():
        plain = logits_of(base(**inputs))
    model = get_peft_model(
        base, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    )
    model.add_adapter("other", LoraConfig(r=3, target_modules=["v_proj"], init_lora_weights=False))
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("other", LoraConfig(r=3, target_modules=["v_proj"]))
    with torch.no_grad():
        first = logits_of(model(**inputs))
        model.set_adapter("other")
        second = logits_of(model(**inputs))
        assert not torch.allclose(first, second)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(".other." in n for n in trainable)
        with model.disable_adapter():
            torch.testing.assert_close(logits_of(model(**inputs)), plain)
        torch.testing.assert_close(logits_of(model(**inputs)), second)
        model.merge_adapter()
        with model.disable_adapter():  # a merged adapter is unmerged when disabled
            torch.testing.assert_close(logits_of(model(**inputs)), plain, atol=1e-5, rtol=1e-5)
        model.delete_adapter("other")
        assert model.active_adapter == "default"
        torch.testing.assert_close(logits_of(model(**inputs)), first)
        assert not any(".other." in n for n, _ in model.named_parameters())


def test_unload_restores_base_and_merge_and_unload_returns_plain_model(tiny_model):
    base, inputs = tiny_model("opt")
    with torch.no_grad():
        plain = logits_of(copy.deepcopy(base)(**inputs))
    model = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=4, target_modules=["q_proj", "fc1"], init_lora_weights=False),
    )
    with torch.no_grad():
        adapted = logits_of(model(**inputs))
        merged = model.merge_and_unload()
        assert type(merged) is type(base)
        assert not any("lora" in n for n, _ in merged.named_parameters())
        assert_rel_close(logits_of(merged(**inputs)), adapted)
    model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
    )
    with torch.no_grad():
        torch.testing.assert_close(logits_of(model.unload()(**inputs)), plain)


def test_print_trainable_parameters_format(capsys, tiny_model):
    base, _ = tiny_model("bloom")
    model = get_peft_model(base, LoraConfig(r=8, target_modules=["query_key_value"]))
    model.print_trainable_parameters()
    trainable, total = model.get_nb_trainable_parameters()
    line = capsys.readouterr().out.strip()
    assert line == (
        f"trainable params: {trainable:,} || all params: {total:,} || "
        f"trainable%: {100 * trainable / total:.4f}"
    )
    assert trainable == 2 * 8 * (32 + 96)  # 2 layers x r x (in + out) of query_key_value


def test_bloomz_560m_reference_count(capsys):
    from transformers import BloomConfig, BloomForCausalLM

    with torch.device("meta"):
        base = BloomForCausalLM(
            BloomConfig(hidden_size=1024, n_layer=24, n_head=16, vocab_size=250880)
        )
    model = get_peft_model(
        base, LoraConfig(task_type="CAUSAL_LM", r=8, target_modules=["query_key_value"])
    )
    model.print_trainable_parameters()
    assert capsys.readouterr().out.strip() == (
        "trainable params: 786,432 || all params: 560,001,024 || trainable%: 0.1404"
    )


def test_training_step_matches_peft(tiny_model):
    """Same weights, data and optimiser => the same update as HF PEFT (dropout 0)."""
    base, inputs = tiny_model("llama")
    labels = inputs["input_ids"].clone()
    kw = dict(
        task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]
    )
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(**kw))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    theirs.load_state_dict(ours.state_dict())
    opts = [
        torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        for m in (ours, theirs)
    ]
    for _ in range(3):
        for model, opt in zip((ours, theirs), opts):
            model.train()
            loss = model(**inputs, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    lora_keys = [k for k in ours_state if "lora_" in k]
    assert lora_keys and all(ours_state[k].abs().sum() > 0 for k in lora_keys if "lora_B" in k)
    for k in lora_keys:
        torch.testing.assert_close(ours_state[k], theirs_state[k], rtol=1e-5, atol=1e-7)


def test_half_precision_base_keeps_fp32_adapter(tiny_model):
    base, inputs = tiny_model("llama")
    model = get_peft_model(base.to(torch.bfloat16), LoraConfig(r=4, target_modules=["q_proj"]))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.dtype == torch.float32
    out = logits_of(model(**inputs))
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("arch", ["gpt2"])
def test_conv1d_fan_in_fan_out_merge(arch, tiny_model):
    base, inputs = tiny_model(arch)
    targets, task, _ = ARCHS[arch]
    model = get_peft_model(
        base,
        LoraConfig(
            task_type=task,
            r=4,
            target_modules=targets,
            fan_in_fan_out=True,
            init_lora_weights=False,
        ),
    )
    with torch.no_grad():
        before = logits_of(model(**inputs))
        model.merge_adapter()
        assert_rel_close(logits_of(model(**inputs)), before)


def test_lora_asks_a_quantized_base_through_its_named_interface():
    # any QuantizedLinear is adapted, read and merged through the interface's members (not by
    # probing attributes): a toy implementation records what LoRA asked of it
    from peftkit.inject import is_quantized_linear
    from peftkit.quant.linear4bit import Linear4bit, QuantizedLinear

    class Recorded(QuantizedLinear):
        def __init__(self) -> None:
            super().__init__()
            self.in_features, self.out_features, self.compute_dtype = 8, 6, torch.float32
            self.w, self.calls = torch.randn(6, 8, generator=torch.Generator().manual_seed(0)), []
            self.bias = None

        def dequantize(self, scratch=None):
            self.calls.append("dequantize")
            return self.w.clone()

        def weight_for_matmul(self):
            self.calls.append("weight_for_matmul")
            return self.w

        def requantize_(self, weight):
            self.calls.append("requantize_")
            self.w = weight.detach().clone()

        def forward(self, x):
            return x @ self.w.T

    assert is_quantized_linear(Recorded()) and issubclass(Linear4bit, QuantizedLinear)
    assert not is_quantized_linear(nn.Linear(8, 6))
    model = get_peft_model(
        nn.ModuleDict({"t": Recorded()}),
        LoraConfig(target_modules=["t"], r=2, lora_alpha=4, init_lora_weights=False),
    )
    layer, x = model.base_model.model["t"], torch.randn(3, 8)
    before = layer.base_layer.w.clone()
    model.train()
    y = layer(x)
    assert "weight_for_matmul" in layer.base_layer.calls  # the fused training node read it
    delta = (
        layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
    )
    torch.testing.assert_close(y, x @ (before + delta).T)
    with pytest.warns(UserWarning, match="re-quantizes"):
        model.merge_adapter()
    assert layer.base_layer.calls[-2:] == ["dequantize", "requantize_"]
    torch.testing.assert_close(layer.base_layer.w, before + delta.detach())
