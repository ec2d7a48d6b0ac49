"""Method/task/model combinations that cannot work are refused at get_peft_model, with a reason."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from peftkit import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model
from test_prompt_common import (
    METHODS,
    one_thread,  # noqa: F401  (autouse fixture)
    ours_config,
    tiny_inputs,
    tiny_model,
)


def _vit():
    config = tf.ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        num_labels=5,
    )
    return tf.ViTForImageClassification(config)


def _gpt_neox():
    config = tf.GPTNeoXConfig(
        vocab_size=96,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
    )
    return tf.GPTNeoXForCausalLM(config)


@pytest.mark.parametrize("method", ["prompt", "ptuning_mlp"])
def test_embedding_methods_need_token_embeddings(method):
    with pytest.raises(ValueError, match="no token embedding layer"):
        get_peft_model(_vit(), ours_config(method, "SEQ_CLS"))


@pytest.mark.parametrize("model", [_gpt_neox, _vit], ids=["gpt_neox", "vit"])
def test_prefix_tuning_needs_a_known_cache_layout(model):
    task = "CAUSAL_LM" if model is _gpt_neox else "SEQ_CLS"
    with pytest.raises(ValueError, match="does not know the cache layout of '(gpt_neox|vit)'"):
        get_peft_model(model(), ours_config("prefix", task))


def test_prefix_tuning_needs_a_model_that_takes_a_cache():
    config = tf.T5Config(
        vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, num_labels=3
    )
    model = tf.T5ForTokenClassification(config)
    with pytest.raises(ValueError, match="forward takes a key/value cache"):
        get_peft_model(model, ours_config("prefix", "TOKEN_CLS"))


@pytest.mark.parametrize("method", METHODS)
def test_encoder_decoder_classification_heads_are_refused(method):
    with pytest.raises(ValueError, match="pools on the end-of-sequence token"):
        get_peft_model(tiny_model("bart", "SEQ_CLS"), ours_config(method, "SEQ_CLS"))


def test_task_type_must_fit_the_model():
    with pytest.raises(ValueError, match="needs an encoder-decoder model"):
        get_peft_model(tiny_model("llama", "CAUSAL_LM"), ours_config("prompt", "SEQ_2_SEQ_LM"))
    with pytest.raises(ValueError, match="use task_type=SEQ_2_SEQ_LM"):
        get_peft_model(tiny_model("t5", "SEQ_2_SEQ_LM"), ours_config("prompt", "CAUSAL_LM"))
    with pytest.raises(ValueError, match="needs task_type"):
        get_peft_model(tiny_model("llama", "CAUSAL_LM"), PromptTuningConfig(num_virtual_tokens=3))


def test_shape_fields_that_do_not_fit_the_model_are_refused():
    with pytest.raises(ValueError, match="token_dim=64 does not fit this model.*must be 32"):
        get_peft_model(
            tiny_model("gpt2", "CAUSAL_LM"),
            PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, token_dim=64),
        )
    with pytest.raises(ValueError, match="num_attention_heads=4 does not fit.*must be 2"):
        get_peft_model(
            tiny_model("llama", "CAUSAL_LM"),
            PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, num_attention_heads=4),
        )


def test_prefix_tuning_refuses_gradient_checkpointing():
    model = tiny_model("llama", "CAUSAL_LM")
    model.activation_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        get_peft_model(model, ours_config("prefix", "CAUSAL_LM"))
    peft_model = get_peft_model(
        tiny_model("llama", "CAUSAL_LM"), ours_config("prefix", "CAUSAL_LM")
    )
    peft_model.base_model.activation_checkpointing_enable()
    peft_model.train()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        peft_model(**tiny_inputs("CAUSAL_LM"))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: PromptTuningConfig(task_type="CAUSAL_LM"), "needs num_virtual_tokens"),
        (
            lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=0),
            "positive integer",
        ),
        (
            lambda: PromptTuningConfig(
                task_type="CAUSAL_LM",
                num_virtual_tokens=2,
                prompt_tuning_init="TEXT",
                prompt_tuning_init_text="x",
            ),
            "needs tokenizer_name_or_path",
        ),
        (
            lambda: PromptTuningConfig(
                task_type="CAUSAL_LM", num_virtual_tokens=2, prompt_tuning_init="WORDS"
            ),
            "unknown prompt_tuning_init",
        ),
        (
            lambda: PromptTuningConfig(
                task_type="CAUSAL_LM", num_virtual_tokens=2, tokenizer_kwargs={"a": 1}
            ),
            "only apply to",
        ),
        (
            lambda: PromptEncoderConfig(
                task_type="CAUSAL_LM", num_virtual_tokens=2, encoder_reparameterization_type="GRU"
            ),
            "'MLP'.*or 'LSTM'",
        ),
        (
            lambda: PrefixTuningConfig(
                task_type="CAUSAL_LM", num_virtual_tokens=2, init_weights="ones"
            ),
            "None or 'zero'",
        ),
    ],
)
def test_bad_configs_are_refused_with_the_fix(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_text_init_with_a_missing_tokenizer_names_the_fix(tmp_path):
    config = PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=2,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text="hello",
        tokenizer_name_or_path=str(tmp_path / "missing"),
    )
    with pytest.raises(ValueError, match="could not load the tokenizer"):
        get_peft_model(tiny_model("gpt2", "CAUSAL_LM"), config)


def test_prompt_methods_have_nothing_to_merge():
    model = get_peft_model(tiny_model("gpt2", "CAUSAL_LM"), ours_config("prompt", "CAUSAL_LM"))
    with pytest.raises(ValueError, match="no weights to merge"):
        model.merge_and_unload()


def test_4d_masks_and_caller_caches_are_refused_clearly():
    model = get_peft_model(tiny_model("gpt2", "CAUSAL_LM"), ours_config("prefix", "CAUSAL_LM"))
    ids = torch.ones(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="must be a 2-D"):
        model(input_ids=ids, attention_mask=torch.ones(1, 1, 3, 3))
    with pytest.raises(ValueError, match="do not pass one"):
        model.generate(input_ids=ids, cache=object())
    with pytest.raises(ValueError, match="drop use_cache=False"):
        model.generate(input_ids=ids, use_cache=False)


@pytest.mark.parametrize("method", ["prompt", "ptuning_mlp"])
def test_right_padding_under_a_last_token_classifier_is_refused(method):
    model = get_peft_model(tiny_model("llama", "SEQ_CLS"), ours_config(method, "SEQ_CLS"))
    inputs = tiny_inputs("SEQ_CLS", pad_left=0)
    inputs["attention_mask"][1, -2:] = 0
    with pytest.raises(ValueError, match="pad on the left"):
        model(**inputs)
    inputs["attention_mask"] = inputs["attention_mask"].flip(1)  # left padding works
    assert model(**inputs).logits.shape == (2, 3)
