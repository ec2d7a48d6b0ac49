"""The AdaLoRA rows of PEFT's LoRA/AdaLoRA matrix (``tests/test_custom_models.py``), against ``peft``.

Rows: "Vanilla MLP 1/2 AdaLoRA" (nn.Linear) and "Conv2d 1/2 AdaLoRA" (nn.Conv2d, whose kernel
AdaLoRA reads as an (out, in·kh·kw) matrix), on the small models of ``test_peft_matrix.py``.
Each row checks, against ``peft`` with the same tensors (fp32, rel. err <= 1e-5):

    same seed -> same adapter · forward · gradients of one backward · disable_adapter
    PEFT's file -> peftkit · peftkit's file == PEFT's file · ours -> PEFT
    merge_and_unload · merge + unmerge · unload
    a few training steps with update_and_allocate: same rank_pattern and outputs each step,
    then the pruned adapter round-trips both ways
    a mixed-adapter batch (PEFT's SVD layers take no adapter_names: rows vs each adapter alone)
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftkit
from test_peft_matrix import MODELS

TOL = dict(rtol=1e-5, atol=1e-6)

ROWS = [
    ("Vanilla MLP 1 AdaLoRA", "MLP", {"target_modules": ["lin0"], "total_step": 1, "orth_reg_weight": 0}),
    ("Vanilla MLP 2 AdaLoRA", "MLP", {"target_modules": ["lin0", "lin1"], "total_step": 1}),
    ("Conv2d 1 AdaLoRA", "Conv2d", {"target_modules": ["conv"], "total_step": 1}),
    ("Conv2d 2 AdaLoRA", "Conv2d", {"target_modules": ["conv", "lin0"], "total_step": 1}),
]  # fmt: skip
# the training check: the rows' targets under a schedule that masks (init 6 -> target 2)
SCHEDULE = dict(init_r=6, target_r=2, total_step=6, tinit=1, tfinal=2, deltaT=1, lora_alpha=8)


def _pair(base: nn.Module, kwargs: dict, seed: int, init: bool = False):
    """(ours, theirs) from one base and one seed; ``init=False``: factors drawn at random (E is
    not zero, so the adapter changes the output), as PEFT's rows do."""
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.AdaLoraConfig(init_lora_weights=init, **kwargs)
    )
    torch.manual_seed(seed)
    ours = peftkit.get_peft_model(
        copy.deepcopy(base), peftkit.AdaLoraConfig(init_lora_weights=init, **kwargs)
    )
    return ours.eval(), theirs.eval()


def _run(model: nn.Module, x: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(x, **kwargs)


def _adapter(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        k.replace(".default", ""): v.detach() for k, v in model.named_parameters() if ".lora_" in k
    }


def _grads(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(x).square().sum().backward()
    return {
        k.replace(".default", ""): p.grad.clone()
        for k, p in model.named_parameters()
        if p.grad is not None
    }


def _file(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("row, model_name, kwargs", ROWS, ids=[r[0] for r in ROWS])
def test_row_matches_peft(tmp_path, row, model_name, kwargs):
    builder, make_input = MODELS[model_name]
    torch.manual_seed(0)
    base = builder().eval()
    x = make_input(4)
    plain = _run(base, x)
    ours, theirs = _pair(base, kwargs, seed=1)

    # same seed -> same adapter (the draws follow PEFT's order), same forward and gradients
    mine, peft_state = _adapter(ours), _adapter(theirs)
    assert sorted(mine) == sorted(peft_state)
    for name, value in peft_state.items():
        torch.testing.assert_close(mine[name], value, rtol=0, atol=0, msg=name)
    expected = _run(theirs, x)
    assert not torch.allclose(expected, plain), "the adapter must change the output"
    torch.testing.assert_close(_run(ours, x), expected, **TOL)
    their_grads, our_grads = _grads(theirs, x), _grads(ours, x)
    assert sorted(our_grads) == sorted(their_grads)
    for name, grad in their_grads.items():
        torch.testing.assert_close(our_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    with ours.disable_adapter():
        torch.testing.assert_close(_run(ours, x), plain, **TOL)

    # PEFT's file -> peftkit; peftkit's file == PEFT's file; PEFT loads ours
    theirs.save_pretrained(tmp_path / "peft")
    loaded = peftkit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    torch.testing.assert_close(_run(loaded, x), expected, **TOL)
    ours.save_pretrained(tmp_path / "ours")
    ours_file, peft_file = _file(tmp_path / "ours"), _file(tmp_path / "peft")
    assert sorted(ours_file) == sorted(peft_file)
    for key, value in peft_file.items():
        torch.testing.assert_close(ours_file[key], value, rtol=0, atol=0, msg=key)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(_run(back, x), expected, **TOL)

    # merge_and_unload; merge then unmerge restores the base; unload
    merged = _run(copy.deepcopy(theirs).merge_and_unload(), x)
    torch.testing.assert_close(_run(copy.deepcopy(ours).merge_and_unload(), x), merged, **TOL)
    again = copy.deepcopy(ours)
    again.merge_adapter()
    torch.testing.assert_close(_run(again, x), expected, **TOL)
    again.unmerge_adapter()
    with again.disable_adapter():
        torch.testing.assert_close(_run(again, x), plain, **TOL)
    torch.testing.assert_close(_run(copy.deepcopy(ours).unload(), x), plain, **TOL)

    # a mixed-adapter batch: each row equals its adapter alone (PEFT has no adapter_names here)
    second = {**kwargs, "lora_alpha": 3, "inference_mode": True}
    torch.manual_seed(2)
    ours.add_adapter("other", peftkit.AdaLoraConfig(init_lora_weights=False, **second))
    names = ["default", "other", "__base__", "other"]
    rows = _run(ours, x, adapter_names=names)
    ours.set_adapter("other")
    other = _run(ours, x)
    assert not torch.allclose(other, expected)
    torch.testing.assert_close(
        rows, torch.stack([expected[0], other[1], plain[2], other[3]]), **TOL
    )


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("row, model_name, kwargs", ROWS, ids=[r[0] for r in ROWS])
def test_row_trains_like_peft(tmp_path, row, model_name, kwargs):
    """From the usual init (E = 0): same batches, same SGD, update_and_allocate every step give
    the same masks and outputs; the pruned adapter (saved at the reduced ranks) round-trips."""
    builder, make_input = MODELS[model_name]
    torch.manual_seed(0)
    base = builder().eval()
    config = {**kwargs, **SCHEDULE}
    ours, theirs = _pair(base, config, seed=3, init=True)
    batches = [make_input(4) for _ in range(SCHEDULE["total_step"])]
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.05)
            for m in (ours, theirs)]  # fmt: skip
    for step, x in enumerate(batches, start=1):
        for model, opt in zip((ours, theirs), opts):
            model.train()
            model(x).square().mean().backward()
            opt.step()
            model.base_model.update_and_allocate(step)
            opt.zero_grad()
        ours.eval(), theirs.eval()
        ours_pattern = ours.peft_config["default"].rank_pattern
        theirs_pattern = theirs.peft_config["default"].rank_pattern
        assert ours_pattern == theirs_pattern, f"step {step}"
        torch.testing.assert_close(_run(ours, x), _run(theirs, x), **TOL)
    kept = sum(sum(keep) for keep in ours_pattern.values())
    assert kept < SCHEDULE["init_r"] * len(ours_pattern), "the schedule must have masked triplets"

    x = make_input(4)
    expected = _run(theirs, x)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft")
    ours_file, peft_file = _file(tmp_path / "ours"), _file(tmp_path / "peft")
    assert {k: v.shape for k, v in ours_file.items()} == {k: v.shape for k, v in peft_file.items()}
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(_run(back, x), expected, **TOL)
    loaded = peftkit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    torch.testing.assert_close(_run(loaded, x), expected, **TOL)


def test_conv_kinds_adalora_cannot_hold_are_refused_by_name():
    grouped = MODELS["Conv2dGroups"][0]()
    with pytest.raises(ValueError, match="grouped nn.Conv2d.*groups=2"):
        peftkit.get_peft_model(
            grouped, peftkit.AdaLoraConfig(target_modules=["conv"], total_step=4)
        )
    conv3d = MODELS["Conv3d"][0]()
    with pytest.raises(TypeError, match="cannot adapt a Conv3d.*nn.Conv2d"):
        peftkit.get_peft_model(conv3d, peftkit.AdaLoraConfig(target_modules=["conv"], total_step=4))
