"""``task.cache_latents`` side by side: a training epoch with the VAE encoder run every step vs
the latents encoded once, in one process, step by step interleaved, medians of repeats.

::

    base folder (Stable Diffusion layout) ──load once──> LoRA r=8 on to_q/to_k/to_v/to_out.0
    task A (cache_latents: false)  encode: resize              epoch: VAE encoder + UNet step
    task B (cache_latents: true)   encode: + VAE encoder once  epoch: UNet step (z from the cache)
    repeat R times: every batch as a step of A and a step of B (interleaved, same draws)
                    -> seconds per epoch of each (sum of its steps); medians over the repeats

An epoch here is what the trainer runs per batch: collate, forward (the loss), backward, AdamW
step. The cache's one-off cost (encoding every image once) is reported beside it. Two shapes:

* the latent digits base of t2i_digits_latent_base.py and its LoRA data (a 0.24M-parameter VAE
  beside a 2.7M UNet and MiniLM: the encoder is a small part of a step);
* ``--sd15 RES``: Stable Diffusion 1.5's architecture (its VAE, UNet and CLIP ViT-L/14 text
  encoder configs, random weights: time does not depend on the values) at RES x RES images,
  random RGB images; built in memory, about 4.5 GB.

Writes ``benchmarks/results/t2i_cache_latents[_sd15].json``. Usage:
``python benchmarks/bench_t2i_cache_latents.py [BASE] [--data FOLDER]`` or ``--sd15 128``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def step_seconds(model, task, features, opt, seed: int) -> tuple[float, float]:
    """(seconds, loss) of one training step on ``features``: collate, forward, backward, AdamW."""
    torch.manual_seed(seed)  # the same draws for both variants
    start = time.perf_counter()
    loss = model(**task.collate(features)).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start, float(loss.detach())


def same_loss(model, tasks, features, batch_size: int) -> float:
    """Relative difference of the two variants' losses on the first batch, same weights/draws."""
    model.train()
    losses = []
    for name in tasks:
        torch.manual_seed(0)
        with torch.no_grad():
            losses.append(float(model(**tasks[name].collate(features[name][:batch_size])).loss))
    return abs(losses[0] - losses[1]) / abs(losses[0])


def sd15_shaped(folder: Path, resolution: int, images: int) -> tuple:
    """(model, tokenizer, data folder): SD 1.5's component configs, random weights."""
    import sys

    import diffusers
    import numpy as np
    import transformers as tf
    from PIL import Image

    sys.path.insert(0, str(ROOT / "tests"))
    from peftkit.diffusion import TextToImageUNet
    from peftkit.diffusion.model import pipeline_conditioning
    from tiny_models import byte_level_clip_tokenizer

    tokenizer = byte_level_clip_tokenizer(folder / "tokenizer", model_max_length=77)
    torch.manual_seed(0)
    text = tf.CLIPTextModel(tf.CLIPTextConfig(  # CLIP ViT-L/14's text tower
        vocab_size=514, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
        bos_token_id=512, eos_token_id=513, pad_token_id=513))  # fmt: skip
    vae = diffusers.AutoencoderKL(  # SD 1.5's vae/config.json
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, sample_size=512,
        scaling_factor=0.18215)  # fmt: skip
    unet = TextToImageUNet(  # SD 1.5's unet/config.json (the library's defaults otherwise)
        sample_size=resolution // 8, cross_attention_dim=768, attention_head_dim=8
    )
    scheduler = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                        beta_end=0.012, num_train_timesteps=1000)  # fmt: skip
    unet.attach(text, tokenizer, scheduler, vae=vae,
                conditioning=pipeline_conditioning(tokenizer, text))  # fmt: skip
    rng = np.random.default_rng(0)
    data = folder / "data"
    for i in range(images):
        (data / "img").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (resolution, resolution, 3)).astype(np.uint8)).save(
            data / "img" / f"{i}.png"
        )
    return unet.eval(), tokenizer, data


def main() -> None:
    import peftkit
    from peftkit.data import read_records
    from peftkit.diffusion import load_text_to_image
    from peftkit.models import cache_dir
    from peftkit.tasks import task_spec

    latent = cache_dir() / "t2i_digits_latent"
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("base", nargs="?", default=str(latent / "base"))
    p.add_argument("--data", default=str(latent / "data" / "lora_train"))
    p.add_argument("--caption-template", default="a handwritten {label}")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sd15", type=int, metavar="RES", help="SD 1.5's shape at RES x RES")
    p.add_argument("--images", type=int, default=8, help="with --sd15: images per epoch")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    if args.sd15:
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix="sd15_"))
        model, tokenizer, data = sd15_shaped(tmp, args.sd15, args.images)
        args.base, args.data, args.caption_template = (
            f"SD 1.5 shape at {args.sd15}",
            data,
            "a {label}",
        )
    else:
        model, tokenizer = load_text_to_image(args.base)
    model = peftkit.get_peft_model(model, peftkit.LoraConfig(
        r=8, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))  # fmt: skip
    rows = read_records(args.data)
    tasks, features, encode_s = {}, {}, {}
    for name, cache in (("vae_every_step", False), ("cached", True)):
        spec = task_spec({"type": "text_to_image", "caption_template": args.caption_template,
                          "center_crop": True, "cache_latents": cache})  # fmt: skip
        tasks[name] = spec.build(tokenizer, model)
        start = time.perf_counter()
        features[name] = tasks[name].encode(rows)
        encode_s[name] = time.perf_counter() - start
    loss_diff = same_loss(model, tasks, features, args.batch_size)
    # steps interleaved (A B, then B A on the next batch): a shared machine's load drifts over
    # minutes, and both variants see the same drift; an epoch's time = the sum of its steps
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    names = list(tasks)
    times: dict[str, list[float]] = {name: [] for name in tasks}
    n = len(rows)
    for r in range(args.repeats):
        epoch = {name: 0.0 for name in names}
        for k, i in enumerate(range(0, n, args.batch_size)):
            for name in names if k % 2 == 0 else names[::-1]:
                seconds, _ = step_seconds(model, tasks[name], features[name][i : i + args.batch_size],
                                          opt, seed=1000 * r + k)  # fmt: skip
                epoch[name] += seconds
        for name in names:
            times[name].append(epoch[name])
        print(f"repeat {r}: " + ", ".join(f"{m} epoch {epoch[m]:.2f} s" for m in names), flush=True)
    median = {name: statistics.median(v) for name, v in times.items()}
    unet = model.get_base_model()
    result = {
        "base": str(args.base),
        "images": len(rows),
        "resolution": tasks["cached"].resolution,
        "latent_shape": [tasks["cached"].latent_channels, tasks["cached"].latent_side,
                         tasks["cached"].latent_side],  # fmt: skip
        "vae_params": sum(q.numel() for q in unet.vae.parameters()),
        "unet_params": sum(q.numel() for n, q in unet.named_parameters()
                           if not n.startswith("text_encoder.") and "lora_" not in n),
        "batch_size": args.batch_size,
        "threads": args.threads,
        "repeats": args.repeats,
        "epoch_s": times,
        "epoch_s_median": median,
        "speedup_per_epoch": median["vae_every_step"] / median["cached"],
        "speedup_per_repeat": [a / b for a, b in zip(times["vae_every_step"], times["cached"],
                                                      strict=True)],  # fmt: skip
        "encode_s": encode_s,
        "cache_build_s": encode_s["cached"] - encode_s["vae_every_step"],
        "same_loss_first_batch_rel": loss_diff,
        "machine": "2 CPU cores shared with other jobs (ratios taken side by side)",
    }  # fmt: skip
    result["text_encoder_params"] = sum(q.numel() for q in unet.text_encoder.parameters())
    suffix = "_sd15" if args.sd15 else ""
    out = ROOT / "benchmarks" / "results" / f"t2i_cache_latents{suffix}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
