"""PEFT's LoRA matrix on small models: every row accepted-and-equal-to-PEFT, or refused by name.

Rows follow the LoRA part of PEFT's ``tests/test_custom_models.py`` (our own builders, same layer
kinds). An accepted row checks, against ``peft`` with the same tensors (fp32, rel. err <= 1e-5):

    forward · gradients of one backward · disable_adapter · merge_and_unload · unload
    PEFT's file -> peftkit · peftkit's file == PEFT's file (keys, tensors) · ours -> PEFT
    both adapters active at once (set_adapter([...])) · a mixed-adapter batch
    (or, for each, the same refusal as PEFT, e.g. DoRA in mixed batches, merging a grouped conv)

A refused row checks that ``LoraConfig(...)`` / ``get_peft_model`` / ``adapter_config.json``
give a ValueError naming the option.
"""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftkit
from peftkit.config import config_from_dict

TOL = dict(rtol=1e-5, atol=1e-6)


# --- models (inputs are part of the model's recipe) -------------------------------------------
class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.relu, self.lin1 = nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 2)

    def forward(self, x):
        return self.lin1(self.relu(self.lin0(x)))  # (B, 2)


class WideMLP(nn.Module):
    """Widths that are multiples of 8: LoRA's fused training node takes these layers."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.relu, self.lin1 = nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 2)

    def forward(self, x):
        return self.lin1(self.relu(self.lin0(x)))  # (B, 2)


class EmbConv1D(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.conv1d, self.lin0 = nn.Embedding(100, 5), Conv1D(4, 5), nn.Linear(40, 2)

    def forward(self, x):
        return self.lin0(self.conv1d(self.emb(x)).flatten(1))  # (B, 10, 4) -> (B, 2)


def _conv_model(conv: nn.Module, feature: int) -> type[nn.Module]:
    class ConvModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = copy.deepcopy(conv)
            self.lin0 = nn.Linear(feature, 2)

        def forward(self, x):
            return self.lin0(torch.relu(self.conv(x)).flatten(1))

    return ConvModel


class MHA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha, self.lin0 = nn.MultiheadAttention(10, 2), nn.Linear(10, 2)

    def forward(self, x):
        return self.lin0(self.mha(x, x, x)[0])  # (L, N, 10) -> (L, N, 2)


class Experts(nn.Module):
    """A mixture-of-experts block keeping every expert's weights in 3-d parameters (E, out, in);
    ``is_transposed``: stored (E, in, out), as some MoE layers do (PEFT reads that attribute)."""

    def __init__(self, is_transposed: bool = False) -> None:
        super().__init__()
        self.is_transposed = is_transposed
        up, down = torch.randn(3, 6, 5) * 0.3, torch.randn(3, 5, 6) * 0.3  # (E, out, in)
        self.up = nn.Parameter(up.transpose(1, 2).contiguous() if is_transposed else up)
        self.down = nn.Parameter(down.transpose(1, 2).contiguous() if is_transposed else down)

    def forward(self, x):  # (B, 5) through every expert, summed
        up, down = self.up, self.down  # (E, out, in) or (E, in, out)
        if self.is_transposed:
            up, down = up.transpose(1, 2), down.transpose(1, 2)
        h = torch.relu(torch.einsum("bi,eoi->beo", x, up))  # (B, E, 6)
        return torch.einsum("beh,eoh->bo", h, down)  # (B, 5)


def _moe(is_transposed: bool) -> type[nn.Module]:
    class MoE(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.experts, self.lin0 = Experts(is_transposed), nn.Linear(5, 2)

        def forward(self, x):
            return self.lin0(self.experts(x))  # (B, 2)

    return MoE


MODELS = {  # name -> (builder, input maker(batch))
    "MoE": (_moe(False), lambda b: torch.randn(b, 5)),
    "MoETransposed": (_moe(True), lambda b: torch.randn(b, 5)),
    "MHA": (MHA, lambda b: torch.randn(b, 3, 10)),
    "MLP": (MLP, lambda b: torch.randn(b, 10)),
    "WideMLP": (WideMLP, lambda b: torch.randn(b, 16)),
    "EmbConv1D": (EmbConv1D, lambda b: torch.randint(0, 100, (b, 10))),
    "Conv1d": (_conv_model(nn.Conv1d(5, 8, 3), 8 * 8), lambda b: torch.randn(b, 5, 10)),
    "Conv2d": (_conv_model(nn.Conv2d(5, 10, 3), 10), lambda b: torch.randn(b, 5, 3, 3)),
    "Conv2dGroups": (
        _conv_model(nn.Conv2d(16, 32, 3, padding=1, groups=2), 32 * 9),
        lambda b: torch.randn(b, 16, 3, 3),
    ),
    "Conv2dGroups2": (
        _conv_model(nn.Conv2d(16, 16, 3, padding=1, groups=4), 16 * 9),
        lambda b: torch.randn(b, 16, 3, 3),
    ),
    "Conv3d": (_conv_model(nn.Conv3d(5, 10, 3), 10), lambda b: torch.randn(b, 5, 3, 3, 3)),
    "Conv3d1x1": (_conv_model(nn.Conv3d(5, 6, 1), 6 * 8), lambda b: torch.randn(b, 5, 2, 2, 2)),
}


# --- the matrix -------------------------------------------------------------------------------
ACCEPTED = [
    ("Vanilla MLP 1 LoRA", "MLP", {"target_modules": "lin0"}),
    ("Vanilla MLP 2 LoRA", "MLP", {"target_modules": ["lin0"]}),
    ("Vanilla MLP 3 LoRA", "MLP", {"target_modules": ["lin1"]}),
    ("Vanilla MLP 4 LoRA", "MLP", {"target_modules": ["lin0", "lin1"]}),
    ("Vanilla MLP 5 LoRA", "MLP", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("Vanilla MLP 6 LoRA", "MLP", {"target_modules": ["lin0"], "lora_alpha": 4, "lora_dropout": 0.1}),
    ("Vanilla MLP rsLoRA + rank_pattern", "MLP",
     {"target_modules": ["lin0", "lin1"], "use_rslora": True, "rank_pattern": {"lin1": 2}}),
    ("Vanilla MLP 7 LoRA with DoRA", "MLP", {"target_modules": ["lin0"], "use_dora": True}),
    ("Vanilla MLP 8 LoRA with DoRA", "MLP", {"target_modules": ["lin0", "lin1"], "use_dora": True}),
    ("Vanilla MLP 9 LoRA with DoRA", "MLP", {"target_modules": "lin1", "use_dora": True, "lora_alpha": 32}),
    ("Embedding + transformers Conv1D 1 LoRA", "EmbConv1D", {"target_modules": ["conv1d"]}),
    ("Embedding + transformers Conv1D 2 LoRA", "EmbConv1D", {"target_modules": ["emb"]}),
    ("Embedding + transformers Conv1D 3 LoRA", "EmbConv1D", {"target_modules": ["emb", "conv1d"]}),
    ("Embedding + transformers Conv1D 1 DoRA", "EmbConv1D", {"target_modules": ["conv1d"], "use_dora": True}),
    ("Embedding + transformers Conv1D 2 DoRA", "EmbConv1D", {"target_modules": ["emb"], "use_dora": True}),
    ("Embedding + transformers Conv1D 3 DoRA", "EmbConv1D",
     {"target_modules": ["emb", "conv1d"], "use_dora": True}),
    ("Conv1d LoRA", "Conv1d", {"target_modules": ["conv"]}),
    ("Conv1d LoRA with DoRA", "Conv1d", {"target_modules": ["conv"], "use_dora": True}),
    ("Conv2d 1 LoRA", "Conv2d", {"target_modules": ["conv"]}),
    ("Conv2d 2 LoRA", "Conv2d", {"target_modules": ["conv", "lin0"]}),
    ("Conv2d 1 LoRA with DoRA", "Conv2d", {"target_modules": ["conv"], "use_dora": True}),
    ("Conv2d 2 LoRA with DoRA", "Conv2d", {"target_modules": ["conv", "lin0"], "use_dora": True}),
    ("Conv2d Groups LoRA", "Conv2dGroups", {"target_modules": ["conv"]}),
    ("Conv2d Groups2 LoRA", "Conv2dGroups2", {"target_modules": ["conv"]}),
    ("Conv3d 1 LoRA", "Conv3d", {"target_modules": ["conv"]}),
    ("Conv3d 2 LoRA", "Conv3d", {"target_modules": ["conv", "lin0"]}),
    ("Conv3d 1 LoRA with DoRA", "Conv3d", {"target_modules": ["conv"], "use_dora": True}),
    ("Conv3d 2 LoRA with DoRA", "Conv3d", {"target_modules": ["conv", "lin0"], "use_dora": True}),
    ("Conv3d 1x1 LoRA", "Conv3d1x1", {"target_modules": ["conv"]}),
    ("Conv3d 1x1 LoRA with DoRA", "Conv3d1x1", {"target_modules": ["conv"], "use_dora": True}),
    ("Vanilla MLP 1 LoRA with lora_b bias", "MLP",
     {"target_modules": ["lin0", "lin1"], "lora_bias": True, "lora_alpha": 32}),
    ("Conv2d 1 LoRA with lora_b bias", "Conv2d", {"target_modules": ["conv"], "lora_bias": True, "lora_alpha": 32}),
    ("Conv3d 1 LoRA with lora_b bias", "Conv3d", {"target_modules": ["conv"], "lora_bias": True, "lora_alpha": 32}),
    ("Conv2d Groups LoRA with DoRA", "Conv2dGroups", {"target_modules": ["conv"], "use_dora": True}),
    ("Conv2d Groups2 LoRA with DoRA", "Conv2dGroups2", {"target_modules": ["conv"], "use_dora": True}),
    ("MHA 1 LoRA", "MHA", {"target_modules": ["mha"]}),
    ("MHA 2 LoRA", "MHA", {"target_modules": ["mha", "lin0"]}),
    ("Embedding + transformers Conv1D 1 LoRA trainable_tokens", "EmbConv1D",
     {"target_modules": ["conv1d"], "trainable_token_indices": {"emb": [0, 10]}}),
    ("MLP 1 using nn.Parameter LoRA", "MLP", {"target_parameters": ["lin0.weight"]}),
    ("MLP 2 using nn.Parameter LoRA", "MLP", {"target_modules": ["lin0"], "target_parameters": ["lin1.weight"]}),
    ("MoE 3-d nn.Parameters LoRA (nested)", "MoE", {"target_parameters": ["experts.up", "experts.down"], "r": 2}),
    ("MoE transposed 3-d nn.Parameter LoRA", "MoETransposed",
     {"target_modules": ["lin0"], "target_parameters": ["up"], "r": 2, "rank_pattern": {"up": 3}}),
]  # fmt: skip

# (row, model, config kwargs, the option the refusal must name)
REFUSED = [
    ("Vanilla MLP 1 LoRA with KaSA", "MLP", {"target_modules": ["lin0"], "kasa_config": {}, "r": 4}, "kasa_config"),
    ("Vanilla MLP 1 LoRA with MiCA", "MLP", {"target_modules": ["lin0"], "init_lora_weights": "mica"}, "init_lora_weights"),
    ("Vanilla MLP 10 LoRA with VeLoRA", "MLP", {"target_modules": ["lin0"], "velora_config": {"num_groups": 2}}, "velora_config"),
    ("Vanilla MLP 1 LoRA with MonteCLoRA", "MLP", {"target_modules": ["lin0"], "monteclora_config": {"num_samples": 2}}, "monteclora_config"),
    ("PiSSA init", "MLP", {"target_modules": ["lin0"], "init_lora_weights": "pissa_niter_4"}, "init_lora_weights"),
    ("LoftQ", "MLP", {"target_modules": ["lin0"], "loftq_config": {"loftq_bits": 4}}, "loftq_config"),
    ("layer replication", "MLP", {"target_modules": ["lin0"], "layer_replication": [[0, 1]]}, "layer_replication"),
    ("QA-LoRA", "MLP", {"target_modules": ["lin0"], "use_qalora": True}, "use_qalora"),
    ("DoRA + lora_bias", "MLP", {"target_modules": ["lin0"], "use_dora": True, "lora_bias": True}, "lora_bias"),
]  # fmt: skip

# Accepted by PEFT, refused by peftkit when the model is wrapped (the layer kind decides).
REFUSED_AT_WRAP = [
    ("Embedding with lora_bias", "EmbConv1D", {"target_modules": ["emb"], "lora_bias": True}, "lora_bias"),
]  # fmt: skip


# --- helpers ----------------------------------------------------------------------------------
def _peft_model(base: nn.Module, kwargs: dict, seed: int) -> peft.PeftModel:
    torch.manual_seed(seed)
    model = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **kwargs)
    )
    with torch.no_grad():  # DoRA: move m away from ||W + sBA|| so the magnitude matters
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(torch.rand_like(param) + 0.5)
            if "trainable_tokens_delta" in name:  # new values for the trained rows
                param.add_(torch.randn_like(param))
    return model.eval()


def _run(model: nn.Module, x: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(x, **kwargs)


def _grads(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(x).square().sum().backward()
    out = {}
    for name, param in model.named_parameters():
        if param.grad is not None:
            name = name.replace(
                "lora_magnitude_vector.default.weight", "lora_magnitude_vector.default"
            )
            out[name] = param.grad.clone()
    return out


def _files(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


# --- accepted rows ----------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("row, model_name, kwargs", ACCEPTED, ids=[r[0] for r in ACCEPTED])
def test_accepted_row_matches_peft(tmp_path, row, model_name, kwargs):
    builder, make_input = MODELS[model_name]
    torch.manual_seed(0)
    base = builder().eval()
    x = make_input(4)
    plain = _run(base, x)
    theirs = _peft_model(base, kwargs, seed=1)
    theirs.save_pretrained(tmp_path / "peft")

    # PEFT's file -> peftkit: forward, gradients, disable_adapter
    ours = peftkit.PeftModel.from_pretrained(
        copy.deepcopy(base), tmp_path / "peft", is_trainable=True
    )
    ours.eval()
    expected = _run(theirs, x)
    assert not torch.allclose(expected, plain), "the adapter must change the output"
    torch.testing.assert_close(_run(ours, x), expected, **TOL)
    their_grads, our_grads = _grads(theirs, x), _grads(ours, x)
    assert sorted(our_grads) == sorted(their_grads)
    for name, grad in their_grads.items():
        torch.testing.assert_close(our_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    with ours.disable_adapter():
        torch.testing.assert_close(_run(ours, x), plain, **TOL)

    # peftkit's file == PEFT's file; PEFT loads ours
    ours.save_pretrained(tmp_path / "ours")
    mine, peft_file = _files(tmp_path / "ours"), _files(tmp_path / "peft")
    assert sorted(mine) == sorted(peft_file)
    for key, value in peft_file.items():
        torch.testing.assert_close(mine[key], value, rtol=0, atol=0)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(_run(back, x), expected, **TOL)

    # mixed-adapter batch with a second adapter, or PEFT's refusal
    theirs_b = _peft_model(base, kwargs, seed=2)
    theirs_b.save_pretrained(tmp_path / "peft_b")
    theirs.load_adapter(str(tmp_path / "peft_b"), adapter_name="other")
    ours.load_adapter(tmp_path / "peft_b", adapter_name="other")
    ours.eval()
    # both adapters active at once (PEFT's base_model.set_adapter([...])), or PEFT's refusal
    try:
        theirs.base_model.set_adapter(["default", "other"])
        both = _run(theirs, x)
    except ValueError:
        with pytest.raises(ValueError):
            ours.set_adapter(["default", "other"])
    else:
        ours.set_adapter(["default", "other"])
        assert ours.active_adapters == ["default", "other"]
        torch.testing.assert_close(_run(ours, x), both, **TOL)
    theirs.base_model.set_adapter("default")
    ours.set_adapter("default")
    assert ours.active_adapters == ["default"]
    names = ["default", "other", "__base__", "other"]
    try:
        mixed = _run(theirs, x, adapter_names=names)
    except (ValueError, TypeError):
        with pytest.raises(ValueError, match="DoRA|mixed"):
            _run(ours, x, adapter_names=names)
    else:
        torch.testing.assert_close(_run(ours, x, adapter_names=names), mixed, **TOL)
    theirs.delete_adapter("other")
    ours.delete_adapter("other")

    # merge_and_unload (or PEFT's refusal), unload
    try:
        merged = _run(copy.deepcopy(theirs).merge_and_unload(), x)
    except NotImplementedError:  # PEFT refuses: grouped convolutions
        with pytest.raises(ValueError, match="cannot be merged"):
            copy.deepcopy(ours).merge_and_unload()
    except RuntimeError:  # PEFT 0.21 crashes merging a 1x1x1 Conv3d: compare with its forward
        torch.testing.assert_close(_run(copy.deepcopy(ours).merge_and_unload(), x), expected, **TOL)
    else:
        torch.testing.assert_close(_run(copy.deepcopy(ours).merge_and_unload(), x), merged, **TOL)
        again = copy.deepcopy(ours)  # merge then unmerge restores the base weights
        again.merge_adapter()
        torch.testing.assert_close(_run(again, x), expected, **TOL)
        again.unmerge_adapter()
        with again.disable_adapter():
            torch.testing.assert_close(_run(again, x), plain, **TOL)
    torch.testing.assert_close(_run(ours.unload(), x), plain, **TOL)


# --- refused rows -----------------------------------------------------------------------------
@pytest.mark.parametrize("row, model_name, kwargs, option", REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_row_names_the_option(tmp_path, row, model_name, kwargs, option):
    with pytest.raises(ValueError, match=f"{option}.*not implement|not implement.*{option}"):
        peftkit.LoraConfig(**kwargs)
    data = {"peft_type": "LORA", **json.loads(json.dumps(kwargs))}  # as adapter_config.json
    with pytest.raises(ValueError, match=option):
        config_from_dict(data)


@pytest.mark.parametrize(
    "row, model, kwargs, option", REFUSED_AT_WRAP, ids=[r[0] for r in REFUSED_AT_WRAP]
)
def test_refused_layer_kind_names_the_option(row, model, kwargs, option):
    base = (MODELS[model][0] if isinstance(model, str) else model)()
    with pytest.raises(ValueError, match=f"{option}.*not (implement|support)"):
        peftkit.get_peft_model(base, peftkit.LoraConfig(**kwargs))


def test_gru_in_modules_to_save_refuses_mixed_batches():
    class WithGRU(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin0, self.gru = nn.Linear(4, 4), nn.GRU(4, 4)

        def forward(self, x):
            return self.gru(self.lin0(x))[0]

    config = dict(target_modules=["lin0"], modules_to_save=["gru"])
    model = peftkit.get_peft_model(WithGRU(), peftkit.LoraConfig(**config))
    model.add_adapter("other", peftkit.LoraConfig(**config))
    with pytest.raises(ValueError, match="GRU are not supported"):
        _run(model.eval(), torch.randn(2, 3, 4), adapter_names=["default", "other"])


# --- train mode: dropout drawn as PEFT draws it ------------------------------------------------
# Every row above runs in eval mode, where dropout is the identity. These rows run in train mode
# from one RNG state: peftkit draws LoRA dropout's keep-mask as nn.Dropout does (the default
# "bernoulli" mask), so outputs and gradients must equal PEFT's, and differ from eval mode.
DROPOUT_ROWS = [
    ("MLP LoRA dropout", "MLP", {"target_modules": ["lin0", "lin1"], "lora_dropout": 0.3}),
    ("MLP LoRA dropout, fused node", "WideMLP",
     {"target_modules": ["lin0", "lin1"], "lora_dropout": 0.3}),
    ("MLP rsLoRA dropout", "MLP",
     {"target_modules": ["lin0"], "lora_dropout": 0.5, "use_rslora": True, "lora_alpha": 4}),
    ("MLP DoRA dropout", "MLP", {"target_modules": ["lin0"], "use_dora": True, "lora_dropout": 0.3}),
    ("Conv1D dropout", "EmbConv1D", {"target_modules": ["conv1d"], "lora_dropout": 0.3}),
    ("Conv2d dropout", "Conv2d", {"target_modules": ["conv", "lin0"], "lora_dropout": 0.3}),
    ("Conv2d DoRA dropout", "Conv2d",
     {"target_modules": ["conv"], "use_dora": True, "lora_dropout": 0.3}),
    ("MLP lora_bias dropout", "MLP",
     {"target_modules": ["lin0"], "lora_bias": True, "lora_dropout": 0.3}),
]  # fmt: skip


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("row, model_name, kwargs", DROPOUT_ROWS, ids=[r[0] for r in DROPOUT_ROWS])
def test_train_mode_dropout_matches_peft(tmp_path, row, model_name, kwargs):
    from peftkit import set_dropout_mask

    set_dropout_mask("bernoulli")
    builder, make_input = MODELS[model_name]
    torch.manual_seed(0)
    base = builder().eval()
    x = make_input(8)
    theirs = _peft_model(base, kwargs, seed=1)
    theirs.save_pretrained(tmp_path / "peft")
    ours = peftkit.PeftModel.from_pretrained(
        copy.deepcopy(base), tmp_path / "peft", is_trainable=True
    )
    results = {}
    for name, model in (("theirs", theirs), ("ours", ours)):
        model.train()
        torch.manual_seed(1234)  # the same masks for both
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        grads = {
            k.replace("lora_magnitude_vector.default.weight", "lora_magnitude_vector.default"): (
                p.grad.clone()
            )
            for k, p in model.named_parameters()
            if p.grad is not None
        }
        results[name] = out.detach(), grads
    (y_theirs, g_theirs), (y_ours, g_ours) = results["theirs"], results["ours"]
    torch.testing.assert_close(y_ours, y_theirs, **TOL)
    assert sorted(g_ours) == sorted(g_theirs) and g_ours
    for name, grad in g_theirs.items():
        torch.testing.assert_close(g_ours[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # dropout acted: the same adapter in eval mode gives another output
    assert not torch.allclose(y_ours, _run(ours.eval(), x))
