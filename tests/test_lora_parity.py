"""LoRA parity with HF PEFT (the oracle): same base + same adapter weights => same logits.

For every tiny architecture: an adapter saved by peftkit loads in ``peft`` and gives the same
logits, unmerged and merged; an adapter saved by ``peft`` loads in peftkit and gives the same
logits. fp32, relative error <= 1e-5.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch

from conftest import ARCHS, assert_rel_close, logits_of
from peftkit import LoraConfig, PeftModel, get_peft_model


def _perturb_saved_modules(model: torch.nn.Module) -> None:
    """Make modules_to_save copies differ from the originals so a lost copy would show."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".modules_to_save." in name:
                param.add_(torch.randn_like(param) * 0.1)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_peftkit_adapter_loads_in_peft(arch, tiny_model, tmp_path):
    base, inputs = tiny_model(arch)
    targets, task, extra = ARCHS[arch]
    reference_base = copy.deepcopy(base)
    with torch.no_grad():  # the same base weights, before any adapter is attached
        plain = logits_of(copy.deepcopy(base)(**inputs))
    config = LoraConfig(
        task_type=task,
        r=4,
        lora_alpha=8,
        target_modules=targets,
        init_lora_weights=False,
        modules_to_save=extra,
    )
    ours = get_peft_model(base, config).eval()
    _perturb_saved_modules(ours)
    ours.save_pretrained(tmp_path)

    theirs = peft.PeftModel.from_pretrained(reference_base, tmp_path).eval()
    with torch.no_grad():
        a, b = logits_of(ours(**inputs)), logits_of(theirs(**inputs))
        with theirs.disable_adapter():
            assert_rel_close(logits_of(theirs(**inputs)), plain)  # plain is the same base
    assert_rel_close(a, b)
    change = (a - plain).abs().max().item() / plain.abs().max().item()
    assert change > 1e-3, f"the adapter barely changes the output ({change:.2g})"

    with torch.no_grad():
        merged_ours = logits_of(ours.merge_and_unload()(**inputs))
        merged_theirs = logits_of(theirs.merge_and_unload()(**inputs))
    assert_rel_close(merged_ours, merged_theirs)
    assert_rel_close(merged_ours, a)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_peft_adapter_loads_in_peftkit(arch, tiny_model, tmp_path):
    base, inputs = tiny_model(arch)
    targets, task, extra = ARCHS[arch]
    our_base = copy.deepcopy(base)
    config = peft.LoraConfig(
        task_type=task,
        r=4,
        lora_alpha=8,
        target_modules=targets,
        init_lora_weights=False,
        modules_to_save=extra,
    )
    theirs = peft.get_peft_model(base, config).eval()
    _perturb_saved_modules(theirs)
    theirs.save_pretrained(tmp_path)

    ours = PeftModel.from_pretrained(our_base, tmp_path)
    with torch.no_grad():
        assert_rel_close(logits_of(ours(**inputs)), logits_of(theirs(**inputs)))
    assert all(not p.requires_grad for p in ours.parameters())  # inference mode by default


def test_trainable_parameter_count_matches_peft(tiny_model):
    for arch in ("bert", "llama", "gpt2"):
        base, _ = tiny_model(arch)
        targets, task, extra = ARCHS[arch]
        kwargs = dict(task_type=task, r=4, target_modules=targets, modules_to_save=extra)
        ours = get_peft_model(copy.deepcopy(base), LoraConfig(**kwargs))
        theirs = peft.get_peft_model(base, peft.LoraConfig(**kwargs))
        assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
