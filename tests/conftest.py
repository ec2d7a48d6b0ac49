"""Shared fixtures: tiny randomly initialised transformers models built from configs (no downloads)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*kernels.*")

VOCAB = 96


def _tiny(name: str):
    """A tiny model of one architecture plus the kwargs one forward needs."""
    import transformers as tf

    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # some padding
    text = {"input_ids": ids, "attention_mask": mask}
    if name == "bloom":
        cfg = tf.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4)
        return tf.BloomForCausalLM(cfg), text
    if name == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
        return tf.GPT2LMHeadModel(cfg), text
    if name == "llama":
        cfg = tf.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        return tf.LlamaForCausalLM(cfg), text
    if name == "opt":
        cfg = tf.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            ffn_dim=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=32,
            max_position_embeddings=64,
        )
        return tf.OPTForCausalLM(cfg), text
    if name == "t5":
        cfg = tf.T5Config(
            vocab_size=VOCAB,
            d_model=32,
            d_kv=8,
            d_ff=48,
            num_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
        )
        return tf.T5ForConditionalGeneration(cfg), {**text, "decoder_input_ids": ids[:, :5]}
    if name == "bert":
        cfg = tf.BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
            num_labels=3,
        )
        return tf.BertForSequenceClassification(cfg), text
    if name == "vit":
        cfg = tf.ViTConfig(
            image_size=16,
            patch_size=4,
            num_channels=3,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
            num_labels=5,
        )
        pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
        return tf.ViTForImageClassification(cfg), {"pixel_values": pixels}
    raise KeyError(name)


# architecture -> (LoRA targets, task type, modules_to_save)
ARCHS = {
    "bloom": (["query_key_value", "dense_4h_to_h"], "CAUSAL_LM", None),
    "gpt2": (["c_attn", "c_proj"], "CAUSAL_LM", None),
    "llama": (["q_proj", "v_proj", "down_proj"], "CAUSAL_LM", None),
    "opt": (["q_proj", "v_proj", "fc1"], "CAUSAL_LM", None),
    "t5": (["q", "v", "wo"], "SEQ_2_SEQ_LM", None),
    "bert": (["query", "value"], "SEQ_CLS", None),
    "vit": (["q_proj", "v_proj"], None, ["classifier"]),
}


@pytest.fixture
def tiny_model():
    """Factory: ``tiny_model(name) -> (model in eval mode, forward kwargs)``, seeded."""

    def make(name: str):
        torch.manual_seed(0)
        model, inputs = _tiny(name)
        return model.eval(), inputs

    return make


def logits_of(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output[0]


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """max |a - e| <= rel * max |e|: the parity criterion (fp32, relative error <= 1e-5)."""
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= rel * max(scale, 1e-12), f"relative error {err / max(scale, 1e-12):.3g} > {rel}"
