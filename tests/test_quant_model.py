"""Whole-model QLoRA: quantize_model, prepare_model_for_kbit_training, LoRA on Linear4bit, merge
(exact and re-quantised), merged export, and adapters that HF PEFT loads onto bitsandbytes bases."""

from __future__ import annotations

import json
import warnings
from types import SimpleNamespace

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file
from torch import nn

from conftest import require
from peftkit import LoraConfig, PeftModel, TaskType, get_peft_model
from peftkit.quant import (
    Linear4bit,
    dequantize_model,
    is_quantized,
    prepare_model_for_kbit_training,
    quantize_model,
    quantized_param_count,
    save_merged,
)

VOCAB = 128
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _llama(tie=False, intermediate=128, seed=0) -> tf.LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
    )
    return tf.LlamaForCausalLM(cfg).eval()


def _ids(batch=2, length=12, seed=1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _lora(model, **kw):
    cfg = dict(task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=16, target_modules="all-linear")
    cfg.update(kw)
    return get_peft_model(model, LoraConfig(**cfg))


def _train(pm, steps=8, lr=1e-2) -> list[float]:
    ids = _ids(4, 16, seed=3)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr)
    pm.train()
    losses = []
    for _ in range(steps):
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    pm.eval()
    return losses


@pytest.mark.parametrize("tie", [False, True])
def test_quantize_model_replaces_linears_but_not_the_head(tie):
    model = _llama(tie=tie)
    ids = _ids()
    ref = _logits(model, ids)
    n_params = sum(p.numel() for p in model.parameters())
    assert quantize_model(model) is model
    quantized = [n for n, m in model.named_modules() if isinstance(m, Linear4bit)]
    assert len(quantized) == 2 * len(LINEAR_NAMES)
    assert {n.rsplit(".", 1)[-1] for n in quantized} == set(LINEAR_NAMES)
    assert type(model.lm_head) is nn.Linear
    assert is_quantized(model)
    # 4-bit weights are buffers; quantized_param_count restores the parameter total
    assert sum(p.numel() for p in model.parameters()) + quantized_param_count(model) == n_params
    quant_logits = _logits(model, ids)
    assert 0 < _rel_err(quant_logits, ref) < 0.25  # 4-bit rounding of random weights
    # the quantised model computes exactly what its dequantised weights compute
    torch.testing.assert_close(_logits(dequantize_model(model), ids), quant_logits, rtol=0, atol=0)


def test_skip_modules_and_blocksize_check():
    model = _llama()
    quantize_model(model, skip_modules=["o_proj", "model.layers.1"])
    assert type(model.model.layers[0].self_attn.o_proj) is nn.Linear
    assert isinstance(model.model.layers[0].self_attn.q_proj, Linear4bit)
    assert not any(isinstance(m, Linear4bit) for m in model.model.layers[1].modules())

    model = _llama()
    with pytest.raises(TypeError, match="compute_dtype=torch.float64"):
        quantize_model(model, compute_dtype=torch.float64)
    with pytest.raises(ValueError, match="'nf4' or 'fp4'"):
        quantize_model(model, quant_type="int4")
    model.model.layers[1].mlp.up_proj.to(torch.float64)
    with pytest.raises(TypeError, match="layers.1.mlp.up_proj.*float64"):
        quantize_model(model)
    assert not is_quantized(model)  # no error above left a half-quantised model

    model = _llama(intermediate=96)  # down_proj has in_features=96
    with pytest.raises(ValueError, match=r"down_proj.*in_features=96.*blocksize=64.*blocksize=32"):
        quantize_model(model)
    assert not is_quantized(model)  # nothing was replaced
    quantize_model(model, blocksize=32)
    assert model.model.layers[0].mlp.down_proj.blocksize == 32


def test_refuses_already_quantized_models():
    model = quantize_model(_llama())
    with pytest.raises(ValueError, match="already quantised.*peftkit"):
        quantize_model(model)
    bnb = require("bitsandbytes")
    other = _llama()
    other.model.layers[0].mlp.up_proj = bnb.nn.Linear4bit(64, 128)
    with pytest.raises(ValueError, match="bitsandbytes Linear4bit"):
        quantize_model(other)
    with pytest.raises(ValueError, match="no nn.Linear"):
        quantize_model(nn.Sequential(nn.ReLU()))
    awq = _llama()
    awq.hf_quantizer = SimpleNamespace(quantization_config=SimpleNamespace(quant_method="awq"))
    with pytest.raises(ValueError, match="awq quantization_config"):
        quantize_model(awq)


def test_gguf_loaded_models_are_float_and_quantizable():
    """transformers de-quantises GGUF weights but leaves a GGUF quantizer object behind."""
    model = _llama()
    model.hf_quantizer = SimpleNamespace(quantization_config=SimpleNamespace(quant_method="gguf"))
    assert is_quantized(quantize_model(model))


def test_prepare_model_for_kbit_training():
    model = quantize_model(_llama().to(torch.bfloat16), compute_dtype=torch.bfloat16)
    prepare_model_for_kbit_training(model)
    assert not any(p.requires_grad for p in model.parameters())
    assert model.model.norm.weight.dtype == torch.float32
    assert model.model.layers[0].input_layernorm.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    emb_out = model.get_input_embeddings()(_ids())
    assert emb_out.requires_grad
    with pytest.raises(ValueError, match="gradient checkpointing"):
        prepare_model_for_kbit_training(nn.Sequential(nn.Linear(64, 64)))


def test_qlora_training_lowers_loss_and_touches_only_adapters():
    model = prepare_model_for_kbit_training(quantize_model(_llama()))
    storage = {n: b.clone() for n, b in model.named_buffers() if "absmax" in n or "packed" in n}
    pm = _lora(model)
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    losses = _train(pm, steps=10)
    assert losses[-1] < losses[0] - 0.3
    for name, buf in pm.base_model.model.named_buffers():
        key = name.replace(".base_layer", "")
        if key in storage:
            assert torch.equal(buf, storage[key]), name


def test_exact_merge_after_dequantize_model():
    pm = _lora(quantize_model(_llama()), init_lora_weights=False)
    ids = _ids()
    unmerged = _logits(pm, ids)
    dequantize_model(pm)
    assert not is_quantized(pm)
    assert type(pm.base_model.model.model.layers[0].self_attn.q_proj.base_layer) is nn.Linear
    torch.testing.assert_close(_logits(pm, ids), unmerged, rtol=0, atol=0)
    merged = pm.merge_and_unload()
    assert _rel_err(_logits(merged, ids), unmerged) <= 1e-5


def test_merge_into_4bit_requantizes_with_warning():
    pm = _lora(quantize_model(_llama()), init_lora_weights=False)
    with torch.no_grad():  # an adapter delta of realistic size (~1% of the weights)
        for name, param in pm.named_parameters():
            if "lora_B" in name:
                param.mul_(0.01)
    ids = _ids()
    unmerged = _logits(pm, ids)
    with pytest.warns(UserWarning, match="re-quantizes"):
        merged = pm.merge_and_unload()
    assert isinstance(merged.model.layers[0].self_attn.q_proj, Linear4bit)
    err = _rel_err(_logits(merged, ids), unmerged)
    assert 0 < err < 0.25  # outputs change (the merged weight was rounded to 4 bits again)


def test_save_merged_exports_loadable_half_precision(tmp_path):
    pm = _lora(quantize_model(_llama(tie=True)), init_lora_weights=False)
    ids = _ids()
    expected = _logits(pm, ids)
    merged = save_merged(pm, tmp_path, dtype=torch.bfloat16)
    assert not is_quantized(merged)
    tensors = load_file(tmp_path / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert not any("lora_" in k or "absmax" in k for k in tensors)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in config and config["torch_dtype"] == "bfloat16"
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.dtype == torch.bfloat16
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    assert _rel_err(_logits(reloaded, ids).float(), expected) < 0.05
    with pytest.raises(TypeError, match="dtype"):
        save_merged(_llama(), tmp_path / "x", dtype=torch.int8)


def test_adapter_loads_in_hf_peft_on_full_precision_and_bnb_bases(tmp_path):
    import peft

    require("bitsandbytes")
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    _llama().save_pretrained(base_dir)  # the full-precision base a user starts from

    ours = tf.AutoModelForCausalLM.from_pretrained(base_dir).eval()
    pm = _lora(prepare_model_for_kbit_training(quantize_model(ours), False))
    _train(pm, steps=3)
    pm.save_pretrained(adapter_dir)
    ids = _ids()
    expected = _logits(pm, ids)

    bnb_cfg = tf.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    bnb_base = tf.AutoModelForCausalLM.from_pretrained(
        base_dir, quantization_config=bnb_cfg, device_map="cpu"
    )
    for module in bnb_base.modules():  # keep bnb on its exact CPU path (not the bf16 kernel)
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    hf = peft.PeftModel.from_pretrained(bnb_base, adapter_dir).eval()
    assert _rel_err(_logits(hf, ids), expected) <= 1e-5

    full = dequantize_model(quantize_model(tf.AutoModelForCausalLM.from_pretrained(base_dir)))
    hf_full = peft.PeftModel.from_pretrained(full.eval(), adapter_dir).eval()
    assert _rel_err(_logits(hf_full, ids), expected) <= 1e-5

    # and peftkit reloads its own adapter onto a freshly quantised base
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = quantize_model(tf.AutoModelForCausalLM.from_pretrained(base_dir).eval())
    reloaded = PeftModel.from_pretrained(again, adapter_dir)
    torch.testing.assert_close(_logits(reloaded, ids), expected, rtol=0, atol=0)


def test_gpt2_conv1d_layers_round_trip(tmp_path):
    """GPT-2's Conv1D layers (weight stored (in, out)) quantise, and de-quantise back to Conv1D,
    so the merged export keeps GPT-2's checkpoint layout."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=32)
    model = tf.GPT2LMHeadModel(cfg).eval()
    ids = _ids()
    ref = _logits(model, ids)
    quantize_model(model)
    assert isinstance(model.transformer.h[0].attn.c_attn, Linear4bit)
    quant = _logits(model, ids)
    assert 0 < _rel_err(quant, ref) < 0.25
    save_merged(model, tmp_path, dtype=torch.float32)
    assert type(model.transformer.h[0].attn.c_attn) is Conv1D
    dequantized = _logits(model, ids)
    assert _rel_err(dequantized, quant) <= 1e-5  # Conv1D's addmm rounds differently from linear
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(reloaded, ids), dequantized, rtol=0, atol=0)


def test_parameter_count_of_lora_on_a_4bit_model_equals_the_float_models():
    """print_trainable_parameters on QLoRA counts each 4-bit weight once: a LoRA layer forwards
    unknown attributes to its base layer, so asking it for ``quantized_param_count`` would count
    the wrapped 4-bit weight twice (it did: +1/8 of the targeted weights on SmolLM2)."""
    from peftkit import LoraConfig, get_peft_model

    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    plain = get_peft_model(_llama(), config)
    qlora = get_peft_model(
        quantize_model(_llama()), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    assert qlora.get_nb_trainable_parameters() == plain.get_nb_trainable_parameters()
