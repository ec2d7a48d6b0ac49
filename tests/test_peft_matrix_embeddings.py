"""Adapters that carry embedding weights (PEFT's ``save_embedding_layers="auto"``), both ways.

PEFT 0.21 stores ``<path>.base_layer.weight`` of the input/output embeddings when
``target_modules`` names ``embed_tokens``/``lm_head``, and the whole embeddings
(``model.embed_tokens.weight``, ``lm_head.weight``) when the vocabulary was resized against the
base model's ``config.json``. Each test checks: same file keys and tensors as PEFT, PEFT's file
loads in peftkit and ours in PEFT, outputs equal.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from safetensors.torch import load_file

import peftkit
from tiny_models import VOCAB, tiny_model


def _files(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def _same_files(ours, theirs) -> None:
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0)


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("targets", [["embed_tokens", "q_proj"], ["embed_tokens", "lm_head"]])
def test_targeted_embeddings_travel_with_the_adapter(tmp_path, targets):
    base = tiny_model("llama", "CAUSAL_LM")
    ids = torch.randint(0, VOCAB, (2, 7))
    kwargs = dict(target_modules=targets, r=4, lora_alpha=8, init_lora_weights=False)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs)).eval()
    with pytest.warns(UserWarning):
        theirs.save_pretrained(tmp_path / "peft")
    assert "base_model.model.model.embed_tokens.base_layer.weight" in _files(tmp_path / "peft")

    ours = peftkit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    torch.testing.assert_close(_logits(ours, ids), _logits(theirs, ids), rtol=1e-5, atol=1e-6)
    ours.save_pretrained(tmp_path / "ours")
    _same_files(_files(tmp_path / "ours"), _files(tmp_path / "peft"))
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(_logits(back, ids), _logits(theirs, ids), rtol=1e-5, atol=1e-6)


def test_resized_vocabulary_travels_with_the_adapter(tmp_path):
    base = tiny_model("llama", "CAUSAL_LM")
    base.config.save_pretrained(tmp_path / "base")  # base_model_name_or_path: the old vocab size
    base.name_or_path = base.config._name_or_path = str(tmp_path / "base")  # as from_pretrained
    base.resize_token_embeddings(VOCAB + 8)
    trained = copy.deepcopy(base)
    with torch.no_grad():  # new token rows "learnt" during fine-tuning
        trained.get_input_embeddings().weight[VOCAB:].normal_()
        trained.get_output_embeddings().weight[VOCAB:].normal_()
    ids = torch.randint(0, VOCAB + 8, (2, 7))
    kwargs = dict(target_modules=["q_proj"], r=4, init_lora_weights=False)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(copy.deepcopy(trained), peft.LoraConfig(**kwargs)).eval()
    with pytest.warns(UserWarning):
        theirs.save_pretrained(tmp_path / "peft")
    assert "base_model.model.lm_head.weight" in _files(tmp_path / "peft")

    ours = peftkit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    torch.testing.assert_close(_logits(ours, ids), _logits(theirs, ids), rtol=1e-5, atol=1e-6)
    ours.save_pretrained(tmp_path / "ours")
    _same_files(_files(tmp_path / "ours"), _files(tmp_path / "peft"))
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(_logits(back, ids), _logits(theirs, ids), rtol=1e-5, atol=1e-6)


def test_unresized_base_is_told_to_resize(tmp_path):
    base = tiny_model("llama", "CAUSAL_LM")
    base.config.save_pretrained(tmp_path / "base")
    base.name_or_path = base.config._name_or_path = str(tmp_path / "base")  # as from_pretrained
    resized = copy.deepcopy(base)
    resized.resize_token_embeddings(VOCAB + 8)
    config = peftkit.LoraConfig(target_modules=["q_proj"])
    peftkit.get_peft_model(resized, config).save_pretrained(tmp_path / "ours")
    with pytest.raises(ValueError, match=r"resize_token_embeddings\(104\)"):
        peftkit.PeftModel.from_pretrained(base, tmp_path / "ours")
