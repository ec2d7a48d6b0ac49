"""Bad input: clear errors that name the problem and the fix, and nothing lost on disk."""

from __future__ import annotations

import copy
import json
import os

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import peftkit.checkpoint as checkpoint
from conftest import logits_of
from peftkit import LoraConfig, PeftModel, get_peft_model


def _saved(tiny_model, tmp_path, **kw):
    base, inputs = tiny_model("llama")
    model = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(
            task_type="CAUSAL_LM",
            r=4,
            target_modules=["q_proj", "v_proj"],
            init_lora_weights=False,
            **kw,
        ),
    )
    model.save_pretrained(tmp_path)
    return base, model, inputs


def test_unmatched_targets_list_existing_names(tiny_model):
    base, _ = tiny_model("llama")
    with pytest.raises(ValueError, match="matched no module") as err:
        get_peft_model(base, LoraConfig(target_modules=["query_key_value"]))
    assert "q_proj" in str(err.value) and "down_proj" in str(err.value)
    with pytest.raises(ValueError, match="target_modules is not set"):
        get_peft_model(base, LoraConfig())


def test_missing_and_unexpected_keys_are_named(tiny_model, tmp_path):
    base, _, _ = _saved(tiny_model, tmp_path)
    path = tmp_path / checkpoint.WEIGHTS_NAME
    state = load_file(path)
    dropped = sorted(state)[0]
    del state[dropped]
    state["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = torch.zeros(4, 32)
    save_file(state, path)
    with pytest.raises(ValueError) as err:
        PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    message = str(err.value)
    assert f"missing keys: {dropped}" in message
    assert "unexpected keys: base_model.model.model.layers.0.mlp.up_proj.lora_A.weight" in message


def test_adapter_for_a_different_base_model_is_refused(tiny_model, tmp_path):
    _, _, _ = _saved(tiny_model, tmp_path)
    import transformers as tf

    wider = tf.LlamaForCausalLM(
        tf.LlamaConfig(
            vocab_size=96,
            hidden_size=64,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    with pytest.raises(ValueError, match="has shape .* but the model expects"):
        PeftModel.from_pretrained(wider, tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors_file(damage, tiny_model, tmp_path):
    base, _, _ = _saved(tiny_model, tmp_path)
    path = tmp_path / checkpoint.WEIGHTS_NAME
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00" * 64)
    with pytest.raises(ValueError, match="corrupt or truncated"):
        PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)


def test_missing_files_are_explained(tiny_model, tmp_path):
    base, _ = tiny_model("llama")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        PeftModel.from_pretrained(base, tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        PeftModel.from_pretrained(base, tmp_path)


def test_unknown_config_field_warns_and_loads(tiny_model, tmp_path):
    base, model, inputs = _saved(tiny_model, tmp_path)
    cfg_path = tmp_path / "adapter_config.json"
    data = json.loads(cfg_path.read_text())
    data["brand_new_option"] = 3
    cfg_path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="brand_new_option"):
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(logits_of(loaded(**inputs)), logits_of(model.eval()(**inputs)))


def test_unimplemented_peft_feature_is_refused(tiny_model, tmp_path):
    base, _, _ = _saved(tiny_model, tmp_path)
    cfg_path = tmp_path / "adapter_config.json"
    data = json.loads(cfg_path.read_text())
    data["layer_replication"] = [[0, 1]]  # a PEFT option peftkit does not implement
    cfg_path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="layer_replication.*not implement"):
        PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)


def test_bad_config_values():
    with pytest.raises(ValueError, match="positive integer"):
        LoraConfig(r=0)
    with pytest.raises(ValueError, match="bias must be"):
        LoraConfig(bias="some")
    with pytest.raises(ValueError, match="unknown task_type"):
        LoraConfig(task_type="CAUSAL")


def test_crash_mid_save_keeps_previous_adapter(tiny_model, tmp_path, monkeypatch):
    base, model, inputs = _saved(tiny_model, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(checkpoint, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(tmp_path)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after == before  # old files untouched, no temp files left behind
    monkeypatch.undo()
    PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)  # still loads


def test_legacy_bin_adapter_from_peft_loads_safely(tiny_model, tmp_path):
    base, inputs = tiny_model("llama")
    theirs = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(
            task_type="CAUSAL_LM", r=4, target_modules=["q_proj"], init_lora_weights=False
        ),
    ).eval()
    theirs.save_pretrained(tmp_path, safe_serialization=False)
    assert os.path.exists(tmp_path / "adapter_model.bin")
    ours = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(logits_of(ours(**inputs)), logits_of(theirs(**inputs)))


def test_non_default_adapters_go_in_subfolders(tiny_model, tmp_path):
    base, inputs = tiny_model("llama")
    model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    )
    model.add_adapter("second", LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists()
    assert (tmp_path / "second" / "adapter_model.safetensors").exists()
    assert (tmp_path / "README.md").read_text().startswith("---")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    loaded.load_adapter(tmp_path / "second", "second")
    loaded.set_adapter("second")
    model.set_adapter("second")
    with torch.no_grad():
        torch.testing.assert_close(logits_of(loaded(**inputs)), logits_of(model.eval()(**inputs)))


@pytest.mark.parametrize("first", ["lora", "adalora"])
def test_wrapping_an_adapted_model_again_is_refused(first, tiny_model):
    from peftkit import AdaLoraConfig

    base, _ = tiny_model("llama")
    config = (
        LoraConfig(r=4, target_modules=["q_proj"])
        if first == "lora"
        else AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["q_proj"])
    )
    inner = get_peft_model(base, config).base_model.model  # the injected model, unwrapped
    with pytest.raises(ValueError, match="already holds adapter layers"):
        get_peft_model(inner, LoraConfig(r=4, target_modules=["v_proj"]))


def test_saved_files_get_the_usual_permissions(tiny_model, tmp_path):
    old = os.umask(0o022)
    try:
        _saved(tiny_model, tmp_path)
    finally:
        os.umask(old)
    for name in ("adapter_model.safetensors", "adapter_config.json", "README.md"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o644, name


def test_injection_pauses_the_garbage_collector_and_restores_it():
    """get_peft_model pauses Python's cyclic GC while it builds modules (speed) and leaves it as
    it found it, also when injection fails."""
    import gc

    from torch import nn

    import peftkit

    seen = []
    model = nn.ModuleDict({"t": nn.Linear(8, 8)})
    original = peftkit.tuner.InjectedAdapterModel.create_layer

    def spy(self, target, config):
        seen.append(gc.isenabled())
        return original(self, target, config)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(peftkit.tuner.InjectedAdapterModel, "create_layer", spy)
        peftkit.get_peft_model(model, peftkit.LoraConfig(target_modules=["t"]))
    assert seen == [False] and gc.isenabled()
    with pytest.raises(ValueError, match="not found|no module|target"):
        peftkit.get_peft_model(
            nn.ModuleDict({"t": nn.Linear(8, 8)}), peftkit.LoraConfig(target_modules=["nope"])
        )
    assert gc.isenabled()
    gc.disable()
    try:
        peftkit.get_peft_model(
            nn.ModuleDict({"t": nn.Linear(8, 8)}), peftkit.LoraConfig(target_modules=["t"])
        )
        assert not gc.isenabled()  # a caller's choice is kept
    finally:
        gc.enable()
