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


# --- a tiny Stable Diffusion pipeline folder ---------------------------------------------------
SD_UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
               layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
               attention_head_dim=4, norm_num_groups=8)  # fmt: skip
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
              down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
              layers_per_block=1, norm_num_groups=4, sample_size=16)  # fmt: skip
SD_SCHEDULER = dict(num_train_timesteps=100, beta_schedule="scaled_linear", beta_start=0.00085,
                    beta_end=0.012, steps_offset=1, skip_prk_steps=True)  # fmt: skip


def byte_level_clip_tokenizer(folder, model_max_length: int = 16):
    """A CLIPTokenizer whose vocabulary is the 256 byte-level characters (each also with
    ``</w>``) plus ``<|startoftext|>`` / ``<|endoftext|>``, no merges: every character a token."""
    import json
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]  # fmt: skip
    codes, extra = list(printable), 0
    for b in range(256):  # GPT-2's byte -> unicode table
        if b not in printable:
            codes.append(256 + extra)
            extra += 1
    chars = [chr(c) for c in codes]
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": 256 + i for i, c in enumerate(chars)}
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = 512, 513
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return tf.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                            model_max_length=model_max_length)  # fmt: skip


def tiny_sd_pipeline(
    folder, seed: int = 0, scheduler: str = "PNDMScheduler", image_channels: int = 3, **scheduler_kw
):
    """A randomly initialised StableDiffusionPipeline saved in ``folder`` (SD 1.x layout: 4
    latent channels, a 2-block VAE (factor 2: 16x16 images <-> 8x8 latents), a 2-layer CLIP
    text encoder, the byte-level CLIP tokenizer, ``scheduler`` with SD's betas). Returns it."""
    from pathlib import Path

    import diffusers

    folder = Path(folder)
    tokenizer = byte_level_clip_tokenizer(folder.parent / f".{folder.name}_tokenizer")
    torch.manual_seed(seed)
    text_encoder = tf.CLIPTextModel(tf.CLIPTextConfig(
        vocab_size=514, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=16, projection_dim=32,
        bos_token_id=512, eos_token_id=513, pad_token_id=513)).eval()  # fmt: skip
    vae = diffusers.AutoencoderKL(
        **{**SD_VAE, "in_channels": image_channels, "out_channels": image_channels}
    ).eval()
    unet = diffusers.UNet2DConditionModel(**SD_UNET).eval()
    sched = getattr(diffusers, scheduler)(**{**SD_SCHEDULER, **scheduler_kw})
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=sched,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder)
    return pipe
