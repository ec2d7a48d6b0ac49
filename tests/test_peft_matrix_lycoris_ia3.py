"""PEFT's LoHa / LoKr / IA3 matrix on small models: every row equal to PEFT, both ways.

The rows are the ``LoHaConfig`` / ``LoKrConfig`` / ``IA3Config`` rows of PEFT's main-branch
``tests/test_custom_models.py`` (65: 22 IA3, 20 LoHa, 23 LoKr), each config as written there, on
our own builders of the models they name (same layer names, kinds, sizes, groups and kernels;
our inputs). HF PEFT 0.21.2 runs all 65, so none is left out. The file's six
``MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES`` rows of these methods (IA3 / LoHa / LoKr "Same" and
"Different") run too: ``test_multiple_active_row_matches_peft``. Every row checks, against ``peft``
with the same tensors (fp32, rel. err <= 1e-5):

    same seed -> same initial adapter (the row as written, and with random init)
    PEFT's file (non-identity adapter) -> peftkit: forward · gradients · disable_adapter
        (LoHa's CP form: against autograd through PEFT's forward; PEFT 0.21.2's own backward
        there is wrong for hada_w1_a / hada_w2_a, see _autograd_through_peft_cp)
    a seeded training-mode forward (module / rank dropout drawn as PEFT draws them)
    peftkit's file == PEFT's file (keys, tensors) · PEFT loads ours
    both adapters active (set_adapter([...])) · mixed-adapter batch refused (PEFT ignores it)
    merge_and_unload (merge, unmerge back to the base) · unload
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftkit

TOL = dict(rtol=1e-5, atol=1e-6)


# --- models: PEFT's layer names and shapes; inputs (B, ...) are part of each recipe -----------
def _head(features: int) -> nn.Module:
    return nn.Sequential(nn.ReLU(), nn.Flatten(), nn.Linear(features, 2))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.relu, self.lin1 = nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 2)

    def forward(self, x):
        return self.lin1(self.relu(self.lin0(x)))  # (B, 2)


class EmbConv1D(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.conv1d, self.lin0 = nn.Embedding(100, 5), Conv1D(1, 5), nn.Linear(10, 2)

    def forward(self, x):
        return self.lin0(torch.relu(self.conv1d(self.emb(x))).flatten(1))  # (B, 10, 1) -> (B, 2)


def _conv(make: Callable[[], nn.Module], features: int) -> type[nn.Module]:
    """``make()``'s convolution (named ``conv1d`` / ``conv2d`` / ``conv3d`` as in PEFT) then a
    ``lin0`` head. Built inside the model, under the test's seed: a convolution built once at
    import would take whatever the RNG held then (a dead 1-channel kernel in some orders)."""
    attr = {1: "conv1d", 2: "conv2d", 3: "conv3d"}[make().weight.dim() - 2]

    class ConvModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            setattr(self, attr, make())
            self.lin0 = nn.Linear(features, 2)

        def forward(self, x):
            return self.lin0(torch.relu(getattr(self, attr)(x)).flatten(1))

    return ConvModel


class Conv2dGroups(nn.Module):
    """PEFT's ModelConv2DGroups: lin0 -> (16, 3, 3) -> grouped conv2d (groups 8) -> lin1."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.conv2d = nn.Linear(10, 144), nn.Conv2d(16, 16, 3, groups=8)
        self.lin1 = nn.Linear(16, 2)

    def forward(self, x):
        h = self.lin0(x).view(-1, 16, 3, 3)  # (B, 16, 3, 3)
        return self.lin1(torch.relu(self.conv2d(h)).flatten(1))  # (B, 2)


MODELS = {  # name -> (builder, input maker(batch))
    "MLP": (MLP, lambda b: torch.randn(b, 10)),
    "EmbConv1D": (EmbConv1D, lambda b: torch.randint(0, 100, (b, 10))),
    "Conv1d": (_conv(lambda: nn.Conv1d(1, 1, 2), 9), lambda b: torch.randn(b, 1, 10)),
    "Conv1dBigger": (_conv(lambda: nn.Conv1d(64, 16, 2), 144), lambda b: torch.randn(b, 64, 10)),
    "Conv1dGroups": (
        _conv(lambda: nn.Conv1d(8, 8, 3, groups=2), 64),
        lambda b: torch.randn(b, 8, 10),
    ),
    "Conv2d": (_conv(lambda: nn.Conv2d(5, 10, 3), 10), lambda b: torch.randn(b, 5, 3, 3)),
    "Conv2d1x1": (_conv(lambda: nn.Conv2d(1, 10, 1), 90), lambda b: torch.randn(b, 1, 3, 3)),
    "Conv2dGroups": (Conv2dGroups, lambda b: torch.randn(b, 10)),
    "Conv2dGroups2": (
        _conv(lambda: nn.Conv2d(16, 32, 3, padding=1, groups=2), 32 * 9),
        lambda b: torch.randn(b, 16, 3, 3),
    ),
    "Conv3d": (_conv(lambda: nn.Conv3d(5, 10, 3), 10), lambda b: torch.randn(b, 5, 3, 3, 3)),
}


# --- the rows, as written in PEFT's TEST_CASES --------------------------------------------
IA3 = [
    ("Vanilla MLP 1 IA3", "MLP", {"target_modules": "lin0", "feedforward_modules": []}),
    ("Vanilla MLP 2 IA3", "MLP", {"target_modules": "lin0", "feedforward_modules": "lin0"}),
    ("Vanilla MLP 3 IA3", "MLP", {"target_modules": ["lin0"], "feedforward_modules": []}),
    ("Vanilla MLP 4 IA3", "MLP", {"target_modules": ["lin0"], "feedforward_modules": ["lin0"]}),
    ("Vanilla MLP 5 IA3", "MLP", {"target_modules": ["lin1"], "feedforward_modules": []}),
    ("Vanilla MLP 6 IA3", "MLP", {"target_modules": ["lin1"], "feedforward_modules": ["lin1"]}),
    ("Vanilla MLP 7 IA3", "MLP", {"target_modules": ["lin0", "lin1"], "feedforward_modules": []}),
    ("Vanilla MLP 8 IA3", "MLP",
     {"target_modules": ["lin0", "lin1"], "feedforward_modules": ["lin0", "lin1"]}),
    ("Vanilla MLP 9 IA3", "MLP",
     {"target_modules": ["lin0"], "modules_to_save": ["lin1"], "feedforward_modules": ["lin0"]}),
    ("transformers Conv1D 1 IA3", "EmbConv1D", {"target_modules": ["conv1d"], "feedforward_modules": ["conv1d"]}),
    ("transformers Conv1D 2 IA3", "EmbConv1D",
     {"target_modules": ["conv1d", "lin0"], "feedforward_modules": ["conv1d", "lin0"]}),
    ("transformers Conv1D 1 IA3 (modules_to_save)", "EmbConv1D",  # PEFT repeats the name
     {"target_modules": ["conv1d"], "feedforward_modules": ["conv1d"], "modules_to_save": ["lin0"]}),
    ("Conv2d 1 IA3", "Conv2d", {"target_modules": ["conv2d"], "feedforward_modules": []}),
    ("Conv2d 2 IA3", "Conv2d", {"target_modules": ["conv2d"], "feedforward_modules": ["conv2d"]}),
    ("Conv2d 3 IA3", "Conv2d", {"target_modules": ["conv2d", "lin0"], "feedforward_modules": []}),
    ("Conv2d 4 IA3", "Conv2d", {"target_modules": ["conv2d", "lin0"], "feedforward_modules": ["conv2d"]}),
    ("Conv2d 5 IA3", "Conv2d",
     {"target_modules": ["conv2d", "lin0"], "feedforward_modules": ["conv2d", "lin0"]}),
    ("Conv3d 1 IA3", "Conv3d", {"target_modules": ["conv3d"], "feedforward_modules": []}),
    ("Conv3d 2 IA3", "Conv3d", {"target_modules": ["conv3d"], "feedforward_modules": ["conv3d"]}),
    ("Conv3d 3 IA3", "Conv3d", {"target_modules": ["conv3d", "lin0"], "feedforward_modules": []}),
    ("Conv3d 4 IA3", "Conv3d", {"target_modules": ["conv3d", "lin0"], "feedforward_modules": ["conv3d"]}),
    ("Conv3d 5 IA3", "Conv3d",
     {"target_modules": ["conv3d", "lin0"], "feedforward_modules": ["conv3d", "lin0"]}),
]  # fmt: skip

LOHA = [
    ("Vanilla MLP 1 LOHA", "MLP", {"target_modules": "lin0"}),
    ("Vanilla MLP 2 LOHA", "MLP", {"target_modules": ["lin0"]}),
    ("Vanilla MLP 3 LOHA", "MLP", {"target_modules": ["lin1"]}),
    ("Vanilla MLP 4 LOHA", "MLP", {"target_modules": ["lin0", "lin1"]}),
    ("Vanilla MLP 5 LOHA", "MLP", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("Vanilla MLP 6 LOHA", "MLP", {"target_modules": ["lin0"], "alpha": 4, "module_dropout": 0.1}),
    ("Vanilla MLP 7 LOHA", "MLP", {"target_modules": "lin0", "rank_dropout": 0.5}),
    ("Conv2d 1 LOHA", "Conv2d", {"target_modules": ["conv2d"]}),
    ("Conv2d 2 LOHA", "Conv2d", {"target_modules": ["conv2d", "lin0"]}),
    ("Conv2d 3 LOHA", "Conv2d", {"target_modules": ["conv2d"], "use_effective_conv2d": True}),
    ("Conv2d 4 LOHA", "Conv2d", {"target_modules": ["conv2d", "lin0"], "use_effective_conv2d": True}),
    ("Conv1d LOHA", "Conv1d", {"target_modules": ["conv1d"]}),
    ("Conv1d LOHA 1", "Conv1d", {"target_modules": ["conv1d"]}),
    ("Conv1d LOHA 2", "Conv1d", {"target_modules": ["conv1d"], "r": 2}),
    ("Conv1d Groups LOHA", "Conv1dGroups", {"target_modules": ["conv1d"], "r": 4}),
    ("Conv1d LOHA 3", "Conv1dBigger", {"target_modules": ["conv1d"], "r": 2, "use_effective_conv2d": True}),
    ("Conv1d LOHA 4", "Conv1dBigger", {"target_modules": ["conv1d"], "r": 2, "use_effective_conv2d": False}),
    ("Conv2d 1x1 LOHA", "Conv2d1x1", {"target_modules": ["conv2d"]}),
    ("Conv2d Groups LOHA", "Conv2dGroups", {"target_modules": ["conv2d"]}),
    ("Conv2d Groups2 LOHA", "Conv2dGroups2", {"target_modules": ["conv2d"]}),
]  # fmt: skip

LOKR = [
    ("Vanilla MLP 1 LOKR", "MLP", {"target_modules": "lin0"}),
    ("Vanilla MLP 2 LOKR", "MLP", {"target_modules": ["lin0"]}),
    ("Vanilla MLP 3 LOKR", "MLP", {"target_modules": ["lin1"]}),
    ("Vanilla MLP 4 LOKR", "MLP", {"target_modules": ["lin0", "lin1"]}),
    ("Vanilla MLP 5 LOKR", "MLP", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("Vanilla MLP 6 LOKR", "MLP", {"target_modules": ["lin0"], "alpha": 4, "module_dropout": 0.1}),
    ("Vanilla MLP 7 LOKR", "MLP", {"target_modules": "lin0", "rank_dropout": 0.5}),
    ("Vanilla MLP 8 LOKR", "MLP", {"target_modules": "lin0", "decompose_both": True, "r": 1, "alpha": 1}),
    ("Conv1d LOKR 1", "Conv1d", {"target_modules": ["conv1d"]}),
    ("Conv1d LOKR 2", "Conv1d", {"target_modules": ["conv1d"], "r": 2}),
    ("Conv1d Groups LOKR", "Conv1dGroups", {"target_modules": ["conv1d"], "r": 4}),
    ("Conv1d LOKR 3", "Conv1dBigger", {"target_modules": ["conv1d"], "r": 2, "use_effective_conv2d": True}),
    ("Conv1d LOKR 4", "Conv1dBigger", {"target_modules": ["conv1d"], "r": 2, "use_effective_conv2d": False}),
    ("Conv2d 1 LOKR", "Conv2d", {"target_modules": ["conv2d"]}),
    ("Conv2d 2 LOKR", "Conv2d", {"target_modules": ["conv2d", "lin0"]}),
    ("Conv2d 3 LOKR", "Conv2d", {"target_modules": ["conv2d"], "use_effective_conv2d": True}),
    ("Conv2d 4 LOKR", "Conv2d", {"target_modules": ["conv2d", "lin0"], "use_effective_conv2d": True}),
    ("Conv2d 1x1 LOKR", "Conv2d1x1", {"target_modules": ["conv2d"]}),
    ("Conv2d 5 LOKR", "Conv2d",
     {"target_modules": ["conv2d", "lin0"], "use_effective_conv2d": True, "decompose_both": True}),
    ("Conv2d 6 LOKR", "Conv2d",
     {"target_modules": ["conv2d", "lin0"], "use_effective_conv2d": True, "decompose_factor": 4}),
    ("Conv2d 7 LOKR", "Conv2d",
     {"target_modules": ["conv2d", "lin0"], "use_effective_conv2d": True, "decompose_both": True,
      "decompose_factor": 4}),
    ("Conv2d Groups LOKR", "Conv2dGroups", {"target_modules": ["conv2d"]}),
    ("Conv2d Groups2 LOKR", "Conv2dGroups2", {"target_modules": ["conv2d"]}),
]  # fmt: skip

ROWS = (
    [(name, model, "IA3Config", kw) for name, model, kw in IA3]
    + [(name, model, "LoHaConfig", kw) for name, model, kw in LOHA]
    + [(name, model, "LoKrConfig", kw) for name, model, kw in LOKR]
)
RANDOM_INIT = {"IA3Config": {"init_ia3_weights": False}}  # others: init_weights=False


def test_the_matrix_holds_all_of_peft_rows():
    assert (len(IA3), len(LOHA), len(LOKR), len(ROWS)) == (22, 20, 23, 65)


# --- helpers ----------------------------------------------------------------------------------
def _config(lib, cls: str, kwargs: dict, random_init: bool = True):
    extra = RANDOM_INIT.get(cls, {"init_weights": False}) if random_init else {}
    return getattr(lib, cls)(**copy.deepcopy(kwargs), **extra)


def _run(model: nn.Module, x: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(x, **kwargs)


def _grads(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(x).float().square().sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _files(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def _adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    prefixes = ("hada_", "lokr_", "ia3_")
    return {k: v for k, v in model.state_dict().items() if any(p in k for p in prefixes)}


def _autograd_through_peft_cp(theirs, x, their_grads, monkeypatch) -> dict[str, torch.Tensor]:
    """PEFT 0.21.2's LoHa CP form (``HadaWeightCP``) has a hand-written backward that returns
    wrong gradients for ``hada_w1_a`` / ``hada_w2_a`` (it reuses the other pair's partial
    product); its forward is right. The reference gradient is autograd through that same
    forward, ``W_i[p, q] = Σ t_i[a, b] w_ia[a, p] w_ib[b, q]``, ``ΔW = W_1 ⊙ W_2 · s``."""
    from peft.tuners.loha import layer as loha_layer

    def cp_by_autograd(t1, w1a, w1b, t2, w2a, w2b, scale):
        w1 = torch.einsum("abkl,ap,bq->pqkl", t1, w1a, w1b)
        w2 = torch.einsum("abkl,ap,bq->pqkl", t2, w2a, w2b)
        return w1 * w2 * scale

    with monkeypatch.context() as patch:
        patch.setattr(loha_layer, "make_weight_cp", cp_by_autograd)
        reference = _grads(theirs, x)
    wrong = [n for n in reference if not torch.allclose(reference[n], their_grads[n], rtol=1e-4)]
    assert wrong and all(".hada_w1_a." in n or ".hada_w2_a." in n for n in wrong)  # the bug
    return reference


# --- the rows ---------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("row, model_name, cls, kwargs", ROWS, ids=[r[0] for r in ROWS])
def test_row_matches_peft(tmp_path, monkeypatch, row, model_name, cls, kwargs):
    builder, make_input = MODELS[model_name]
    torch.manual_seed(0)
    base = builder().eval()
    x = make_input(4)
    plain = _run(base, x)

    # same seed -> same initial adapter, as written (identity init) and random
    for random_init in (False, True):
        torch.manual_seed(3)
        theirs = peft.get_peft_model(copy.deepcopy(base), _config(peft, cls, kwargs, random_init))
        torch.manual_seed(3)
        ours = peftkit.get_peft_model(
            copy.deepcopy(base), _config(peftkit, cls, kwargs, random_init)
        )
        a, b = _adapter_tensors(ours), _adapter_tensors(theirs)
        assert a.keys() == b.keys() and a
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
        if not random_init:  # a fresh adapter changes nothing
            torch.testing.assert_close(_run(ours.eval(), x), plain, **TOL)

    # PEFT's file (non-identity) -> peftkit: forward, gradients, disable_adapter
    torch.manual_seed(1)
    theirs = peft.get_peft_model(copy.deepcopy(base), _config(peft, cls, kwargs)).eval()
    theirs.save_pretrained(tmp_path / "peft")
    ours = peftkit.PeftModel.from_pretrained(
        copy.deepcopy(base), tmp_path / "peft", is_trainable=True
    ).eval()
    expected = _run(theirs, x)
    assert not torch.allclose(expected, plain), "the adapter must change the output"
    torch.testing.assert_close(_run(ours, x), expected, **TOL)
    their_grads, our_grads = _grads(theirs, x), _grads(ours, x)
    if any(".hada_t1." in name for name in their_grads):
        their_grads = _autograd_through_peft_cp(theirs, x, their_grads, monkeypatch)
    assert sorted(our_grads) == sorted(their_grads)
    for name, grad in their_grads.items():
        torch.testing.assert_close(our_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    with ours.disable_adapter():
        torch.testing.assert_close(_run(ours, x), plain, **TOL)

    # training mode: module / rank dropout drawn from the same generator in the same order
    theirs.train(), ours.train()
    dropout = kwargs.get("rank_dropout") or kwargs.get("module_dropout")
    for seed in (5, 6, 7) if dropout else (5,):  # several draws where there is dropout
        torch.manual_seed(seed)
        expected_train = _run(theirs, x)
        torch.manual_seed(seed)
        torch.testing.assert_close(_run(ours, x), expected_train, **TOL)
    theirs.eval(), ours.eval()

    # peftkit's file == PEFT's file; PEFT loads ours
    ours.save_pretrained(tmp_path / "ours")
    mine, peft_file = _files(tmp_path / "ours"), _files(tmp_path / "peft")
    assert sorted(mine) == sorted(peft_file)
    for key, value in peft_file.items():
        torch.testing.assert_close(mine[key], value, rtol=0, atol=0)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(_run(back, x), expected, **TOL)

    # a second adapter: both active at once; mixed-adapter batches
    torch.manual_seed(2)
    theirs_b = peft.get_peft_model(copy.deepcopy(base), _config(peft, cls, kwargs))
    theirs_b.save_pretrained(tmp_path / "peft_b")
    theirs.load_adapter(str(tmp_path / "peft_b"), adapter_name="other")
    ours.load_adapter(tmp_path / "peft_b", adapter_name="other")
    theirs.eval(), ours.eval()
    try:
        theirs.base_model.set_adapter(["default", "other"])
    except ValueError:  # PEFT: one modules_to_save copy active at a time; so do we
        with pytest.raises(ValueError, match="modules_to_save"):
            ours.set_adapter(["default", "other"])
    else:
        ours.set_adapter(["default", "other"])
        assert ours.active_adapters == ["default", "other"]
        torch.testing.assert_close(_run(ours, x), _run(theirs, x), **TOL)
    theirs.base_model.set_adapter("default")
    ours.set_adapter("default")
    names = ["default", "other", "__base__", "other"]
    # PEFT has no mixed-batch path for these methods and silently drops adapter_names (every
    # row runs the active adapter); peftkit refuses instead of giving rows the wrong adapter
    torch.testing.assert_close(_run(theirs, x, adapter_names=names), expected, **TOL)
    with pytest.raises(ValueError, match="mixed-adapter batches"):
        _run(ours, x, adapter_names=names)
    theirs.delete_adapter("other")
    ours.delete_adapter("other")
    torch.testing.assert_close(_run(ours, x), expected, **TOL)

    # merge_and_unload; merge then unmerge restores the base; unload
    merged = _run(copy.deepcopy(theirs).merge_and_unload(), x)
    torch.testing.assert_close(_run(copy.deepcopy(ours).merge_and_unload(), x), merged, **TOL)
    again = copy.deepcopy(ours)
    again.merge_adapter()
    torch.testing.assert_close(_run(again, x), expected, **TOL)
    again.unmerge_adapter()
    with again.disable_adapter():
        torch.testing.assert_close(_run(again, x), plain, **TOL)
    torch.testing.assert_close(_run(ours.unload(), x), plain, **TOL)


# --- PEFT's MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES rows for these methods (on the MLP) -------------
_IA3_1 = {"target_modules": ["lin0"], "feedforward_modules": ["lin0"], "init_ia3_weights": False}
_IA3_2 = {"target_modules": ["lin1"], "feedforward_modules": ["lin1"], "init_ia3_weights": False}
_LY_1 = {"target_modules": ["lin0"], "init_weights": False}
_LY_2 = {"target_modules": ["lin1"], "init_weights": False}
MULTI_ACTIVE = [
    ("IA3 Same", "IA3Config", _IA3_1, _IA3_1),
    ("IA3 Different", "IA3Config", _IA3_1, _IA3_2),
    ("LoHa Same", "LoHaConfig", _LY_1, _LY_1),
    ("LoHa Different", "LoHaConfig", _LY_1, _LY_2),
    ("LoKr Same", "LoKrConfig", _LY_1, _LY_1),
    ("LoKr Different", "LoKrConfig", _LY_1, _LY_2),
]


def _two_adapters(lib, cls: str, kwargs_1: dict, kwargs_2: dict, base: nn.Module):
    """``adapter_1`` from get_peft_model, ``adapter_2`` from add_adapter, one seed."""
    torch.manual_seed(11)
    model = lib.get_peft_model(
        copy.deepcopy(base), getattr(lib, cls)(**copy.deepcopy(kwargs_1)), adapter_name="adapter_1"
    )
    model.add_adapter("adapter_2", getattr(lib, cls)(**copy.deepcopy(kwargs_2)))
    return model.eval()


def _activate(model, names) -> None:
    (model.base_model if isinstance(model, peft.PeftModel) else model).set_adapter(names)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(
    "row, cls, kwargs_1, kwargs_2", MULTI_ACTIVE, ids=[r[0] for r in MULTI_ACTIVE]
)
def test_multiple_active_row_matches_peft(row, cls, kwargs_1, kwargs_2):
    """Both adapters active at once (PEFT's multiple-active-adapters rows): the same adapters
    from one seed, the same outputs one by one and combined; merging both (together, one after
    the other, merge_and_unload of a chosen subset) gives the combined / chosen output, and
    unmerging gives the base back."""
    torch.manual_seed(0)
    base = MODELS["MLP"][0]().eval()
    x = MODELS["MLP"][1](4)
    plain = _run(base, x)
    theirs = _two_adapters(peft, cls, kwargs_1, kwargs_2, base)
    ours = _two_adapters(peftkit, cls, kwargs_1, kwargs_2, base)
    a, b = _adapter_tensors(ours), _adapter_tensors(theirs)
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)

    outputs = {}
    for names in (["adapter_1"], ["adapter_2"], ["adapter_1", "adapter_2"]):
        _activate(theirs, names)
        _activate(ours, names)
        expected = _run(theirs, x)
        torch.testing.assert_close(_run(ours, x), expected, **TOL)
        outputs[tuple(names)] = expected
    one, two, both = outputs.values()
    assert not torch.allclose(one, two, atol=1e-5) and not torch.allclose(one, both, atol=1e-5)
    assert not torch.allclose(two, both, atol=1e-5)

    # both active, merged: the combined output; unmerged: the base under disable_adapter
    ours.merge_adapter()
    torch.testing.assert_close(_run(ours, x), both, **TOL)
    ours.unmerge_adapter()
    with ours.disable_adapter():
        torch.testing.assert_close(_run(ours, x), plain, **TOL)
    # merged one after the other == merged together; both unmerged: the base again
    ours.merge_adapter(["adapter_1"])
    ours.merge_adapter(["adapter_2"])
    torch.testing.assert_close(_run(ours, x), both, **TOL)
    ours.unmerge_adapter()
    _activate(ours, ["adapter_1"])
    torch.testing.assert_close(_run(ours, x), one, **TOL)
    # merge_and_unload of a chosen subset, as PEFT
    for names in (["adapter_2"], ["adapter_2", "adapter_1"]):
        mine = copy.deepcopy(ours).merge_and_unload(adapter_names=names)
        peft_merged = copy.deepcopy(theirs).merge_and_unload(adapter_names=names)
        torch.testing.assert_close(_run(mine, x), _run(peft_merged, x), **TOL)
