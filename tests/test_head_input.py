"""The LM head gets a contiguous input (peftkit.head_input): same logits, the fast matmul path."""

from __future__ import annotations

import torch

import peftkit
from peftkit import head_input
from tiny_models import tiny_model


def _seen_by_head(model, **kw):
    seen = []
    handle = model.get_output_embeddings().register_forward_pre_hook(
        lambda m, args: seen.append(args[0].is_contiguous())
    )
    with torch.no_grad():
        logits = model(**kw).logits
    handle.remove()
    return logits, seen


def test_last_token_logits_reach_the_head_contiguous_and_unchanged():
    base = tiny_model("llama", "CAUSAL_LM")
    ids = torch.randint(0, 96, (3, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = base(input_ids=ids).logits  # (3, 7, V)
    _, seen = _seen_by_head(base, input_ids=ids, logits_to_keep=1)
    assert seen == [False]  # what transformers hands the head: a strided (B, 1, H) slice

    model = peftkit.get_peft_model(
        base, peftkit.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
    ).eval()
    with model.disable_adapter():
        last, seen = _seen_by_head(model, input_ids=ids, logits_to_keep=1)
    assert seen == [True]
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-6, atol=1e-6)


def test_installed_once_and_only_where_there_is_a_head():
    base = tiny_model("llama", "CAUSAL_LM")
    model = peftkit.get_peft_model(base, peftkit.LoraConfig(r=4, target_modules=["q_proj"]))
    model.add_adapter("second", peftkit.LoraConfig(r=4, target_modules=["q_proj"]))
    head_input.install(base)
    hooks = base.get_output_embeddings()._forward_pre_hooks.values()
    assert sum(h is head_input._contiguous_first_input for h in hooks) == 1

    encoder = tiny_model("bert", "SEQ_CLS")  # no output embeddings: nothing to do, no error
    peftkit.get_peft_model(encoder, peftkit.LoraConfig(r=4, target_modules=["query"]))
