"""``add_weighted_adapter`` against HF PEFT: every combination type, same seed, same adapter.

Two non-identity adapters saved by PEFT are loaded into both libraries; each library combines
them from one seed (dare's random masks included), and the combined adapter must give PEFT's
output, save the same file, and load back into PEFT. Inputs that do not combine raise in both.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftkit
from peftkit.methods import task_arithmetic

TOL = dict(rtol=1e-5, atol=1e-6)
TYPES = [
    "svd",
    "linear",
    "cat",
    "ties",
    "ties_svd",
    "dare_ties",
    "dare_linear",
    "dare_ties_svd",
    "dare_linear_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
]


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.lin1 = nn.Linear(10, 20), nn.Linear(20, 6)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))  # (B, 6)


class EmbConv1D(nn.Module):
    """An embedding and GPT-2's Conv1D (weight stored (in, out)): the two transposed layouts."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.conv1d, self.lin0 = nn.Embedding(50, 12), Conv1D(6, 12), nn.Linear(60, 2)

    def forward(self, x):
        return self.lin0(torch.relu(self.conv1d(self.emb(x))).flatten(1))  # (B, 10, 6) -> (B, 2)


class Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv2d, self.lin0 = nn.Conv2d(5, 10, 3), nn.Linear(10, 6)

    def forward(self, x):
        return self.lin0(torch.relu(self.conv2d(x)).flatten(1))  # (B, 6)


MODELS = {  # name -> (builder, input maker, LoRA targets)
    "MLP": (MLP, lambda: torch.randn(4, 10), ["lin0", "lin1"]),
    "EmbConv1D": (EmbConv1D, lambda: torch.randint(0, 50, (4, 10)), ["emb", "conv1d"]),
    "Conv": (Conv, lambda: torch.randn(4, 5, 3, 3), ["conv2d", "lin0"]),
}


def _pair(tmp_path, model_name: str, configs: list[dict], lib_config=peft.LoraConfig):
    """PEFT and peftkit models holding the same adapters "a", "b", ... (PEFT-saved)."""
    builder, make_input, _ = MODELS[model_name]
    torch.manual_seed(0)
    base = builder().eval()
    names = [chr(ord("a") + i) for i in range(len(configs))]
    for i, (name, kwargs) in enumerate(zip(names, configs)):
        torch.manual_seed(10 + i)
        peft.get_peft_model(copy.deepcopy(base), lib_config(**kwargs)).save_pretrained(
            tmp_path / name
        )
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a", adapter_name="a")
    ours = peftkit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a", adapter_name="a")
    for name in names[1:]:
        theirs.load_adapter(str(tmp_path / name), adapter_name=name)
        ours.load_adapter(tmp_path / name, adapter_name=name)
    torch.manual_seed(1)
    return theirs.eval(), ours.eval(), base, make_input()


def _combined_output(model, x, name: str) -> torch.Tensor:
    model.set_adapter(name)
    with torch.no_grad():
        return model(x)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("combination", TYPES)
def test_lora_combination_matches_peft(tmp_path, model_name, combination):
    targets = MODELS[model_name][2]
    config = dict(target_modules=targets, r=4, lora_alpha=8, init_lora_weights=False)
    theirs, ours, base, x = _pair(tmp_path, model_name, [config, {**config, "lora_alpha": 3}])
    kwargs = dict(combination_type=combination, density=0.5)
    for model in (theirs, ours):
        torch.manual_seed(7)  # dare draws its masks here (after the new adapter's init draws)
        model.add_weighted_adapter(["a", "b"], [0.7, -0.5], "mix", **kwargs)
    expected = _combined_output(theirs, x, "mix")
    torch.testing.assert_close(_combined_output(ours, x, "mix"), expected, **TOL)
    with torch.no_grad():
        assert not torch.allclose(expected, base(x))

    # saved in PEFT's format: the same tensors, and PEFT loads it
    ours.save_pretrained(tmp_path / "ours", selected_adapters=["mix"])
    theirs.save_pretrained(tmp_path / "theirs", selected_adapters=["mix"])
    mine = load_file(str(tmp_path / "ours" / "mix" / "adapter_model.safetensors"))
    peft_file = load_file(str(tmp_path / "theirs" / "mix" / "adapter_model.safetensors"))
    assert sorted(mine) == sorted(peft_file)
    if "svd" not in combination:  # singular vectors may differ by sign; their product may not
        for key, value in peft_file.items():
            torch.testing.assert_close(mine[key], value, **TOL, msg=key)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours" / "mix").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x), expected, **TOL)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("combination", ["cat", "svd", "dare_ties_svd"])
def test_different_ranks_combine_by_cat_and_svd(tmp_path, combination):
    base_config = dict(target_modules=["lin0", "lin1"], init_lora_weights=False)
    configs = [{**base_config, "r": 4}, {**base_config, "r": 2}, {**base_config, "r": 3}]
    theirs, ours, _, x = _pair(tmp_path, "MLP", configs)
    for model in (theirs, ours):
        torch.manual_seed(7)
        model.add_weighted_adapter(
            ["a", "b", "c"], [1.0, 0.5, 2.0], "mix", combination_type=combination, density=0.7,
            svd_rank=3, svd_clamp=0.9,
        )  # fmt: skip
    torch.testing.assert_close(
        _combined_output(ours, x, "mix"), _combined_output(theirs, x, "mix"), **TOL
    )


@pytest.mark.filterwarnings("ignore")
def test_svd_rank_above_the_layer_size_keeps_the_whole_update(tmp_path):
    """A layer narrower than the new rank (lin2: 2 outputs, r=4): PEFT's SVD factors come out
    (2, 2) and (4, in) and its forward fails; peftkit keeps the whole update (rank <= 2)."""

    class Narrow(MLP):
        def __init__(self) -> None:
            super().__init__()
            self.lin2 = nn.Linear(6, 2)

        def forward(self, x):
            return self.lin2(super().forward(x))

    MODELS["Narrow"] = (Narrow, lambda: torch.randn(4, 10), ["lin1", "lin2"])
    try:
        config = dict(target_modules=["lin1", "lin2"], r=4, init_lora_weights=False)
        theirs, ours, _, x = _pair(tmp_path, "Narrow", [config, config])
    finally:
        del MODELS["Narrow"]
    theirs.add_weighted_adapter(["a", "b"], [0.7, 0.4], "mix", combination_type="svd")
    with pytest.raises(RuntimeError):
        _combined_output(theirs, x, "mix")
    ours.add_weighted_adapter(["a", "b"], [0.7, 0.4], "mix", combination_type="svd")
    layer = ours.base_model.model.lin2
    expected = 0.7 * layer.delta_weight("a") + 0.4 * layer.delta_weight("b")
    torch.testing.assert_close(layer.delta_weight("mix"), expected, **TOL)


@pytest.mark.filterwarnings("ignore")
def test_cat_is_exactly_the_weighted_sum_of_updates(tmp_path):
    config = dict(target_modules=["lin0", "lin1"], init_lora_weights=False)
    _, ours, _, x = _pair(tmp_path, "MLP", [{**config, "r": 4}, {**config, "r": 2}])
    ours.add_weighted_adapter(["a", "b"], [0.3, -1.5], "mix", combination_type="cat")
    layer = ours.base_model.model.lin0
    expected = 0.3 * layer.delta_weight("a") - 1.5 * layer.delta_weight("b")
    torch.testing.assert_close(layer.delta_weight("mix"), expected, **TOL)
    assert layer.r["mix"] == 6 and ours.peft_config["mix"].lora_alpha == 6


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(
    "first, second",
    [
        ({"target_modules": ["lin0"], "feedforward_modules": ["lin0"]},) * 2,
        (
            {"target_modules": ["lin0"], "feedforward_modules": ["lin0"]},
            {"target_modules": ["lin1"], "feedforward_modules": ["lin1"]},
        ),
        (
            {"target_modules": ["lin0", "lin1"], "feedforward_modules": []},
            {"target_modules": ["lin1"], "feedforward_modules": []},
        ),
    ],
    ids=["IA3 Same", "IA3 Different", "IA3 overlapping"],
)
def test_ia3_weighted_sum_matches_peft(tmp_path, first, second):
    configs = [{**c, "init_ia3_weights": False} for c in (first, second)]
    theirs, ours, base, x = _pair(tmp_path, "MLP", configs, lib_config=peft.IA3Config)
    for model in (theirs, ours):
        torch.manual_seed(7)
        model.add_weighted_adapter(["a", "b"], [0.6, 0.8], "mix")
    expected = _combined_output(theirs, x, "mix")
    torch.testing.assert_close(_combined_output(ours, x, "mix"), expected, **TOL)
    ours.save_pretrained(tmp_path / "ours", selected_adapters=["mix"])
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours" / "mix").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x), expected, **TOL)


# --- inputs that do not combine -----------------------------------------------------------------
def _refusals_match(theirs, ours, *args, match: str, **kwargs) -> None:
    with pytest.raises((ValueError, TypeError)):
        theirs.add_weighted_adapter(*args, **kwargs)
    with pytest.raises(ValueError, match=match):
        ours.add_weighted_adapter(*args, **kwargs)
    assert "mix" not in ours.peft_config  # nothing half-made is left behind


@pytest.mark.filterwarnings("ignore")
def test_refusals_match_peft(tmp_path):
    config = dict(target_modules=["lin0", "lin1"], init_lora_weights=False)
    configs = [{**config, "r": 4}, {**config, "r": 2}]
    theirs, ours, _, _ = _pair(tmp_path, "MLP", configs)
    _refusals_match(theirs, ours, ["a", "b"], [1, 1], "mix", combination_type="linear",
                    match="same r")  # fmt: skip
    _refusals_match(theirs, ours, ["a", "zz"], [1, 1], "mix", match="no adapter named 'zz'")
    _refusals_match(theirs, ours, ["a", "b"], [1, 1], "mix", combination_type="blend",
                    match="invalid combination_type")  # fmt: skip

    regex = dict(target_modules="lin0", init_lora_weights=False)
    theirs, ours, _, _ = _pair(tmp_path / "regex", "MLP", [config, regex])
    _refusals_match(theirs, ours, ["a", "b"], [1, 1], "mix", match="regex string and a list")

    saved = dict(config, modules_to_save=["lin1"], target_modules=["lin0"])
    theirs, ours, _, _ = _pair(tmp_path / "saved", "MLP", [saved, saved])
    _refusals_match(theirs, ours, ["a", "b"], [1, 1], "mix", match="modules_to_save")


@pytest.mark.filterwarnings("ignore")
def test_refusals_where_peft_goes_on_silently(tmp_path):
    config = dict(target_modules=["lin0", "lin1"], init_lora_weights=False)
    theirs, ours, _, x = _pair(tmp_path, "MLP", [config, config])
    with pytest.raises(ValueError, match="already exists"):  # PEFT returns, doing nothing
        ours.add_weighted_adapter(["a", "b"], [1, 1], "b")
    with pytest.raises(ValueError, match="one weight per adapter"):  # PEFT: zip() drops "b"
        ours.add_weighted_adapter(["a", "b"], [1.0], "mix")
    with pytest.raises(ValueError, match="density"):  # PEFT: a TypeError deep inside
        ours.add_weighted_adapter(["a", "b"], [1, 1], "mix", combination_type="ties")
    assert list(ours.peft_config) == ["a", "b"]

    dora = dict(config, use_dora=True)
    _, ours, _, _ = _pair(tmp_path / "dora", "MLP", [dora, dora])
    with pytest.raises(ValueError, match="use_dora"):
        ours.add_weighted_adapter(["a", "b"], [1, 1], "mix", combination_type="cat")


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("cls", ["LoHaConfig", "LoKrConfig"])
def test_loha_lokr_have_no_weighted_combination(tmp_path, cls):
    config = dict(target_modules=["lin0"], init_weights=False)
    theirs, ours, _, _ = _pair(tmp_path, "MLP", [config, config], getattr(peft, cls))
    with pytest.raises(AttributeError):
        theirs.add_weighted_adapter(["a", "b"], [1, 1], "mix")
    with pytest.raises(ValueError, match="not available for Lo"):
        ours.add_weighted_adapter(["a", "b"], [1, 1], "mix")


def test_prompt_tuning_has_no_weighted_combination():
    from tiny_models import tiny_model

    model = peftkit.get_peft_model(
        tiny_model("llama", "CAUSAL_LM"),
        peftkit.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2),
    )
    with pytest.raises(ValueError, match="PROMPT_TUNING adapters have no weight arithmetic"):
        model.add_weighted_adapter(["default"], [1.0], "mix")


# --- the tensor combiners on hand-worked values ---------------------------------------------
def test_combiners_on_hand_worked_values():
    a, b = torch.tensor([3.0, -1.0, 0.5, -2.0]), torch.tensor([-1.0, 2.0, 0.25, -4.0])
    w = torch.tensor([1.0, 0.5])
    combine = task_arithmetic.combine
    torch.testing.assert_close(combine([a, b], w, "linear"), torch.tensor([2.5, 0.0, 0.625, -4.0]))
    # top half by magnitude: a keeps 3, -2; b keeps 2, -4
    torch.testing.assert_close(
        combine([a, b], w, "magnitude_prune", density=0.5), torch.tensor([3.0, 1.0, 0.0, -4.0])
    )
    # ties: pruned a = [3, 0, 0, -2], b = [0, 2, 0, -4]; elected signs of the sums: +, +, +, -
    # weighted agreeing values averaged: [3/1, 1/1, 0/1, (-2 - 2)/2]
    torch.testing.assert_close(
        combine([a, b], w, "ties", density=0.5), torch.tensor([3.0, 1.0, 0.0, -2.0])
    )
    with pytest.raises(ValueError, match="density"):
        combine([a, b], w, "dare_linear")


@pytest.mark.filterwarnings("ignore")
def test_ia3_refuses_vectors_of_different_sides_and_loras_options(tmp_path):
    first = {"target_modules": ["lin0"], "feedforward_modules": ["lin0"], "init_ia3_weights": False}
    second = {"target_modules": ["lin0"], "feedforward_modules": [], "init_ia3_weights": False}
    # (PEFT cannot even hold these two: a layer's side is fixed by its first adapter there)
    ours = peftkit.get_peft_model(MLP(), peftkit.IA3Config(**first), adapter_name="a")
    ours.add_adapter("b", peftkit.IA3Config(**second))
    with pytest.raises(ValueError, match="scale different sides of this layer"):
        ours.add_weighted_adapter(["a", "b"], [1.0, 1.0], "mix")
    with pytest.raises(ValueError, match="combination_type, density .* do not apply"):
        ours.add_weighted_adapter(["a"], [1.0], "mix", combination_type="ties", density=0.5)
    assert list(ours.peft_config) == ["a", "b"]
