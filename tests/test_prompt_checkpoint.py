"""Saving and loading prompt adapters: PEFT's format, resumable encoders, clear refusals."""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import assert_rel_close
from peftkit import PeftModel, get_peft_model
from test_prompt_common import (
    one_thread,  # noqa: F401  (autouse fixture)
    ours_config,
    outputs_of,
    peft_config,
    perturb_heads,
    tiny_inputs,
    tiny_model,
)


def _tensors(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.mark.parametrize(
    ("method", "task", "keys"),
    [
        ("prompt", "CAUSAL_LM", {"prompt_embeddings"}),
        ("prefix", "CAUSAL_LM", {"prompt_embeddings"}),
        (
            "prompt",
            "SEQ_CLS",
            {"prompt_embeddings", "base_model.classifier.weight", "base_model.classifier.bias"},
        ),
        (
            "prefix",
            "QUESTION_ANS",
            {"prompt_embeddings", "base_model.qa_outputs.weight", "base_model.qa_outputs.bias"},
        ),
    ],
)
def test_saved_files_have_exactly_peft_keys(method, task, keys, tmp_path):
    ours = get_peft_model(
        tiny_model("bert" if task != "CAUSAL_LM" else "llama", task), ours_config(method, task)
    )
    ours.save_pretrained(tmp_path)
    assert set(_tensors(tmp_path)) == keys
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    peft_fields = set(type(peft_config(method, task)).__dataclass_fields__) | {"peft_type"}
    assert set(config) <= peft_fields
    assert config["inference_mode"] is True


@pytest.mark.parametrize("method", ["ptuning_mlp", "ptuning_lstm", "prefix_proj"])
def test_reparameterised_encoders_are_saved_and_training_resumes(method, tmp_path):
    task = "CAUSAL_LM"
    base = tiny_model("llama", task)
    extra = {"encoder_dropout": 0.2} if method == "ptuning_lstm" else {}
    ours = get_peft_model(copy.deepcopy(base), ours_config(method, task, **extra))
    ours.train()
    ours.save_pretrained(tmp_path)
    saved = _tensors(tmp_path)
    encoder = ours.prompt_encoder["default"]
    assert {k for k in saved if k != "prompt_embeddings"} == {
        "prompt_encoder." + k for k in encoder.state_dict()
    }
    # the table is the eval-mode output (no dropout), whatever mode the model was in
    torch.testing.assert_close(saved["prompt_embeddings"], encoder.output_table())

    resumed = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    again = resumed.prompt_encoder["default"]
    assert again.reparameterized
    for key, value in encoder.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value, rtol=0, atol=0)

    # one identical SGD step on both gives identical encoders
    inputs = {**tiny_inputs(task), "labels": tiny_inputs(task)["input_ids"]}

    # for inference the table alone is used, as in PEFT
    frozen = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert frozen.prompt_encoder["default"].direct
    with torch.no_grad():
        assert_rel_close(frozen(**inputs).logits, ours.eval()(**inputs).logits)
    for model in (ours, resumed):
        model.train()
        torch.manual_seed(3)  # same dropout masks
        model(**inputs).loss.backward()
        with torch.no_grad():
            for param in model.prompt_encoder["default"].parameters():
                param -= 0.1 * param.grad
    for key, value in encoder.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value)


@pytest.mark.parametrize("method", ["ptuning_lstm", "prefix_proj"])
def test_peft_file_without_encoder_resumes_on_the_table(method, tmp_path):
    task = "SEQ_CLS"
    base = tiny_model("bert", task)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(method, task))
    theirs.save_pretrained(tmp_path)
    assert set(_tensors(tmp_path)) == {
        "prompt_embeddings",
        "base_model.classifier.weight",
        "base_model.classifier.bias",
    }
    with pytest.warns(UserWarning, match="training continues on the embeddings"):
        ours = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    encoder = ours.prompt_encoder["default"]
    assert encoder.direct and not encoder.reparameterized
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {
        "prompt_encoder.default.embedding.weight",
        "base_model.classifier.modules_to_save.default.weight",
        "base_model.classifier.modules_to_save.default.bias",
    }
    torch.testing.assert_close(encoder.output_table(), _tensors(tmp_path)["prompt_embeddings"])


def test_edited_table_that_disagrees_with_the_encoder_is_reported(tmp_path):
    ours = get_peft_model(tiny_model("llama", "CAUSAL_LM"), ours_config("ptuning_mlp", "CAUSAL_LM"))
    ours.save_pretrained(tmp_path)
    tensors = _tensors(tmp_path)
    tensors["prompt_embeddings"] = tensors["prompt_embeddings"] + 1.0
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    with pytest.warns(UserWarning, match="does not reproduce"):
        PeftModel.from_pretrained(tiny_model("llama", "CAUSAL_LM"), tmp_path, is_trainable=True)


def test_adapter_for_another_model_width_is_refused(tmp_path):
    get_peft_model(
        tiny_model("llama", "CAUSAL_LM"), ours_config("prompt", "CAUSAL_LM")
    ).save_pretrained(tmp_path)
    import transformers as tf

    wider = tf.LlamaForCausalLM(
        tf.LlamaConfig(
            vocab_size=96,
            hidden_size=64,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
        )
    )
    with pytest.raises(ValueError, match="token_dim=32 does not fit this model"):
        PeftModel.from_pretrained(wider, tmp_path)


def test_unexpected_and_missing_tensors_are_refused(tmp_path):
    model = get_peft_model(tiny_model("bert", "SEQ_CLS"), ours_config("prompt", "SEQ_CLS"))
    model.save_pretrained(tmp_path)
    tensors = _tensors(tmp_path)
    save_file(
        {**tensors, "base_model.bert.pooler.dense.weight": torch.zeros(2)},
        str(tmp_path / "adapter_model.safetensors"),
    )
    with pytest.raises(ValueError, match="unexpected keys: base_model.bert.pooler"):
        PeftModel.from_pretrained(tiny_model("bert", "SEQ_CLS"), tmp_path)
    del tensors["base_model.classifier.weight"]
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="missing keys: base_model.classifier.weight"):
        PeftModel.from_pretrained(tiny_model("bert", "SEQ_CLS"), tmp_path)


def test_two_named_adapters_save_load_switch_and_delete(tmp_path):
    task = "SEQ_CLS"
    inputs = tiny_inputs(task)
    model = get_peft_model(tiny_model("roberta", task), ours_config("prompt", task))
    model.add_adapter("other", ours_config("prompt", task))
    perturb_heads(model)
    model.eval()
    with torch.no_grad():
        first = outputs_of(model(**inputs))
        model.set_adapter("other")
        second = outputs_of(model(**inputs))
    assert not torch.allclose(first, second)
    trainable = {
        n.split(".")[1]
        for n, p in model.named_parameters()
        if p.requires_grad and n.startswith("prompt_encoder.")
    }
    assert trainable == {"other"}
    model.save_pretrained(tmp_path)
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()

    loaded = PeftModel.from_pretrained(tiny_model("roberta", task), tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded.load_adapter(tmp_path / "other", "other")
    with torch.no_grad():
        assert_rel_close(outputs_of(loaded(**inputs)), first)
        loaded.set_adapter("other")
        assert_rel_close(outputs_of(loaded(**inputs)), second)
    loaded.delete_adapter("other")
    assert "other" not in loaded.prompt_encoder
    assert all(".other." not in n for n, _ in loaded.named_parameters())


def test_text_init_adapter_loads_without_its_tokenizer(tmp_path):
    config = ours_config("prompt", "CAUSAL_LM")
    model = get_peft_model(tiny_model("gpt2", "CAUSAL_LM"), config)
    model.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    data.update(
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text="hi",
        tokenizer_name_or_path=str(tmp_path / "no-such-tokenizer"),
    )
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    loaded = PeftModel.from_pretrained(tiny_model("gpt2", "CAUSAL_LM"), tmp_path)
    torch.testing.assert_close(
        loaded.prompt_encoder["default"].output_table(),
        model.prompt_encoder["default"].output_table(),
    )
