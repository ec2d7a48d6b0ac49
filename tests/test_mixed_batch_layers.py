"""Mixed-adapter batches on every adapted layer type: row ``b`` runs adapter ``adapter_names[b]``.

Each mixed forward is checked two ways (fp32, relative error <= 1e-5):

* row by row against running that adapter alone (``set_adapter``; ``"__base__"`` rows under
  ``disable_adapter()``);
* against HF PEFT's ``adapter_names=`` output where PEFT supports it (LoRA on Linear, GPT-2
  Conv1D, Embedding, Conv1d, Conv2d; PEFT's AdaLoRA layers reject ``adapter_names``).

Covers LoRA on ``embed_tokens`` + ``q_proj`` (a tiny Llama), Conv1d/Conv2d toys, GPT-2 Conv1D, a
4-bit base, AdaLoRA on tiny Llama / BERT, ``generate()``, and the refusals (merged adapters,
training mode, a batch of the wrong length).
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn

from conftest import assert_rel_close, logits_of
from peftkit import AdaLoraConfig, LoraConfig, get_peft_model

NAMES = ["default", "b", "__base__", "b"]


def _batch4(inputs: dict) -> dict:
    """The fixture's 2 rows, then the same rows flipped: 4 rows with different content."""
    return {k: torch.cat([v, v.flip(0)]) for k, v in inputs.items()}


def _lora_pair(base, first: dict, second: dict, **common):
    """(ours, theirs): the same two adapters in peftkit and in PEFT, with identical weights."""
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(**common, **first))
    ours.add_adapter("b", LoraConfig(**common, **second))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**common, **first))
    theirs.add_adapter("b", peft.LoraConfig(**common, **second))
    missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and not [k for k in missing if "lora_" in k]
    return ours.eval(), theirs.eval()


def _out(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else logits_of(output)


def _each_row_alone(model, batch: dict, names: list[str], run=None) -> torch.Tensor:
    """Row ``b`` computed on its own with adapter ``names[b]`` active (or the adapters disabled)."""
    run = run or (lambda m, one: _out(m(**one)))
    active = model.active_adapter
    rows = []
    with torch.no_grad():
        for row, name in enumerate(names):
            one = {k: v[row : row + 1] for k, v in batch.items()}
            if name == "__base__":
                with model.disable_adapter():
                    rows.append(run(model, one))
            else:
                model.set_adapter(name)
                rows.append(run(model, one))
    model.set_adapter(active)
    return torch.cat(rows)


def _check(ours, theirs, batch: dict, names: list[str] = NAMES) -> None:
    with torch.no_grad():
        mixed = _out(ours(**batch, adapter_names=names))
    assert_rel_close(mixed, _each_row_alone(ours, batch, names))
    if theirs is not None:
        with torch.no_grad():
            expected = _out(theirs(**batch, adapter_names=names))
        assert_rel_close(mixed, expected)


# --- LoRA on a tiny Llama: Embedding + Linear ---------------------------------------------------
@pytest.mark.parametrize(
    "second_targets",
    [
        ["embed_tokens", "q_proj"],
        ["q_proj", "v_proj"],
    ],  # b without embed_tokens: a zero update there
)
def test_lora_embedding_and_linear(second_targets, tiny_model):
    base, inputs = tiny_model("llama")
    ours, theirs = _lora_pair(
        base,
        dict(r=2, target_modules=["embed_tokens", "q_proj"]),
        dict(r=5, lora_alpha=3, target_modules=second_targets),
        task_type="CAUSAL_LM",
        init_lora_weights=False,
    )
    _check(ours, theirs, _batch4(inputs))


def test_lora_gpt2_conv1d(tiny_model):
    base, inputs = tiny_model("gpt2")
    ours, theirs = _lora_pair(
        base,
        dict(r=2, target_modules=["c_attn", "wte"]),
        dict(r=3, lora_alpha=5, target_modules=["c_attn", "c_proj"]),
        task_type="CAUSAL_LM",
        init_lora_weights=False,
        fan_in_fan_out=True,
    )
    _check(ours, theirs, _batch4(inputs))


# --- LoRA on convolutions ------------------------------------------------------------------------
class ConvToy(nn.Module):
    """Conv1d over a sequence, then Conv2d over it as an image, then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(6, 8, kernel_size=3, padding=1, stride=1)
        self.conv2 = nn.Conv2d(2, 4, kernel_size=3, padding=1, stride=2, dilation=1)
        self.head = nn.Linear(4 * 4 * 5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x))  # (B, 8, 10)
        img = h.reshape(h.shape[0], 2, 4, 10)  # (B, 2, 4, 10)
        h = self.conv2(img)  # (B, 4, 2, 5)
        return self.head(h.flatten(1).repeat(1, 2))  # (B, 3)


@pytest.mark.parametrize(
    "first,second",
    [
        (["conv1"], ["conv1"]),  # Conv1d only
        (["conv2"], ["conv2", "head"]),  # Conv2d (stride 2) and a Linear
        (["conv1", "conv2"], ["conv2"]),  # b without conv1
    ],
)
def test_lora_conv1d_conv2d(first, second):
    torch.manual_seed(0)
    base = ConvToy().eval()
    ours, theirs = _lora_pair(
        base,
        dict(r=2, target_modules=first),
        dict(r=3, lora_alpha=7, target_modules=second),
        init_lora_weights=False,
    )
    x = torch.randn(4, 6, 10, generator=torch.Generator().manual_seed(3))
    _check(ours, theirs, {"x": x})


# --- LoRA on a 4-bit base ------------------------------------------------------------------------
def test_lora_on_4bit_linear(tiny_model):
    from peftkit.quant import quantize_model

    base, inputs = tiny_model("llama")
    quantize_model(base, blocksize=16)
    ours = get_peft_model(
        base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    ours.add_adapter(
        "b", LoraConfig(r=4, lora_alpha=2, target_modules=["q_proj"], init_lora_weights=False)
    )
    _check(ours.eval(), None, _batch4(inputs))


# --- AdaLoRA (PEFT has no adapter_names for its SVD layers: rows vs. each adapter alone) ---------
def _adalora_two(base, task, targets):
    common = dict(task_type=task, init_r=4, target_r=2, total_step=10, init_lora_weights=False)
    model = get_peft_model(base, AdaLoraConfig(target_modules=targets, **common))
    second = AdaLoraConfig(target_modules=targets[:1], lora_alpha=3, inference_mode=True, **common)
    model.add_adapter("b", second)
    return model.eval()


@pytest.mark.parametrize(
    "arch,task,targets",
    [
        ("llama", "CAUSAL_LM", ["q_proj", "v_proj", "down_proj"]),
        ("bert", "SEQ_CLS", ["query", "value"]),
    ],
)
def test_adalora(arch, task, targets, tiny_model):
    base, inputs = tiny_model(arch)
    model = _adalora_two(base, task, targets)
    _check(model, None, _batch4(inputs))


def test_adalora_gpt2_conv1d(tiny_model):
    base, inputs = tiny_model("gpt2")
    with pytest.warns(UserWarning, match="Conv1D .*setting fan_in_fan_out=True"):
        model = _adalora_two(base, "CAUSAL_LM", ["c_attn", "c_proj"])
    _check(model, None, _batch4(inputs))


# --- generate() ----------------------------------------------------------------------------------
def _generate(model, ids, **kw) -> torch.Tensor:
    return model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, **kw)


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_generate_runs_each_row_with_its_adapter(method, tiny_model):
    base, inputs = tiny_model("llama")
    ids = _batch4(inputs)["input_ids"]  # no padding: rows generate independently
    if method == "lora":
        ours, theirs = _lora_pair(
            base,
            dict(r=2, target_modules=["embed_tokens", "q_proj"]),
            dict(r=5, lora_alpha=3, target_modules=["embed_tokens", "v_proj"]),
            task_type="CAUSAL_LM",
            init_lora_weights=False,
        )
    else:
        ours, theirs = _adalora_two(base, "CAUSAL_LM", ["q_proj", "v_proj"]), None
    with torch.no_grad():
        mixed = _generate(ours, ids, adapter_names=NAMES)
        alone = _each_row_alone(
            ours, {"input_ids": ids}, NAMES, lambda m, one: _generate(m, one["input_ids"])
        )
        assert torch.equal(mixed, alone), (mixed, alone)
        if theirs is not None:
            assert torch.equal(mixed, _generate(theirs, ids, adapter_names=NAMES))
        # the rows really differ per adapter (otherwise the test proves nothing)
        assert len({tuple(r.tolist()) for r in alone[:3]}) == 3


# --- refusals ------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_merged_training_and_wrong_length_are_refused(method, tiny_model):
    base, inputs = tiny_model("llama")
    if method == "lora":
        model = get_peft_model(
            base,
            LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False),
        )
        model.add_adapter("b", LoraConfig(r=3, target_modules=["q_proj"], init_lora_weights=False))
    else:
        model = _adalora_two(base, "CAUSAL_LM", ["q_proj"])
    ids = inputs["input_ids"]
    model.eval()
    with pytest.raises(ValueError, match="2 entries but the batch has 1 rows"):
        model(input_ids=ids[:1], adapter_names=["default", "b"])
    model.train()
    with pytest.raises(ValueError, match=r"training mode.*model\.eval\(\)"):
        model(input_ids=ids, adapter_names=["default", "b"])
    model.eval()
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged.*unmerge_adapter"):
        model(input_ids=ids, adapter_names=["default", "b"])
    with pytest.raises(ValueError, match="merged.*unmerge_adapter"):
        _generate(model, ids, adapter_names=["default", "b"])
    model.unmerge_adapter()
    with torch.no_grad():
        model(input_ids=ids, adapter_names=["default", "b"])  # fine again
