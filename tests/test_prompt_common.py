"""Shared builders for the prompt-learning tests, and the config / parameter-count tests.

Tiny randomly initialised models (hidden 32, 2 layers, vocab 96) of every architecture the
prompt methods support, for every task head it has, plus matching peftkit / HF PEFT configs.
"""

from __future__ import annotations

import copy
import inspect
from types import SimpleNamespace

import peft
import pytest
import torch
import transformers as tf

import tiny_models
from peftkit import (
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    TaskType,
    get_peft_model,
)
from tiny_models import VOCAB

TOKENS = 4  # virtual tokens in the parity tests

CAUSAL = ("bloom", "gpt2", "llama", "qwen2", "opt")
SEQ2SEQ = ("t5", "bart")
ENCODERS = ("bert", "roberta")

# task -> architectures with that head (all of them, as transformers ships them)
TASK_ARCHS: dict[str, tuple[str, ...]] = {
    "CAUSAL_LM": CAUSAL,
    "SEQ_2_SEQ_LM": SEQ2SEQ,
    "SEQ_CLS": ENCODERS + CAUSAL,
    "TOKEN_CLS": ENCODERS + ("bloom", "gpt2", "llama", "qwen2", "t5"),
    "QUESTION_ANS": ENCODERS + CAUSAL,
    "FEATURE_EXTRACTION": ("bert", "llama"),
}
# combinations refused at get_peft_model (see test_prompt_errors): T5's token-classification model
# is its encoder alone, which takes no key/value cache.
REFUSED = {("t5", "TOKEN_CLS", "prefix"), ("t5", "TOKEN_CLS", "prefix_proj")}

METHODS = ("prompt", "ptuning_mlp", "ptuning_lstm", "prefix", "prefix_proj")

# special token ids of the prompt tests' tiny models; per-architecture extras beside them
_SPECIAL_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
_EXTRA = {"bart": {"decoder_start_token_id": 2}, "roberta": {"max_position_embeddings": 80}}


def tiny_model(arch: str, task: str, seed: int = 0) -> torch.nn.Module:
    """A seeded tiny model (tests/tiny_models.py) with the head of ``task`` (3 labels; 2 outputs
    for QA), eval mode."""
    return tiny_models.tiny_model(
        arch,
        task,
        seed=seed,
        num_labels=2 if task == "QUESTION_ANS" else 3,
        **_SPECIAL_IDS,
        **_EXTRA.get(arch, {}),
    )


def tiny_inputs(task: str, batch: int = 2, length: int = 7, pad_left: int = 2) -> dict:
    """input_ids avoiding the special ids 0-2, a left-padded second row, task labels."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    if batch > 1 and pad_left:
        mask[1, :pad_left] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if task == "SEQ_2_SEQ_LM":
        out["decoder_input_ids"] = ids[:, :5]
    return out


def task_labels(task: str, inputs: dict) -> dict:
    ids = inputs["input_ids"]
    if task in ("CAUSAL_LM", "SEQ_2_SEQ_LM"):
        return {"labels": ids.clone() if task == "CAUSAL_LM" else ids[:, 1:6].clone()}
    if task == "SEQ_CLS":
        return {"labels": torch.tensor([0, 2])[: ids.shape[0]]}
    if task == "TOKEN_CLS":
        return {"labels": (ids % 3)}
    return {
        "start_positions": torch.tensor([1, 3])[: ids.shape[0]],
        "end_positions": torch.tensor([4, 5])[: ids.shape[0]],
    }


def method_kwargs(method: str, task: str, tokens: int = TOKENS) -> tuple[str, dict]:
    """(config class name, kwargs) understood by both peftkit and peft."""
    kwargs = dict(task_type=task, num_virtual_tokens=tokens)
    if method == "prompt":
        return "PromptTuningConfig", kwargs
    if method.startswith("ptuning"):
        kind = "LSTM" if method.endswith("lstm") else "MLP"
        return "PromptEncoderConfig", dict(
            kwargs, encoder_hidden_size=16, encoder_reparameterization_type=kind
        )
    if method == "prefix":
        return "PrefixTuningConfig", kwargs
    return "PrefixTuningConfig", dict(kwargs, prefix_projection=True, encoder_hidden_size=16)


def ours_config(method: str, task: str, **extra):
    name, kwargs = method_kwargs(method, task)
    cls = {
        "PromptTuningConfig": PromptTuningConfig,
        "PromptEncoderConfig": PromptEncoderConfig,
        "PrefixTuningConfig": PrefixTuningConfig,
    }[name]
    return cls(**kwargs, **extra)


def peft_config(method: str, task: str, **extra):
    name, kwargs = method_kwargs(method, task)
    return getattr(peft, name)(**kwargs, **extra)


def outputs_of(output) -> torch.Tensor:
    """The tensor to compare: logits, or start and end logits side by side for QA."""
    if getattr(output, "start_logits", None) is not None:
        return torch.cat((output.start_logits, output.end_logits), dim=-1)
    if getattr(output, "logits", None) is None:
        return output.last_hidden_state  # feature extraction
    return output.logits


def perturb_heads(model: torch.nn.Module) -> None:
    """Make trained head copies differ from the originals, so a lost copy shows in the logits."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".modules_to_save." in name:
                param.add_(torch.randn_like(param) * 0.5)


def peft_reference_forward(theirs, task: str, method: str, inputs: dict):
    """HF PEFT's forward, except prefix tuning under a classification head.

    peft 0.21.2 looks for a ``past_key_values`` argument that transformers 5.24 renamed to
    ``cache``, and refuses prefix tuning for every classification head. For those cases the
    reference does what PEFT's ``_prefix_tuning_forward`` does, under the new name: PEFT's own
    prefix (``get_prompt``, its layout), the mask extended by ones, passed to the task model when
    it takes a cache, else to its backbone followed by the head.
    """
    if not (method.startswith("prefix") and task in ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")):
        return theirs(**inputs)
    model = theirs.base_model
    batch = inputs["input_ids"].shape[0]
    mask = inputs["attention_mask"]
    mask = torch.cat((torch.ones(batch, TOKENS, dtype=mask.dtype), mask), 1)
    rest = {k: v for k, v in inputs.items() if k != "attention_mask"}
    if "cache" in inspect.signature(model.forward).parameters:
        return model(**rest, attention_mask=mask, cache=theirs.get_prompt(batch))
    labels = rest.pop("labels", None)
    hidden = model.base_model(**rest, attention_mask=mask, cache=theirs.get_prompt(batch))
    if task == "QUESTION_ANS":
        start, end = model.qa_outputs(hidden.last_hidden_state).split(1, dim=-1)
        return SimpleNamespace(start_logits=start.squeeze(-1), end_logits=end.squeeze(-1))
    if task == "SEQ_CLS" and model.config.model_type == "bert":
        logits = model.classifier(hidden.pooler_output)
    else:
        logits = model.classifier(hidden.last_hidden_state)
    loss = None
    if labels is not None:
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, -2), labels.flatten())
    return SimpleNamespace(logits=logits, loss=loss)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread: extra threads only contend on a shared machine.

    Import it into a test module to apply it there (it restores the thread count afterwards).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- tests ---------------------------------------------------------------------------------
def _bloomz_560m():
    config = tf.BloomConfig(hidden_size=1024, n_layer=24, n_head=16, vocab_size=250880)
    with torch.device("meta"):
        return tf.BloomForCausalLM(config)


@pytest.mark.parametrize(
    ("config", "trainable", "total"),
    [
        (PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8), 8_192, 559_222_784),
        (PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20), 983_040, 560_197_632),
        (
            PromptEncoderConfig(
                task_type="CAUSAL_LM", num_virtual_tokens=20, encoder_hidden_size=128
            ),
            300_288,
            559_514_880,
        ),
        (
            PromptEncoderConfig(
                task_type="CAUSAL_LM",
                num_virtual_tokens=20,
                encoder_hidden_size=128,
                encoder_reparameterization_type="LSTM",
            ),
            1_926_400,
            561_140_992,
        ),
    ],
    ids=["prompt8", "prefix20", "ptuning_mlp20", "ptuning_lstm20"],
)
def test_bloomz_560m_parameter_counts(config, trainable, total, capsys):
    model = get_peft_model(_bloomz_560m(), config)
    assert model.get_nb_trainable_parameters() == (trainable, total)
    model.print_trainable_parameters()
    assert f"trainable params: {trainable:,d} || all params: {total:,d}" in capsys.readouterr().out


def test_bloomz_lstm_encoder_is_exactly_the_documented_stack():
    config = PromptEncoderConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=20,
        encoder_hidden_size=128,
        encoder_reparameterization_type="LSTM",
    )
    encoder = get_peft_model(_bloomz_560m(), config).prompt_encoder["default"]
    assert repr(encoder.embedding) == "Embedding(20, 1024)"
    lstm = encoder.lstm_head
    assert (lstm.input_size, lstm.hidden_size, lstm.num_layers, lstm.bidirectional) == (
        1024,
        128,
        2,
        True,
    )
    assert [repr(m) for m in encoder.mlp_head] == [
        "Linear(in_features=256, out_features=256, bias=True)",
        "ReLU()",
        "Linear(in_features=256, out_features=1024, bias=True)",
    ]


@pytest.mark.parametrize("method", METHODS)
def test_trainable_counts_and_filled_config_match_peft(method):
    for arch, task in (("llama", "CAUSAL_LM"), ("t5", "SEQ_2_SEQ_LM"), ("bert", "SEQ_CLS")):
        base = tiny_model(arch, task)
        ours = get_peft_model(copy.deepcopy(base), ours_config(method, task))
        theirs = peft.get_peft_model(base, peft_config(method, task))
        assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
        a, b = ours.peft_config["default"], theirs.peft_config["default"]
        for field in (
            "token_dim",
            "num_layers",
            "num_attention_heads",
            "num_transformer_submodules",
        ):
            assert getattr(a, field) == getattr(b, field), (arch, field)


def test_grouped_query_attention_prefix_uses_key_value_heads():
    model = get_peft_model(
        tiny_model("qwen2", "CAUSAL_LM"),
        PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    )
    config = model.peft_config["default"]
    assert (config.num_attention_heads, config.token_dim) == (2, 16)  # 2 KV heads x head_dim 8
    assert model.prompt_encoder["default"].embedding.weight.shape == (3, 2 * 2 * 16)


def test_config_round_trips_through_json_with_peft_keys(tmp_path):
    config = PromptEncoderConfig(
        task_type="SEQ_CLS",
        num_virtual_tokens=5,
        encoder_reparameterization_type="LSTM",
        encoder_hidden_size=7,
    )
    config.save_pretrained(tmp_path)
    theirs = peft.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(theirs, peft.PromptEncoderConfig)
    assert theirs.encoder_reparameterization_type == "LSTM"
    assert (theirs.num_virtual_tokens, theirs.encoder_hidden_size) == (5, 7)
    again = PromptEncoderConfig.from_pretrained(tmp_path)
    assert again == config
    assert again.task_type == TaskType.SEQ_CLS
