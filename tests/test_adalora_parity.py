"""AdaLoRA parity with HF PEFT (the oracle).

* same seed => the same initial adapter in both libraries;
* same init, same batches, same optimiser, ``update_and_allocate`` every step => the same
  ``rank_pattern`` after every step, the same masked singular values and the same logits;
* adapters round-trip both ways, with tensors sliced to the rank pattern as PEFT saves them.

fp32, relative error <= 1e-5.
"""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from safetensors.torch import load_file

from conftest import _tiny, assert_rel_close, logits_of
from peftkit import AdaLoraConfig, PeftModel, get_peft_model
from peftkit.methods.adalora_report import final_ranks

# arch -> target modules, task type (a small set covering Linear, GPT-2 Conv1D and a classifier head)
TARGETS = {
    "llama": (["q_proj", "v_proj", "down_proj"], "CAUSAL_LM"),
    "gpt2": (["c_attn", "c_proj"], "CAUSAL_LM"),
    "bert": (["query", "value"], "SEQ_CLS"),
}
SCHEDULE = dict(init_r=6, target_r=2, total_step=10, tinit=2, tfinal=3, deltaT=2, lora_alpha=8)


def _adapter_state(model) -> dict[str, torch.Tensor]:
    return {
        k.replace(".default", ""): v
        for k, v in model.state_dict().items()
        if ".lora_" in k or "modules_to_save" in k
    }


def _pair(tiny_model, arch: str, seed: int = 5, **overrides):
    """(ours, theirs, inputs): both built from one base and the same seed."""
    base, inputs = tiny_model(arch)
    targets, task = TARGETS[arch]
    kwargs = dict(task_type=task, target_modules=targets, **{**SCHEDULE, **overrides})
    twin = copy.deepcopy(base)
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(base, peft.AdaLoraConfig(**kwargs))
    torch.manual_seed(seed)
    ours = get_peft_model(twin, AdaLoraConfig(**kwargs))
    return ours, theirs, inputs


def _labels(arch: str, inputs: dict) -> dict:
    if arch == "bert":
        return {**inputs, "labels": torch.tensor([0, 2])}
    return {**inputs, "labels": inputs["input_ids"]}


@pytest.mark.parametrize("arch", list(TARGETS))
def test_same_seed_gives_same_initial_adapter(arch, tiny_model):
    ours, theirs, _ = _pair(tiny_model, arch)
    a, b = _adapter_state(ours), _adapter_state(theirs)
    b = {k: v for k, v in b.items() if ".ranknum" not in k}  # PEFT's constant, not a weight
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert all((v == 0).all() for k, v in a.items() if k.endswith("lora_E"))  # E starts at zero


def _train_both(ours, theirs, arch, inputs, optimizer: str, steps: int):
    """Train both on the same batches; return the per-step (ours, theirs) rank patterns."""
    batches = []
    gen = torch.Generator().manual_seed(11)
    for _ in range(steps):
        batch = dict(inputs)
        if "input_ids" in batch:
            batch["input_ids"] = torch.randint(0, 96, batch["input_ids"].shape, generator=gen)
        batches.append(_labels(arch, batch))
    opts = []
    for model in (ours, theirs):
        params = [p for p in model.parameters() if p.requires_grad]
        if optimizer == "sgd":
            opts.append(torch.optim.SGD(params, lr=0.5))
        else:
            opts.append(torch.optim.AdamW(params, lr=2e-2))
        model.train()
    history = []
    for step, batch in enumerate(batches, start=1):
        losses = []
        for model, opt in zip((ours, theirs), opts):
            torch.manual_seed(step)  # the same dropout masks in both base models
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            model.base_model.update_and_allocate(step)
            opt.zero_grad()
            losses.append(loss.detach())
        assert_rel_close(losses[0], losses[1])  # includes the orthogonality penalty
        history.append(  # the keys too: "<path>.lora_E.default" in memory in both libraries
            (
                dict(ours.peft_config["default"].rank_pattern or {}),
                {k: list(v) for k, v in (theirs.peft_config["default"].rank_pattern or {}).items()},
            )
        )
    return history


@pytest.mark.parametrize(
    "arch,optimizer", [("llama", "adamw"), ("llama", "sgd"), ("gpt2", "adamw"), ("bert", "adamw")]
)
def test_training_gives_same_masks_and_logits(arch, optimizer, tiny_model):
    ours, theirs, inputs = _pair(tiny_model, arch)
    history = _train_both(ours, theirs, arch, inputs, optimizer, steps=12)
    for step, (mine, peft_pattern) in enumerate(history, start=1):
        assert mine == peft_pattern, f"rank patterns differ after step {step}"
    final = history[-1][0]
    kept = [sum(mask) for mask in final.values()]
    n = len(final)
    assert n > 0 and sum(kept) <= SCHEDULE["target_r"] * n < SCHEDULE["init_r"] * n
    assert len({tuple(m) for m in final.values()}) > 1  # matrices kept different triplets
    assert history[2][0] != history[-1][0]  # the pattern moved during the decay phase
    ours_state, theirs_state = _adapter_state(ours), _adapter_state(theirs)
    for key, value in ours_state.items():
        assert_rel_close(value, theirs_state[key])
        if key.endswith("lora_E"):  # masked singular values are exactly zero in both
            assert torch.equal(value == 0, theirs_state[key] == 0)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        assert_rel_close(logits_of(ours(**inputs)), logits_of(theirs(**inputs)))


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_trained_peftkit_adapter_loads_in_peft(arch, tiny_model, tmp_path):
    ours, theirs, inputs = _pair(tiny_model, arch)
    history = _train_both(ours, theirs, arch, inputs, "adamw", steps=10)
    assert all(k.endswith(".lora_E.default") for k in history[-1][0])  # PEFT's in-memory keys
    ours.save_pretrained(tmp_path)
    theirs.save_pretrained(tmp_path / "peft")

    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    pattern = saved["rank_pattern"]
    peft_saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA" and pattern == peft_saved["rank_pattern"]  # same file
    assert all(k.endswith(".lora_E") for k in pattern)  # PEFT's files drop the adapter name
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    for key, keep in pattern.items():
        prefix = "base_model.model." + key.removesuffix(".lora_E")
        assert tensors[prefix + ".lora_A"].shape[0] == sum(keep)  # sliced to the kept triplets
        assert tensors[prefix + ".lora_B"].shape[1] == sum(keep)
        assert tensors[prefix + ".lora_E"].shape == (sum(keep), 1)
    assert not any("ranknum" in k for k in tensors)

    loaded = peft.PeftModel.from_pretrained(_plain_copy(arch), tmp_path).eval()
    ours.eval()
    with torch.no_grad():
        assert_rel_close(logits_of(loaded(**inputs)), logits_of(ours(**inputs)))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_trained_peft_adapter_loads_in_peftkit(arch, tiny_model, tmp_path):
    ours, theirs, inputs = _pair(tiny_model, arch)
    base_copy = _plain_copy(arch)
    _train_both(ours, theirs, arch, inputs, "adamw", steps=10)
    theirs.save_pretrained(tmp_path)

    loaded = PeftModel.from_pretrained(base_copy, tmp_path)
    theirs.eval()
    with torch.no_grad():
        assert_rel_close(logits_of(loaded(**inputs)), logits_of(theirs(**inputs)))
    pattern = loaded.peft_config["default"].rank_pattern
    for path, layer in loaded.base_model.adapter_layers():
        assert layer.r["default"] == sum(pattern[path + ".lora_E"])  # resized to the saved ranks
        assert layer.ranknum["default"] == SCHEDULE["init_r"]  # the divisor keeps init_r
    assert all(not p.requires_grad for p in loaded.parameters())

    # merged weights give the same function
    with torch.no_grad():
        merged = logits_of(loaded.merge_and_unload()(**inputs))
        assert_rel_close(merged, logits_of(theirs(**inputs)))


def _plain_copy(arch: str):
    """A fresh, adapter-free copy of the tiny base (the fixture's seed => the same weights)."""
    torch.manual_seed(0)
    fresh, _ = _tiny(arch)
    return fresh.eval()


def test_saved_untrained_adapter_keeps_full_rank_and_round_trips(tiny_model, tmp_path):
    ours, theirs, inputs = _pair(tiny_model, "llama", init_lora_weights=False)
    ours.save_pretrained(tmp_path / "ours")
    tensors = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert all(t.shape[0] == SCHEDULE["init_r"] for k, t in tensors.items() if "lora_A" in k)
    back = peft.PeftModel.from_pretrained(_plain_copy("llama"), tmp_path / "ours").eval()
    with torch.no_grad():
        assert_rel_close(logits_of(back(**inputs)), logits_of(ours.eval()(**inputs)))


@pytest.mark.parametrize("suffix", ["", ".default"])
def test_rank_pattern_with_or_without_adapter_name_loads(suffix, tiny_model, tmp_path):
    """Files key ``rank_pattern`` by ``<path>.lora_E`` (PEFT's and older peftkit ones); a config
    dumped from PEFT's in-memory pattern keeps ``.<adapter>``. Both load, under any adapter name,
    and resume training at the saved ranks."""
    ours, theirs, inputs = _pair(tiny_model, "llama")
    _train_both(ours, theirs, "llama", inputs, "adamw", steps=10)
    ours.save_pretrained(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    data = json.loads(config_file.read_text())
    data["rank_pattern"] = {k + suffix: v for k, v in data["rank_pattern"].items()}
    config_file.write_text(json.dumps(data))
    kept = {k.removesuffix(".lora_E" + suffix): sum(v) for k, v in data["rank_pattern"].items()}

    loaded = PeftModel.from_pretrained(_plain_copy("llama"), tmp_path, adapter_name="x")
    assert {p: layer.r["x"] for p, layer in loaded.base_model.adapter_layers()} == kept
    assert final_ranks(loaded, "x") == kept
    ours.eval()
    with torch.no_grad():
        assert_rel_close(logits_of(loaded(**inputs)), logits_of(ours(**inputs)))

    trainable = PeftModel.from_pretrained(_plain_copy("llama"), tmp_path, is_trainable=True)
    opt = torch.optim.SGD([p for p in trainable.parameters() if p.requires_grad], lr=0.1)
    trainable.train()
    trainable(**_labels("llama", inputs)).loss.backward()
    opt.step()
    trainable.base_model.update_and_allocate(11)  # final phase: re-applies the loaded pattern
    assert {p: layer.r["default"] for p, layer in trainable.base_model.adapter_layers()} == kept
