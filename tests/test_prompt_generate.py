"""``generate()`` with prompt-learning adapters is right, and processes the virtual tokens once.

The reference is cache-free greedy decoding: one full forward pass of the same adapted model per
new token (whose logits match PEFT's forward, see test_prompt_parity), with the positions that
``generate`` derives from the attention mask. HF PEFT's ``generate()`` is *not* the reference
(with peft 0.21.2 and transformers 5.24 it re-adds the prompt at every step and ignores a prefix).
"""

from __future__ import annotations

import inspect

import pytest
import torch

from peftkit import get_peft_model
from test_prompt_common import (
    CAUSAL,
    METHODS,
    SEQ2SEQ,
    one_thread,  # noqa: F401  (autouse fixture)
    ours_config,
    tiny_inputs,
    tiny_model,
)

NEW_TOKENS = 6


def _adapted(arch: str, task: str, method: str):
    base = tiny_model(arch, task)
    base.generation_config.eos_token_id = None  # run all NEW_TOKENS steps
    base.generation_config.pad_token_id = 0
    return get_peft_model(base, ours_config(method, task)).eval()


def _greedy_causal(model, ids: torch.Tensor, mask: torch.Tensor, steps: int) -> torch.Tensor:
    """Cache-free greedy decoding; positions = cumsum(mask) - 1 as ``generate`` uses them."""
    takes_positions = "position_ids" in inspect.signature(model.base_model.forward).parameters
    for _ in range(steps):
        kwargs = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
        if takes_positions:
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(**kwargs).logits[:, -1]  # (B, V)
        ids = torch.cat((ids, logits.argmax(-1, keepdim=True)), dim=1)
        mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
    return ids


def _greedy_seq2seq(model, inputs: dict, start: int, steps: int) -> torch.Tensor:
    decoded = torch.full((inputs["input_ids"].shape[0], 1), start, dtype=torch.long)
    for _ in range(steps):
        logits = model(**inputs, decoder_input_ids=decoded, use_cache=False).logits[:, -1]
        decoded = torch.cat((decoded, logits.argmax(-1, keepdim=True)), dim=1)
    return decoded


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", CAUSAL)
def test_causal_greedy_generation_matches_cache_free_reference(arch, method):
    model = _adapted(arch, "CAUSAL_LM", method)
    inputs = tiny_inputs("CAUSAL_LM", batch=3, pad_left=3)  # row 1 is left-padded
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        want = _greedy_causal(model, inputs["input_ids"], inputs["attention_mask"], NEW_TOKENS)
        alone = model.generate(
            input_ids=inputs["input_ids"][1:2, 3:], max_new_tokens=NEW_TOKENS, do_sample=False
        )
    assert torch.equal(out, want)
    assert torch.equal(out[1, -NEW_TOKENS:], alone[0, -NEW_TOKENS:])  # padding changes nothing


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", SEQ2SEQ)
def test_seq2seq_greedy_generation_matches_cache_free_reference(arch, method):
    model = _adapted(arch, "SEQ_2_SEQ_LM", method)
    inputs = tiny_inputs("CAUSAL_LM", batch=3, pad_left=0)
    inputs["attention_mask"][1, -2:] = 0  # right padding of the encoder input
    start = model.base_model.config.decoder_start_token_id
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        want = _greedy_seq2seq(model, inputs, start, NEW_TOKENS)
    assert torch.equal(out, want)


class _CallLog:
    """Records the query length of every forward call of the base model."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.lengths: list[int] = []
        self.handle = module.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, _module, args, kwargs):
        x = kwargs.get("input_ids")
        if x is None:
            x = kwargs.get("inputs_embeds")
        self.lengths.append(x.shape[1])


@pytest.mark.parametrize("method", METHODS)
def test_virtual_tokens_are_processed_once_then_cached(method):
    model = _adapted("llama", "CAUSAL_LM", method)
    inputs = tiny_inputs("CAUSAL_LM")
    log = _CallLog(model.base_model)
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    log.handle.remove()
    prompt = inputs["input_ids"].shape[1] + (0 if method.startswith("prefix") else 4)
    assert log.lengths == [prompt] + [1] * (NEW_TOKENS - 1)


@pytest.mark.parametrize("method", ("prompt", "prefix"))
def test_disabled_adapter_generates_like_the_base_model(method):
    model = _adapted("gpt2", "CAUSAL_LM", method)
    inputs = tiny_inputs("CAUSAL_LM")
    with torch.no_grad():
        with model.disable_adapter():
            off = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        base = model.base_model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        on = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(off, base)
    assert not torch.equal(on, base)


@pytest.mark.parametrize(("arch", "task"), [("llama", "CAUSAL_LM"), ("t5", "SEQ_2_SEQ_LM")])
def test_prefix_cache_is_sized_for_beams_and_returned_sequences(arch, task):
    model = _adapted(arch, task, "prefix")
    inputs = tiny_inputs("CAUSAL_LM", pad_left=0)
    with torch.no_grad():
        beams = model.generate(
            **inputs, max_new_tokens=4, num_beams=3, num_return_sequences=2, do_sample=False
        )
        greedy = model.generate(**inputs, max_new_tokens=4, num_beams=1, do_sample=False)
        torch.manual_seed(0)
        sampled = model.generate(**inputs, max_new_tokens=4, do_sample=True, num_return_sequences=3)
    assert beams.shape[0] == 4 and sampled.shape[0] == 6
    assert beams.shape[1] == greedy.shape[1] == sampled.shape[1]


def test_generate_refuses_non_generative_tasks():
    model = get_peft_model(tiny_model("bert", "SEQ_CLS"), ours_config("prompt", "SEQ_CLS"))
    with pytest.raises(ValueError, match="CAUSAL_LM or SEQ_2_SEQ_LM"):
        model.generate(input_ids=torch.ones(1, 3, dtype=torch.long))
