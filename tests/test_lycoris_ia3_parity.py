"""LoHa / LoKr / IA3 on tiny real architectures against HF PEFT: both ways, merged, counted.

Per architecture and method: an adapter saved by ``peft`` (non-identity, head trained where the
task has one) loads in peftkit with the same logits, peftkit's file loads back in ``peft`` with
the same logits unmerged and merged, one seed gives both libraries the same fresh adapter, and the
trainable / total parameter counts agree. fp32, relative error <= 1e-5.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch

import peftkit
from conftest import assert_rel_close, logits_of

# arch -> (task type, LoHa/LoKr targets, IA3 targets, IA3 feed-forward modules, modules_to_save)
TARGETS = {
    "llama": ("CAUSAL_LM", ["q_proj", "v_proj", "down_proj"], ["k_proj", "v_proj", "down_proj"], ["down_proj"], None),
    "t5": ("SEQ_2_SEQ_LM", ["q", "v", "wo"], ["k", "v", "wo"], ["wo"], None),
    "bert": ("SEQ_CLS", ["query", "value"], ["key", "value", "output.dense"], ["output.dense"], None),
    "gpt2": ("CAUSAL_LM", None, ["c_attn", "mlp.c_proj"], ["mlp.c_proj"], None),
    "vit": (None, ["q_proj", "v_proj", "projection"], ["k_proj", "projection", "fc2"], ["fc2"], ["classifier"]),
}  # fmt: skip
# gpt2 keeps its projections in transformers' Conv1D, which PEFT's LoHa/LoKr do not adapt;
# vit's "projection" is the patch embedding's Conv2d
CASES = [
    (arch, method)
    for arch in TARGETS
    for method in ("LoHaConfig", "LoKrConfig", "IA3Config")
    if method == "IA3Config" or TARGETS[arch][1] is not None
]


def _kwargs(arch: str, method: str, random: bool) -> dict:
    task, lyco, ia3, ff, saved = TARGETS[arch]
    kwargs = {"task_type": task, "modules_to_save": saved}
    if method == "IA3Config":
        kwargs |= {"target_modules": ia3, "feedforward_modules": ff}
        return kwargs | ({"init_ia3_weights": False} if random else {})
    kwargs |= {"target_modules": lyco, "r": 4, "alpha": 8}
    if method == "LoKrConfig":
        kwargs["decompose_both"] = True
    return kwargs | ({"init_weights": False} if random else {})


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("arch, method", CASES, ids=[f"{a}-{m[:-6]}" for a, m in CASES])
def test_both_ways_and_merged(arch, method, tiny_model, tmp_path):
    base, inputs = tiny_model(arch)
    with torch.no_grad():
        plain = logits_of(copy.deepcopy(base)(**inputs))
    torch.manual_seed(4)
    theirs = peft.get_peft_model(
        copy.deepcopy(base), getattr(peft, method)(**_kwargs(arch, method, True))
    )
    with torch.no_grad():  # a trained head: a lost modules_to_save copy would show
        for name, param in theirs.named_parameters():
            if ".modules_to_save." in name:
                param.add_(torch.randn_like(param) * 0.1)
    theirs.eval().save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        expected = logits_of(theirs(**inputs))
    change = (expected - plain).abs().max().item() / plain.abs().max().item()
    assert change > 1e-3, f"the adapter barely changes the output ({change:.2g})"

    ours = peftkit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    with torch.no_grad():
        assert_rel_close(logits_of(ours(**inputs)), expected)
    ours.save_pretrained(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    with torch.no_grad():
        assert_rel_close(logits_of(back(**inputs)), expected)
        merged = logits_of(ours.merge_and_unload()(**inputs))
        assert_rel_close(merged, logits_of(back.merge_and_unload()(**inputs)))
    assert_rel_close(merged, expected)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("arch, method", CASES, ids=[f"{a}-{m[:-6]}" for a, m in CASES])
def test_same_seed_same_fresh_adapter_and_counts(arch, method, tiny_model):
    base, inputs = tiny_model(arch)
    kwargs = _kwargs(arch, method, random=False)
    torch.manual_seed(9)
    theirs = peft.get_peft_model(copy.deepcopy(base), getattr(peft, method)(**kwargs))
    torch.manual_seed(9)
    ours = peftkit.get_peft_model(copy.deepcopy(base), getattr(peftkit, method)(**kwargs))
    mine, peft_state = ours.state_dict(), theirs.state_dict()
    assert mine.keys() == peft_state.keys()
    for key, value in peft_state.items():
        torch.testing.assert_close(mine[key], value, rtol=0, atol=0, msg=key)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    with torch.no_grad():  # a fresh adapter is the identity
        assert_rel_close(logits_of(ours.eval()(**inputs)), logits_of(base(**inputs)))
