"""The suite's one factory for tiny models: real transformers architectures at toy sizes.

::

    tiny_config(arch, hidden=32, ffn=48, vocab_size=96, **extra)  ->  PretrainedConfig
    tiny_model(arch, task, seed=0, ...)                           ->  model with that task's head
                                                                      (random init, eval mode)

Every tiny model in the tests comes from here (the parity fixtures in conftest.py, the prompt
matrix in test_prompt_common.py, the on-disk models of tiny_runs.py), so one architecture means
one shape everywhere. Two layers, 4 attention heads; Llama/Qwen2 use grouped-query attention
(2 key/value heads). Nothing is downloaded.
"""

from __future__ import annotations

import torch
import transformers as tf

VOCAB = 96

# task type (PEFT's names, plus image classification) -> the transformers auto class
AUTO_CLASSES = {
    "CAUSAL_LM": tf.AutoModelForCausalLM,
    "SEQ_2_SEQ_LM": tf.AutoModelForSeq2SeqLM,
    "SEQ_CLS": tf.AutoModelForSequenceClassification,
    "TOKEN_CLS": tf.AutoModelForTokenClassification,
    "QUESTION_ANS": tf.AutoModelForQuestionAnswering,
    "FEATURE_EXTRACTION": tf.AutoModel,
    "IMAGE_CLS": tf.AutoModelForImageClassification,
}


def tiny_config(
    arch: str, hidden: int = 32, ffn: int = 48, vocab_size: int = VOCAB, **extra
) -> tf.PretrainedConfig:
    """A 2-layer config of ``arch`` with ``hidden`` width and ``ffn`` feed-forward width;
    ``extra`` goes to the config class as is (token ids, position counts, labels)."""
    if arch == "bloom":
        return tf.BloomConfig(
            vocab_size=vocab_size, hidden_size=hidden, n_layer=2, n_head=4, **extra
        )
    if arch == "gpt2":
        extra.setdefault("n_positions", 64)
        return tf.GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=2, n_head=4, **extra)
    if arch in ("llama", "qwen2"):
        cls = tf.LlamaConfig if arch == "llama" else tf.Qwen2Config
        return cls(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=ffn,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            **extra,
        )
    if arch == "opt":
        extra.setdefault("max_position_embeddings", 64)
        return tf.OPTConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            ffn_dim=ffn,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=hidden,
            **extra,
        )
    if arch == "t5":
        extra.setdefault("decoder_start_token_id", 0)
        return tf.T5Config(
            vocab_size=vocab_size,
            d_model=hidden,
            d_kv=hidden // 4,
            d_ff=ffn,
            num_layers=2,
            num_heads=4,
            **extra,
        )
    if arch == "bart":
        extra.setdefault("max_position_embeddings", 64)
        extra.setdefault("forced_eos_token_id", None)
        return tf.BartConfig(
            vocab_size=vocab_size,
            d_model=hidden,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=ffn,
            decoder_ffn_dim=ffn,
            **extra,
        )
    if arch in ("bert", "roberta"):
        cls = tf.BertConfig if arch == "bert" else tf.RobertaConfig
        return cls(
            vocab_size=vocab_size,
            hidden_size=hidden,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=ffn,
            **extra,
        )
    if arch == "vit":
        return tf.ViTConfig(
            image_size=16,
            patch_size=4,
            num_channels=3,
            hidden_size=hidden,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=ffn,
            **extra,
        )
    if arch == "convnext":  # a conv net: depthwise 7x7 convs (groups = channels) + Linear
        return tf.ConvNextConfig(
            num_channels=3,
            patch_size=2,
            num_stages=2,
            hidden_sizes=[hidden // 2, hidden],
            depths=[1, 1],
            image_size=16,
            **extra,
        )
    raise KeyError(f"no tiny config for {arch!r}")


def tiny_model(arch: str, task: str, seed: int = 0, **config_kwargs) -> torch.nn.Module:
    """A randomly initialised ``arch`` with ``task``'s head (``AUTO_CLASSES`` key), seeded,
    in eval mode. ``config_kwargs`` go to :func:`tiny_config`."""
    config = tiny_config(arch, **config_kwargs)
    torch.manual_seed(seed)
    return AUTO_CLASSES[task].from_config(config).eval()
