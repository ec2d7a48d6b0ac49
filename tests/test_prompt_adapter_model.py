"""The adapter-model interface PeftModel delegates to, and the method tables it is looked up in."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

from peftkit import LoraConfig, get_peft_model
from peftkit.adapter_model import AdapterModel
from peftkit.config import PeftType, config_class
from peftkit.methods import table
from peftkit.methods.prompt import PromptAdapterModel
from peftkit.tuner import InjectedAdapterModel
from test_prompt_common import (
    METHODS,
    one_thread,  # noqa: F401  (autouse fixture)
    ours_config,
    peft_config,
    tiny_inputs,
    tiny_model,
)

MEMBERS = sorted(
    name
    for name, value in vars(AdapterModel).items()
    if callable(value) and (not name.startswith("_") or name == "__call__")
)


def test_every_method_has_one_config_and_one_adapter_model():
    configs = {row.config.peft_type: row.config for row in table.METHODS.values()}
    assert set(configs) == set(PeftType) == set(table.ADAPTER_MODELS)
    for peft_type, cls in configs.items():
        assert cls.peft_type == peft_type
        assert config_class(peft_type.value) is cls


@pytest.mark.parametrize("cls", [InjectedAdapterModel, PromptAdapterModel])
def test_both_families_implement_the_whole_interface(cls):
    assert "peft_modules" in MEMBERS and "load_adapter_state_dict" in MEMBERS
    missing = [name for name in MEMBERS if not callable(getattr(cls, name, None))]
    assert not missing, f"{cls.__name__} lacks {missing}"


@pytest.mark.parametrize("method", METHODS)
def test_prompt_model_keeps_peft_in_memory_names(method):
    """``base_model.<path>`` and ``prompt_encoder.<name>``: resume checkpoints store these names."""
    task = "SEQ_CLS"
    base = tiny_model("bert", task)
    ours = get_peft_model(copy.deepcopy(base), ours_config(method, task))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(method, task))
    # PEFT registers the base model's word embeddings a second time, at the top; peftkit does not
    assert set(ours.state_dict()) == set(theirs.state_dict()) - {"word_embeddings.weight"}
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in theirs.named_parameters() if p.requires_grad}
    assert ours.base_model is ours.get_base_model()  # the transformers model, as in PEFT
    assert isinstance(ours.adapter_model, PromptAdapterModel)


def test_lora_model_keeps_peft_in_memory_names():
    base = tiny_model("llama", "CAUSAL_LM")
    kwargs = {"task_type": "CAUSAL_LM", "r": 2, "target_modules": ["q_proj", "v_proj"]}
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(**kwargs))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    assert set(ours.state_dict()) == set(theirs.state_dict())
    assert ours.adapter_model is ours.base_model


def test_prompt_model_refuses_per_row_adapters_and_merging():
    model = get_peft_model(tiny_model("llama", "CAUSAL_LM"), ours_config("prompt", "CAUSAL_LM"))
    inputs = tiny_inputs("CAUSAL_LM")
    with pytest.raises(ValueError, match="applies to LoRA-style adapters"):
        model(**inputs, adapter_names=["default", "default"])
    with pytest.raises(ValueError, match="applies to LoRA-style adapters"):
        model.generate(**inputs, adapter_names=["default", "default"], max_new_tokens=1)
    for call in (model.merge_adapter, model.unmerge_adapter, model.unload):
        with pytest.raises(ValueError, match="no weights to merge"):
            call()


def test_disabled_prompt_model_runs_the_plain_base_model():
    task = "SEQ_CLS"
    base = tiny_model("bert", task).eval()
    inputs = tiny_inputs(task)
    with torch.no_grad():
        plain = base(**inputs).logits
    model = get_peft_model(copy.deepcopy(base), ours_config("prompt", task)).eval()
    with torch.no_grad():
        for copy_ in model.base_model.classifier.modules_to_save.values():
            copy_.weight.add_(1.0)  # a trained head copy must not run while disabled
        with model.disable_adapter():
            torch.testing.assert_close(model(**inputs).logits, plain)
        assert not torch.allclose(model(**inputs).logits, plain)
