"""trainable_token_indices on a tiny Llama, against PEFT: untied and tied output embeddings.

Checked per case: forward and gradients equal PEFT's, the file's keys and tensors equal PEFT's
(``<path>.token_adapter.trainable_tokens_delta``), PEFT's file -> peftkit and back, disable,
merge_and_unload, unload, a mixed-adapter batch.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from safetensors.torch import load_file

import peftkit
from tiny_models import VOCAB, tiny_model

TOL = dict(rtol=1e-5, atol=1e-6)
INDICES = [1, 5, 7]


def _logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def _peft(base, seed, **kwargs):
    torch.manual_seed(seed)
    model = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **kwargs)
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "trainable_tokens_delta" in name:
                param.add_(torch.randn_like(param))
    return model.eval()


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("tied", [False, True])
def test_trainable_tokens_match_peft(tmp_path, tied):
    base = tiny_model("llama", "CAUSAL_LM", tie_word_embeddings=tied)
    assert (base.lm_head.weight is base.model.embed_tokens.weight) == tied
    ids = torch.randint(0, VOCAB, (3, 9))
    ids[:, :3] = torch.tensor(INDICES)  # the trained rows are looked up
    kwargs = dict(target_modules=["q_proj"], r=2, trainable_token_indices=INDICES)
    theirs = _peft(base, 1, **kwargs)
    theirs.save_pretrained(tmp_path / "peft")
    files = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta" in files

    ours = peftkit.PeftModel.from_pretrained(
        copy.deepcopy(base), tmp_path / "peft", is_trainable=True
    )
    ours.eval()
    expected = _logits(theirs, ids)
    torch.testing.assert_close(_logits(ours, ids), expected, **TOL)
    for model in (theirs, ours):
        model.zero_grad()
        model(input_ids=ids).logits.square().mean().backward()
    grads = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    their = {n: p.grad for n, p in theirs.named_parameters() if p.grad is not None}
    assert sorted(grads) == sorted(their)
    for name, grad in their.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    with ours.disable_adapter():
        torch.testing.assert_close(_logits(ours, ids), _logits(base, ids), **TOL)

    ours.save_pretrained(tmp_path / "ours")
    mine = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(mine) == sorted(files)
    for key, value in files.items():
        torch.testing.assert_close(mine[key], value, rtol=0, atol=0)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(_logits(back, ids), expected, **TOL)

    _peft(base, 2, **kwargs).save_pretrained(tmp_path / "peft_b")
    theirs.load_adapter(str(tmp_path / "peft_b"), adapter_name="other")
    ours.load_adapter(tmp_path / "peft_b", adapter_name="other")
    ours.eval()
    names = ["other", "__base__", "default"]
    torch.testing.assert_close(
        _logits(ours, ids, adapter_names=names), _logits(theirs, ids, adapter_names=names), **TOL
    )
    theirs.delete_adapter("other")
    ours.delete_adapter("other")

    merged = _logits(copy.deepcopy(theirs).merge_and_unload(), ids)
    torch.testing.assert_close(_logits(copy.deepcopy(ours).merge_and_unload(), ids), merged, **TOL)
    torch.testing.assert_close(_logits(ours.unload(), ids), _logits(base, ids), **TOL)


def test_trainable_tokens_refusals():
    base = tiny_model("llama", "CAUSAL_LM")
    with pytest.raises(ValueError, match="modules_to_save.*trainable_token_indices"):
        peftkit.get_peft_model(
            copy.deepcopy(base),
            peftkit.LoraConfig(
                target_modules=["q_proj"],
                modules_to_save=["embed_tokens"],
                trainable_token_indices={"embed_tokens": [1]},
            ),
        )
    with pytest.raises(ValueError, match="must be an nn.Embedding"):
        peftkit.get_peft_model(
            copy.deepcopy(base),
            peftkit.LoraConfig(target_modules=["embed_tokens"], trainable_token_indices=[1]),
        )
