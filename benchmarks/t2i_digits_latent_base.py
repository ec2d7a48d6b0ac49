"""The latent-space real run, part 1: a small Stable Diffusion folder made here from MNIST.

No pretrained Stable Diffusion (nor any pretrained image VAE) ships offline, so this script
builds the whole latent pipeline at small scale, in diffusers' StableDiffusionPipeline layout,
from real data: a KL autoencoder (diffusers' AutoencoderKL: 32x32 grey digits <-> 4x8x8
latents, factor 4) trained on MNIST, then a latent UNet that has never seen a 7, conditioned on
MiniLM's token states (all-MiniLM-L6-v2, the pretrained encoder from its PyPI wheel, as the
folder's text encoder). ``examples/lora_t2i_digits_latent_minilm.yaml`` then teaches it the 7
with LoRA through ``peftkit train`` (cached latents), judged as the pixel digits run is.

::

    MNIST test set (10,000, 28x28 padded to 32x32)
      first 8,000 ──> VAE (MSE + 1e-3 KL, sums per image) ──> scaling_factor = 1 / std(latents)
                  ──> judge (small CNN, all digits)     last 2,000 ──> judge / VAE held out
      first 8,000 minus the 7s, as latents ──> UNet (prompts "a handwritten {d}" padded to 16
                  tokens, no mask, as the pipeline conditions; 10% "" prompts; DDPM, epsilon)
      data/lora_train: the first 200 7s + 25 of each other digit; data/eval: 20 per digit
    folder: model_index.json, vae/, unet/, text_encoder/ (MiniLM), tokenizer/ (max 16 tokens),
            scheduler/ (DDIM: the sampler; training noise uses its DDPM form)

Writes under ``$PEFTKIT_CACHE_DIR/t2i_digits_latent`` (default ``~/.cache/peftkit/...``):
``base/``, ``judge/``, ``data/``; and ``benchmarks/results/t2i_digits_latent_base.json``
plus ``docs/t2i_digits_latent_base_samples.png``. Seeded; one thread by default (a busy 2-core
machine runs small convolutions slower on two). Usage:
``python benchmarks/t2i_digits_latent_base.py``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT.parent / "shared" / "data" / "image_mnist_test"
PROMPT = "a handwritten {}"
HELD_OUT = "7"
SIDE = 32
MAX_TOKENS = 16
VAE_CONFIG = dict(
    in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(16, 32, 32),
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    layers_per_block=1, norm_num_groups=8, sample_size=SIDE,
)  # fmt: skip
UNET_CONFIG = dict(
    sample_size=SIDE // 4, in_channels=4, out_channels=4, block_out_channels=(48, 96),
    layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=384,
    attention_head_dim=4, norm_num_groups=8,
)  # fmt: skip
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
    clip_sample=False,
)  # fmt: skip


def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """(N, 32, 32) uint8 (28x28 padded by 2) and (N,) labels."""
    from peftkit.data.images import read_idx

    rows = read_idx(MNIST / "t10k-images-idx3-ubyte.gz", MNIST / "t10k-labels-idx1-ubyte.gz")
    images = np.stack([np.pad(r["image"], 2) for r in rows])
    return images, np.array([str(r["label"]) for r in rows])


def to_model(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).float().div(127.5).sub(1).unsqueeze(1)  # (N, 1, 32, 32)


def cosine(opt, steps: int, warm: int = 50):
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + np.cos(np.pi * s / steps))
    )


def train_vae(x: torch.Tensor, x_test: torch.Tensor, args):
    """AutoencoderKL on [-1, 1] digits: per image Σ(x − x̂)² + 1e-3 · KL."""
    from diffusers import AutoencoderKL

    torch.manual_seed(args.seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    sched = cosine(opt, args.vae_steps)
    gen = torch.Generator().manual_seed(args.seed)
    start, losses = time.perf_counter(), []
    vae.train()
    for step in range(args.vae_steps):
        batch = x[torch.randint(0, len(x), (args.batch_size,), generator=gen)]
        dist = vae.encode(batch).latent_dist
        recon = vae.decode(dist.sample(generator=gen)).sample
        rec = (recon - batch).pow(2).flatten(1).sum(1).mean()
        kl = dist.kl().mean()
        loss = rec + args.kl_weight * kl
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(rec.detach()) / x[0].numel())
        if (step + 1) % 100 == 0:
            print(f"vae step {step + 1}/{args.vae_steps} mse/pixel {np.mean(losses[-100:]):.4f} "
                  f"kl {float(kl):.1f} {time.perf_counter() - start:.0f} s", flush=True)  # fmt: skip
    vae.eval()
    with torch.no_grad():
        mean = torch.cat(
            [vae.encode(x[i : i + 256]).latent_dist.mean for i in range(0, len(x), 256)]
        )
        scale = float(1.0 / mean.std())
        vae.register_to_config(scaling_factor=scale)
        test = torch.cat([vae.decode(vae.encode(x_test[i : i + 256]).latent_dist.mean).sample
                          for i in range(0, len(x_test), 256)])  # fmt: skip
    test_mse = float(F.mse_loss(test, x_test)) / 4  # on [0, 1] pixels
    return vae, {"train_time_s": round(time.perf_counter() - start, 1),
                 "mse_per_pixel_last_100": float(np.mean(losses[-100:])) / 4,
                 "held_out_mse_per_pixel_01": test_mse, "psnr_db": 10 * np.log10(1 / test_mse),
                 "scaling_factor": scale}, test  # fmt: skip


def prompt_states(text_encoder, tokenizer, prompts: list[str]) -> torch.Tensor:
    """What the pipeline feeds the UNet: max-length padding, no attention mask."""
    ids = tokenizer(prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                    return_tensors="pt").input_ids  # fmt: skip
    with torch.no_grad():
        return text_encoder(ids)[0]  # (P, 16, 384)


def train_unet(mean, std, labels: list[str], states: torch.Tensor, vae, args):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    digits = [str(d) for d in range(10)]
    cls = torch.tensor([digits.index(v) for v in labels])
    torch.manual_seed(args.seed)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    sched = cosine(opt, args.train_steps)
    gen = torch.Generator().manual_seed(args.seed + 1)
    scale = vae.config.scaling_factor
    start, losses = time.perf_counter(), []
    unet.train()
    for step in range(args.train_steps):
        batch = torch.randint(0, len(mean), (args.batch_size,), generator=gen)
        z0 = (mean[batch] + std[batch] * torch.randn(mean[batch].shape, generator=gen)) * scale
        which = cls[batch].clone()
        which[torch.rand(len(batch), generator=gen) < 0.1] = len(digits)  # the empty prompt
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(batch),), generator=gen)
        pred = unet(scheduler.add_noise(z0, noise, t), t, states[which]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 100 == 0:
            print(f"unet step {step + 1}/{args.train_steps} loss {np.mean(losses[-100:]):.4f} "
                  f"{time.perf_counter() - start:.0f} s", flush=True)  # fmt: skip
    unet.eval()
    return unet, losses, time.perf_counter() - start


def sample_shares(base: Path, judge, args, label: str) -> tuple[dict, torch.Tensor]:
    """Images per digit prompt from the saved folder (peftkit's loader and sampler), judged."""
    from peftkit.diffusion import load_text_to_image, sample_images

    model, _ = load_text_to_image(base)
    digits = [str(d) for d in range(10)]
    prompts = [PROMPT.format(d) for d in digits for _ in range(args.samples)]
    seeds = [1000 + i for i in range(len(prompts))]
    images = sample_images(model, prompts, seeds, steps=args.steps, guidance_scale=args.guidance)
    preds = judge.classify(images)
    shares = {d: sum(p == d for p in preds[k * args.samples : (k + 1) * args.samples])
              / args.samples for k, d in enumerate(digits)}  # fmt: skip
    print(f"{label}: share recognised per prompt {shares}", flush=True)
    return shares, images


def main() -> None:
    import diffusers
    import t2i_digits_base as pixel  # the judge and the LoRA data, as the pixel run makes them
    import transformers

    from peftkit.diffusion import grid, save_png
    from peftkit.models import cache_dir, resolve_model

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(cache_dir() / "t2i_digits_latent"))
    p.add_argument("--vae-steps", type=int, default=1000)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--kl-weight", type=float, default=1e-3)
    p.add_argument("--train-steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--judge-epochs", type=int, default=3)
    p.add_argument("--samples", type=int, default=16, help="images per digit prompt")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--lora-sevens", type=int, default=200)
    p.add_argument("--prior-per-digit", type=int, default=25)
    p.add_argument("--eval-per-digit", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--prepare",
        action="store_true",
        help="only write base/, judge/, data/ (no benchmark result files); skip if READY exists",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out).expanduser()
    ready = out / "READY"  # written last: an interrupted preparation is done again
    if args.prepare and ready.is_file():
        print(f"{out}: already prepared ({ready.read_text().strip()}); delete it to rebuild")
        return
    images, labels = load_mnist()
    train_x, train_y, test_x, test_y = images[:8000], labels[:8000], images[8000:], labels[8000:]

    pixel.SIDE = SIDE  # the pixel script's judge, at this script's image side
    judge, judge_acc, _ = pixel.train_judge(
        to_model(train_x) / 2 + 0.5, list(train_y), to_model(test_x) / 2 + 0.5, list(test_y), args
    )
    print(f"judge: held-out accuracy {judge_acc:.4f} on {len(test_y)} images", flush=True)
    judge.save(out / "judge")

    vae, vae_stats, recon = train_vae(to_model(train_x), to_model(test_x), args)
    print(f"vae: {vae_stats}", flush=True)
    keep = train_y != HELD_OUT
    with torch.no_grad():
        dists = [vae.encode(to_model(train_x[keep][i : i + 256])).latent_dist
                 for i in range(0, int(keep.sum()), 256)]  # fmt: skip
    mean, std = torch.cat([d.mean for d in dists]), torch.cat([d.std for d in dists])

    minilm = resolve_model("minilm-l6").path
    text_encoder = transformers.BertModel.from_pretrained(minilm).eval()
    tokenizer = transformers.BertTokenizer.from_pretrained(minilm)
    tokenizer.model_max_length = MAX_TOKENS
    digits = [str(d) for d in range(10)]
    states = prompt_states(text_encoder, tokenizer, [PROMPT.format(d) for d in digits] + [""])
    unet, losses, unet_s = train_unet(mean, std, list(train_y[keep]), states, vae, args)

    base = out / "base"
    shutil.rmtree(base, ignore_errors=True)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=diffusers.DDIMScheduler(**SCHEDULER_CONFIG), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(base)
    shares, samples = sample_shares(base, judge, args, "base")
    sevens, pick = pixel.write_lora_data(train_x, train_y, test_x, test_y, out, args)
    ready.write_text(
        f"base, judge and data for examples/*_t2i_digits_latent_minilm.yaml (seed {args.seed})\n"
    )
    if args.prepare:
        print(f"prepared {out}: base/, judge/, data/ (judge held-out accuracy {judge_acc:.3f})")
        return

    per_row = min(args.samples, 8)
    rows = torch.cat([samples[k * args.samples : k * args.samples + per_row] for k in range(10)])
    save_png(grid(rows, per_row, scale=2), ROOT / "docs" / "t2i_digits_latent_base_samples.png")
    pairs = torch.cat([to_model(test_x[:8]) / 2 + 0.5, recon[:8].clamp(-1, 1) / 2 + 0.5])
    save_png(grid(pairs, 8, scale=2), ROOT / "docs" / "t2i_digits_latent_vae_recon.png")
    others = [v for d, v in shares.items() if d != HELD_OUT]
    result = {
        "vae_config": VAE_CONFIG, "unet_config": UNET_CONFIG, "scheduler_config": SCHEDULER_CONFIG,
        "vae_params": sum(q.numel() for q in vae.parameters()),
        "unet_params": sum(q.numel() for q in unet.parameters()),
        "vae": vae_stats, "vae_steps": args.vae_steps, "kl_weight": args.kl_weight,
        "unet_train_images": int(keep.sum()), "unet_train_steps": args.train_steps,
        "batch_size": args.batch_size, "threads": args.threads,
        "unet_train_time_s": round(unet_s, 1),
        "unet_loss_first_100": float(np.mean(losses[:100])),
        "unet_loss_last_100": float(np.mean(losses[-100:])),
        "judge_test_accuracy": judge_acc,
        "sampling": {"steps": args.steps, "guidance_scale": args.guidance,
                     "samples_per_prompt": args.samples, "sampler": "DDIM (the folder's)"},
        "share_recognised": shares, "share_recognised_held_out": shares[HELD_OUT],
        "share_recognised_others_mean": float(np.mean(others)),
        "lora_train_sevens": len(sevens), "eval_images": len(pick), "cache": str(out),
    }  # fmt: skip
    path = ROOT / "benchmarks" / "results" / "t2i_digits_latent_base.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
