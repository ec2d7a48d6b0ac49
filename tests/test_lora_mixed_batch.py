"""Mixed-adapter batches: each row runs its own adapter in one forward (PEFT's ``adapter_names``)."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

from conftest import assert_rel_close, logits_of
from peftkit import LoraConfig, get_peft_model


def _two_adapters(lib, base, task, targets, **extra):
    cfg_cls = LoraConfig if lib == "peftkit" else peft.LoraConfig
    make = get_peft_model if lib == "peftkit" else peft.get_peft_model
    model = make(
        base, cfg_cls(task_type=task, r=2, target_modules=targets, init_lora_weights=False, **extra)
    )
    model.add_adapter(
        "b",
        cfg_cls(
            task_type=task,
            r=5,
            lora_alpha=3,
            target_modules=targets[:1],
            init_lora_weights=False,
            **extra,
        ),
    )
    return model.eval()


@pytest.mark.parametrize(
    "arch,task,targets",
    [
        ("llama", "CAUSAL_LM", ["q_proj", "v_proj", "up_proj"]),
        ("bert", "SEQ_CLS", ["query", "value"]),
    ],
)
def test_mixed_batch_matches_peft_and_single_adapter_runs(arch, task, targets, tiny_model):
    base, inputs = tiny_model(arch)
    ours = _two_adapters("peftkit", copy.deepcopy(base), task, targets)
    with torch.no_grad():  # give the classifier copies distinct weights
        for n, p in ours.named_parameters():
            if "modules_to_save" in n:
                p.add_(torch.randn_like(p))
    theirs = _two_adapters("peft", copy.deepcopy(base), task, targets)
    theirs.load_state_dict(ours.state_dict())
    batch = {k: torch.cat([v, v.flip(0)]) for k, v in inputs.items()}  # 4 rows
    names = ["default", "b", "__base__", "b"]
    with torch.no_grad():
        mixed = logits_of(ours(**batch, adapter_names=names))
        assert_rel_close(mixed, logits_of(theirs(**batch, adapter_names=names)))
        for row, name in enumerate(names):
            one = {k: v[row : row + 1] for k, v in batch.items()}
            if name == "__base__":
                with ours.disable_adapter():
                    expected = logits_of(ours(**one))
            else:
                ours.set_adapter(name)
                expected = logits_of(ours(**one))
            assert_rel_close(mixed[row : row + 1], expected)


def test_mixed_batch_generate_and_errors(tiny_model):
    base, inputs = tiny_model("llama")
    model = _two_adapters("peftkit", base, "CAUSAL_LM", ["q_proj", "v_proj"])
    ids = inputs["input_ids"]
    with torch.no_grad():
        both = model.generate(
            input_ids=ids, max_new_tokens=4, do_sample=False, adapter_names=["default", "b"]
        )
        model.set_adapter("b")
        second = model.generate(input_ids=ids[1:], max_new_tokens=4, do_sample=False)
    assert torch.equal(both[1:], second)
    with pytest.raises(ValueError, match="unknown adapters"):
        model(input_ids=ids, adapter_names=["default", "nope"])
    with pytest.raises(ValueError, match="2 entries but the batch has 1 rows"):
        model(input_ids=ids[:1], adapter_names=["default", "b"])
