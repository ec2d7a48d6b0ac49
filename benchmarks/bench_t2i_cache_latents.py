"""``task.cache_latents`` side by side: one training epoch with the VAE encoder run every step
vs the latents encoded once, in one process, alternating, medians of repeats.

::

    base folder (Stable Diffusion layout) ──load once──> LoRA r=8 on to_q/to_k/to_v/to_out.0
    task A (cache_latents: false)  encode: resize              epoch: VAE encoder + UNet step
    task B (cache_latents: true)   encode: + VAE encoder once  epoch: UNet step (z from the cache)
    repeat R times: epoch A, epoch B (same batches, same draws) -> median seconds per epoch

An epoch here is what the trainer runs per batch: collate, forward (the loss), backward, AdamW
step. The cache's one-off cost (encoding every image once) is reported beside it. Writes
``benchmarks/results/t2i_cache_latents.json``. Usage:
``python benchmarks/bench_t2i_cache_latents.py [BASE] [--data FOLDER]`` (default: the latent
digits base and its LoRA data from t2i_digits_latent_base.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def epoch_seconds(model, task, features, batch_size: int, seed: int) -> tuple[float, float]:
    """(seconds, mean loss) of one epoch over ``features`` in fixed batches."""
    params = [p for p in model.parameters() if p.requires_grad]
    start_values = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    torch.manual_seed(seed)
    losses = []
    start = time.perf_counter()
    for i in range(0, len(features), batch_size):
        batch = task.collate(features[i : i + batch_size])
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - start
    with torch.no_grad():  # every epoch starts from the same adapter: the losses compare
        for p, value in zip(params, start_values, strict=True):
            p.copy_(value)
    return seconds, sum(losses) / len(losses)


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
    args = p.parse_args()
    torch.set_num_threads(args.threads)

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
    times: dict[str, list[float]] = {name: [] for name in tasks}
    losses: dict[str, list[float]] = {name: [] for name in tasks}
    for r in range(args.repeats):
        for name in tasks:
            seconds, loss = epoch_seconds(model, tasks[name], features[name], args.batch_size, r)
            times[name].append(seconds)
            losses[name].append(loss)
            print(f"repeat {r}: {name} epoch {seconds:.2f} s (loss {loss:.5f})", flush=True)
    median = {name: statistics.median(v) for name, v in times.items()}
    unet = model.get_base_model()
    result = {
        "base": args.base,
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
        "encode_s": encode_s,
        "cache_build_s": encode_s["cached"] - encode_s["vae_every_step"],
        "same_loss_per_repeat": [abs(a - b) / abs(a) for a, b in
                                 zip(losses["vae_every_step"], losses["cached"], strict=True)],
        "machine": "2 CPU cores shared with other jobs (ratios taken side by side)",
    }  # fmt: skip
    out = ROOT / "benchmarks" / "results" / "t2i_cache_latents.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
