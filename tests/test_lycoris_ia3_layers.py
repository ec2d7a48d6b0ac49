"""LoHa / LoKr / IA3 layers: the one-product fast path against the plain path, configs and
layer kinds refused by name, IA3's exact unmerge, and what PEFT's helpers compute."""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch
from peft.tuners.lokr.layer import factorization as peft_factorization
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftkit
from peftkit.config import config_from_dict
from peftkit.methods.lokr import factorization

TOL = dict(rtol=1e-5, atol=1e-6)


class Net(nn.Module):
    """A linear layer, a strided / dilated / grouped / reflect-padded conv, a 1-d conv."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(12, 12)
        self.conv = nn.Conv2d(4, 8, 3, stride=2, padding=2, dilation=2, groups=2)
        self.pad = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")
        self.c1 = nn.Conv1d(4, 6, 3)

    def forward(self, x):  # x (B, 4, 12)
        h = self.c1(self.lin(x))  # (B, 6, 10)
        img = self.lin(x).view(-1, 4, 12, 1).expand(-1, 4, 12, 12)  # (B, 4, 12, 12)
        return h.sum() + self.pad(self.conv(img)).sum(dim=(1, 2, 3))


METHODS = {
    "loha": (peftkit.LoHaConfig, {"r": 4, "init_weights": False}),
    "loha_cp": (peftkit.LoHaConfig, {"r": 4, "init_weights": False, "use_effective_conv2d": True}),
    "lokr": (peftkit.LoKrConfig, {"r": 2, "init_weights": False, "decompose_both": True}),
    "lokr_cp": (peftkit.LoKrConfig, {"r": 1, "init_weights": False, "use_effective_conv2d": True}),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_one_product_equals_base_plus_update(method):
    """``op(x, W + ΔW)`` (the forward) against ``base(x) + op(x, ΔW)`` (PEFT's form), values
    and gradients, in training mode with both dropouts drawn from one seed."""
    cls, kwargs = METHODS[method]
    torch.manual_seed(0)
    config = cls(
        target_modules=["lin", "conv", "pad", "c1"], rank_dropout=0.3, module_dropout=0.2, **kwargs
    )
    model = peftkit.get_peft_model(Net(), config)
    model.train()
    x = torch.randn(3, 4, 12)
    layers = [m for m in model.modules() if hasattr(m, "plain_forward")]
    assert len(layers) == 4
    params = [p for p in model.parameters() if p.requires_grad]
    for seed in range(4):
        torch.manual_seed(seed)
        fast = model(x)
        fast_grads = torch.autograd.grad(fast.sum(), params, allow_unused=True)
        for layer in layers:
            layer.forward = layer.plain_forward  # instance attribute: the plain path
        torch.manual_seed(seed)
        plain = model(x)
        plain_grads = torch.autograd.grad(plain.sum(), params, allow_unused=True)
        for layer in layers:
            del layer.forward
        torch.testing.assert_close(fast, plain, **TOL)
        for a, b in zip(fast_grads, plain_grads):  # None: module dropout skipped that adapter
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_reflect_padding_update_matches_the_merged_layer():
    """The update is convolved the way the base convolves (padding_mode honoured), so the
    unmerged adapter equals the merged one (PEFT zero-pads the update: they differ there)."""
    torch.manual_seed(0)
    base = Net().eval()
    model = peftkit.get_peft_model(
        copy.deepcopy(base), peftkit.LoHaConfig(target_modules=["pad"], init_weights=False)
    ).eval()
    x = torch.randn(2, 4, 12)
    with torch.no_grad():
        unmerged = model(x)
        merged = copy.deepcopy(model).merge_and_unload()(x)
    torch.testing.assert_close(unmerged, merged, **TOL)


@pytest.mark.parametrize("size", [1, 2, 7, 12, 16, 20, 36, 64, 127, 128, 144, 256, 768, 1000])
@pytest.mark.parametrize("factor", [-1, 1, 2, 3, 4, 8, 16, 100])
def test_factorization_equals_peft(size, factor):
    assert factorization(size, factor) == peft_factorization(size, factor)


def test_lokr_shapes_follow_the_decomposition_rules():
    layer = nn.Linear(64, 48)  # out 48 = 6 * 8, in 64 = 8 * 8
    model = peftkit.get_peft_model(
        nn.Sequential(layer), peftkit.LoKrConfig(target_modules=["0"], r=2)
    )
    lokr = model.base_model.model[0]
    assert tuple(lokr.lokr_w1["default"].shape) == (6, 8)  # full: decompose_both is off
    assert tuple(lokr.lokr_w2_a["default"].shape) == (8, 2)  # r=2 < max(8, 8) / 2: low rank
    assert tuple(lokr.lokr_w2_b["default"].shape) == (2, 8)
    assert (lokr.lokr_w1["default"] == 0).all()  # init True: W1 = 0, a zero update


# --- configs ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cls, kwargs, message",
    [
        (peftkit.LoHaConfig, {"r": 0}, "r must be a positive integer"),
        (peftkit.LoKrConfig, {"rank_dropout": 1.0}, "rank_dropout must be in"),
        (peftkit.LoHaConfig, {"module_dropout": -0.1}, "module_dropout must be in"),
        (
            peftkit.LoHaConfig,
            {"init_weights": "lycoris"},
            "init_weights must be one of True, False",
        ),
        (peftkit.LoKrConfig, {"init_weights": "pissa"}, "'lycoris'"),
        (peftkit.LoHaConfig, {"layers_pattern": "layers"}, "needs layers_to_transform"),
        (
            peftkit.IA3Config,
            {"target_modules": ["k"], "feedforward_modules": ["wo"]},
            r"subset of target_modules.*\['wo'\]",
        ),
    ],
)
def test_config_errors_name_the_field(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


def test_ia3_without_feedforward_modules_says_what_to_pass():
    with pytest.raises(ValueError, match="feedforward_modules is not set.*pass \\[\\]"):
        peftkit.get_peft_model(
            nn.Sequential(nn.Linear(4, 4)), peftkit.IA3Config(target_modules=["0"])
        )


@pytest.mark.parametrize("cls", ["LoHaConfig", "LoKrConfig", "IA3Config"])
def test_configs_round_trip_with_peft_json(cls, tmp_path):
    kwargs = {"target_modules": ["a", "b"]}
    kwargs |= {"feedforward_modules": ["b"]} if cls == "IA3Config" else {"r": 4, "alpha": 2}
    getattr(peft, cls)(**kwargs).save_pretrained(tmp_path / "peft")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every key PEFT writes is known
        ours = peftkit.PeftConfig.from_pretrained(tmp_path / "peft")
    assert type(ours).__name__ == cls and sorted(ours.target_modules) == ["a", "b"]
    ours.save_pretrained(tmp_path / "ours")
    back = peft.PeftConfig.from_pretrained(str(tmp_path / "ours"))
    assert type(back).__name__ == cls and back.target_modules == {"a", "b"}


def test_a_config_from_a_newer_version_warns_about_unknown_keys():
    data = {"peft_type": "LOKR", "target_modules": ["a"], "some_future_option": 3}
    with pytest.warns(UserWarning, match="some_future_option"):
        config = config_from_dict(json.loads(json.dumps(data)))
    assert isinstance(config, peftkit.LoKrConfig)


# --- layer kinds --------------------------------------------------------------------------------
class Kinds(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.gpt2, self.conv3d = nn.Embedding(10, 4), Conv1D(4, 4), nn.Conv3d(2, 2, 1)
        self.conv1d = nn.Conv1d(2, 2, 1)


@pytest.mark.parametrize(
    "cls, target",
    [
        ("LoHaConfig", "emb"),
        ("LoHaConfig", "gpt2"),
        ("LoKrConfig", "conv3d"),
        ("LoKrConfig", "gpt2"),
        ("IA3Config", "emb"),
        ("IA3Config", "conv1d"),
    ],
)
def test_layer_kinds_peft_refuses_are_refused_by_name(cls, target):
    kwargs = {"target_modules": [target]}
    if cls == "IA3Config":
        kwargs["feedforward_modules"] = []
    with pytest.raises((TypeError, ValueError)):
        peft.get_peft_model(Kinds(), getattr(peft, cls)(**kwargs))
    with pytest.raises(
        ValueError, match=rf"cannot adapt a {type(getattr(Kinds(), target)).__name__}.*supported"
    ):
        peftkit.get_peft_model(Kinds(), getattr(peftkit, cls)(**kwargs))


# --- IA3 ----------------------------------------------------------------------------------------
def test_ia3_unmerge_restores_the_weights_exactly_and_refuses_zero_vectors():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    config = peftkit.IA3Config(
        target_modules=["0", "2"], feedforward_modules=["2"], init_ia3_weights=False
    )
    model = peftkit.get_peft_model(copy.deepcopy(base), config)
    model.merge_adapter()
    model.unmerge_adapter()
    restored = model.unload().state_dict()
    for key, original in base.state_dict().items():
        torch.testing.assert_close(restored[key], original, rtol=1e-6, atol=0)
    model = peftkit.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        model.base_model.model[0].ia3_l["default"][1] = 0.0
    model.merge_adapter()
    weight = model.base_model.model[0].base_layer.weight.clone()
    with pytest.raises(ValueError, match="zeros in their IA3 vector"):
        model.unmerge_adapter()
    torch.testing.assert_close(model.base_model.model[0].base_layer.weight, weight)  # unchanged


def test_ia3_adapters_keep_their_own_side_of_a_layer():
    """Adapter "out" scales lin's output, "in" its input; active together, both apply."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 3))
    model = peftkit.get_peft_model(
        copy.deepcopy(base),
        peftkit.IA3Config(target_modules=["0"], feedforward_modules=[], init_ia3_weights=False),
        adapter_name="out",
    )
    model.add_adapter(
        "in",
        peftkit.IA3Config(target_modules=["0"], feedforward_modules=["0"], init_ia3_weights=False),
    )
    layer = model.base_model.model[0]
    l_out, l_in = layer.ia3_l["out"].flatten(), layer.ia3_l["in"].flatten()
    assert l_out.shape == (3,) and l_in.shape == (4,)
    model.set_adapter(["out", "in"])
    x = torch.randn(2, 4)
    with torch.no_grad():
        torch.testing.assert_close(model(x), l_out * base(x * l_in), **TOL)


def test_ia3_on_a_4bit_layer_runs_and_refuses_to_merge():
    from peftkit.quant import quantize_model

    torch.manual_seed(0)
    base = quantize_model(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)))
    model = peftkit.get_peft_model(
        base,
        peftkit.IA3Config(
            target_modules=["0", "2"], feedforward_modules=["2"], init_ia3_weights=False
        ),
    )
    x = torch.randn(2, 64)
    layer0, layer2 = model.base_model.model[0], model.base_model.model[2]
    with torch.no_grad():
        h = torch.relu(layer0.base_layer(x) * layer0.ia3_l["default"].flatten())
        expected = layer2.base_layer(h * layer2.ia3_l["default"].flatten())
        torch.testing.assert_close(model(x), expected, **TOL)
    with pytest.raises(ValueError, match="4-bit layer"):
        model.merge_and_unload()


def test_a_base_with_hooks_is_run_as_a_module():
    """ZeRO-3 gathers a partitioned weight in the base layer's pre-forward hook: with a hook on
    the base, the layer calls it (the plain path) instead of reading the weight directly."""
    torch.manual_seed(0)
    model = peftkit.get_peft_model(
        nn.Sequential(nn.Linear(6, 4)), peftkit.LoKrConfig(target_modules=["0"], init_weights=False)
    ).eval()
    x = torch.randn(3, 6)
    with torch.no_grad():
        folded = model(x)
    calls = []
    base = model.base_model.model[0].base_layer
    handle = base.register_forward_pre_hook(lambda module, args: calls.append(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), folded, **TOL)
    handle.remove()
    assert calls == [1]
