"""Training behaviour: gradients match PEFT, only the adapter trains, labels line up, inits."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import torch.nn.functional as F

from conftest import assert_rel_close
from peftkit import PromptTuningConfig, get_peft_model
from test_prompt_common import (
    METHODS,
    TOKENS,
    VOCAB,
    one_thread,  # noqa: F401  (autouse fixture)
    ours_config,
    outputs_of,
    peft_config,
    tiny_inputs,
    tiny_model,
)


@pytest.mark.parametrize("method", METHODS)
def test_one_training_step_matches_peft_and_touches_only_the_adapter(method):
    task = "CAUSAL_LM"
    base = tiny_model("opt", task)
    ours = get_peft_model(copy.deepcopy(base), ours_config(method, task))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(method, task))
    theirs.prompt_encoder["default"].load_state_dict(ours.prompt_encoder["default"].state_dict())
    frozen = {k: v.clone() for k, v in ours.base_model.state_dict().items()}
    inputs = {**tiny_inputs(task), "labels": tiny_inputs(task)["input_ids"]}
    for model in (ours, theirs):  # eval: no dropout in the base model, gradients still flow
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        model(**inputs).loss.backward()
        optimizer.step()
    theirs_state = theirs.prompt_encoder["default"].state_dict()
    for key, value in ours.prompt_encoder["default"].state_dict().items():
        assert_rel_close(value, theirs_state[key])
    for key, value in ours.base_model.state_dict().items():
        assert torch.equal(value, frozen[key]), key
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0
        for p in ours.prompt_encoder["default"].parameters()
    )


@pytest.mark.parametrize("method", ["prompt", "ptuning_mlp"])
def test_token_classification_labels_skip_the_virtual_tokens(method):
    model = get_peft_model(tiny_model("bert", "TOKEN_CLS"), ours_config(method, "TOKEN_CLS"))
    inputs = tiny_inputs("TOKEN_CLS", pad_left=0)
    labels = inputs["input_ids"] % 3
    out = model(**inputs, labels=labels)
    assert out.logits.shape[1] == TOKENS + labels.shape[1]  # PEFT's shape: prompt included
    want = F.cross_entropy(out.logits[:, TOKENS:].reshape(-1, 3), labels.reshape(-1))
    assert_rel_close(out.loss, want)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_question_answering_positions_point_at_the_real_tokens(method):
    model = get_peft_model(
        tiny_model("roberta", "QUESTION_ANS"), ours_config(method, "QUESTION_ANS")
    )
    inputs = tiny_inputs("QUESTION_ANS", pad_left=0)
    start, end = torch.tensor([1, 3]), torch.tensor([4, 5])
    out = model(**inputs, start_positions=start, end_positions=end)
    shift = TOKENS if method == "prompt" else 0
    want = (
        F.cross_entropy(out.start_logits, start + shift)
        + F.cross_entropy(out.end_logits, end + shift)
    ) / 2
    assert_rel_close(out.loss, want)


@pytest.mark.parametrize("method", METHODS)
def test_manual_decoding_with_the_returned_cache_matches_a_full_pass(method):
    model = get_peft_model(
        tiny_model("llama", "CAUSAL_LM"), ours_config(method, "CAUSAL_LM")
    ).eval()
    ids = tiny_inputs("CAUSAL_LM", batch=1)["input_ids"]
    with torch.no_grad():
        first = model(input_ids=ids[:, :-1], attention_mask=torch.ones_like(ids[:, :-1]))
        step = model(input_ids=ids[:, -1:], attention_mask=torch.ones_like(ids), cache=first.cache)
        full = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert_rel_close(step.logits[:, -1], full.logits[:, -1])


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_inputs_embeds_and_position_ids_are_honoured(method):
    model = get_peft_model(tiny_model("gpt2", "CAUSAL_LM"), ours_config(method, "CAUSAL_LM")).eval()
    inputs = tiny_inputs("CAUSAL_LM", pad_left=0)
    embeds = model.base_model.get_input_embeddings()(inputs["input_ids"])
    positions = torch.arange(inputs["input_ids"].shape[1]).expand(2, -1)
    with torch.no_grad():
        plain = model(**inputs).logits
        by_embeds = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).logits
        by_position = model(**inputs, position_ids=positions).logits
        shifted = model(**inputs, position_ids=positions + 5).logits
    assert_rel_close(by_embeds, plain)
    assert_rel_close(by_position, plain)
    assert not torch.allclose(shifted, plain)  # GPT-2's learned positions do read them


@pytest.mark.parametrize("method", METHODS)
def test_disabled_adapter_runs_the_base_model_and_its_original_head(method):
    task = "SEQ_CLS"
    base = tiny_model("bert", task)
    reference = copy.deepcopy(base)
    model = get_peft_model(base, ours_config(method, task)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".modules_to_save." in name:
                param.add_(1.0)
        inputs = tiny_inputs(task)
        with model.disable_adapter():
            off = outputs_of(model(**inputs))
        on = outputs_of(model(**inputs))
    assert torch.equal(off, outputs_of(reference(**inputs)))
    assert not torch.allclose(on, off)


def _word_level_tokenizer(folder) -> str:
    """A local fast tokenizer where the word ``w<i>`` is token id i."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB)}
    vocab["[UNK]"] = 0
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(folder)
    return str(folder)


def test_text_init_copies_the_text_embeddings_repeated_to_length(tmp_path):
    base = tiny_model("llama", "CAUSAL_LM")
    config = PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=5,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text="w7 w9",
        tokenizer_name_or_path=_word_level_tokenizer(tmp_path),
        tokenizer_kwargs={"trust_remote_code": True},
    )
    table = get_peft_model(base, config).prompt_encoder["default"].output_table()
    words = base.get_input_embeddings().weight
    torch.testing.assert_close(table, words[[7, 9, 7, 9, 7]])
    assert config.tokenizer_kwargs == {"trust_remote_code": True}  # the caller's dict is intact


def test_sample_vocab_init_uses_vocabulary_rows():
    base = tiny_model("llama", "CAUSAL_LM")
    config = PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=6, prompt_tuning_init="SAMPLE_VOCAB"
    )
    table = get_peft_model(base, config).prompt_encoder["default"].output_table()
    words = base.get_input_embeddings().weight
    same = (table[:, None, :] == words[None, :, :]).all(dim=-1)  # (6, V)
    assert same.any(dim=1).all()


def test_zero_init_prefix_starts_as_all_zero_keys_and_values():
    for projection in (False, True):
        config = ours_config(
            "prefix_proj" if projection else "prefix", "CAUSAL_LM", init_weights="zero"
        )
        model = get_peft_model(tiny_model("bloom", "CAUSAL_LM"), config)
        assert torch.count_nonzero(model.prompt_encoder["default"].output_table()) == 0
