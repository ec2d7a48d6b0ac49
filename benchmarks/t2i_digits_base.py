"""The text-to-image real run, part 1: a small class-conditional pixel UNet on MNIST without 7s.

No pretrained Stable Diffusion ships offline, so the method is shown at small scale: this script
trains a base model that has never seen a 7, then ``examples/lora_t2i_digits_minilm.yaml`` teaches
it the digit with LoRA through ``peftkit train``, and a classifier (the "judge", trained here on
real MNIST, 7s included) counts how many generated images show the prompted digit.

::

    MNIST test set (10,000, 28x28 -> padded to 32x32 -> 16x16)
      first 8,000 ──> judge training (all digits)        last 2,000 ──> judge accuracy (held out)
      first 8,000 minus the 7s ──> base UNet (prompts "a handwritten {d}", MiniLM token states,
                                   10% empty prompts for classifier-free guidance; DDPM, epsilon)
      7s of the first 8,000 (the first --lora-sevens) ──> data/lora_train/7/*.png (LoRA data)
        + --prior-per-digit of each other digit (prior preservation) ──> data/lora_train/<d>/
      last 2,000, --eval-per-digit per digit ──> data/eval/<d>/*.png (LoRA run's eval split)
    base: sample --samples per digit (DDIM, --steps) -> share the judge recognises per prompt

Writes under ``$PEFTKIT_CACHE_DIR/t2i_digits`` (default ``~/.cache/peftkit/t2i_digits``, outside
the repository): ``base/`` (unet/, scheduler/, text_encoder.json), ``judge/``, ``data/``, and a
``READY`` file last (so an interrupted run is redone); as a benchmark also
``benchmarks/results/t2i_digits_base.json`` (losses, times, judge accuracy, shares) plus
``docs/t2i_digits_base_samples.png`` (one row per digit prompt). Seeded: a re-run gives the same
weights on the same machine and thread count (usage: ``python benchmarks/t2i_digits_base.py``).

``make t2i-digits`` runs it with ``--prepare``: the cache folder only (the repository's result
files stay as committed), and nothing at all when ``READY`` is already there.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT.parent / "shared" / "data" / "image_mnist_test"
PROMPT = "a handwritten {}"
HELD_OUT = "7"

SIDE = 16  # 2 shared CPU cores: 16x16 digits (a step at 32x32 cost ~4x more)
UNET_CONFIG = dict(
    sample_size=SIDE,
    in_channels=1,
    out_channels=1,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),  # cross-attention at 8x8 (+ mid)
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=384,  # MiniLM's hidden size
    attention_head_dim=4,  # diffusers reads it as the number of heads
    norm_num_groups=8,
)
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon"
)


def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """(N, SIDE, SIDE) uint8 (28x28 padded by 2 to 32x32, then area-resized) and (N,) labels."""
    from PIL import Image

    from peftkit.data.images import read_idx

    rows = read_idx(MNIST / "t10k-images-idx3-ubyte.gz", MNIST / "t10k-labels-idx1-ubyte.gz")
    images = np.stack(
        [
            np.asarray(Image.fromarray(np.pad(r["image"], 2)).resize((SIDE, SIDE), Image.BOX))
            for r in rows
        ]
    )
    labels = np.array([str(r["label"]) for r in rows])
    return images, labels


def to_unit(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).float().div(255).unsqueeze(1)  # (N, 1, SIDE, SIDE) in [0, 1]


def train_judge(x: torch.Tensor, y: list[str], x_test: torch.Tensor, y_test: list[str], args):
    from peftkit.diffusion import ImageJudge

    labels = [str(d) for d in range(10)]
    index = torch.tensor([labels.index(v) for v in y])
    torch.manual_seed(args.seed)
    judge = ImageJudge(labels, channels=1, size=SIDE)
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3)
    start = time.perf_counter()
    for _ in range(args.judge_epochs):
        order = torch.randperm(len(x))
        for i in range(0, len(x), 128):
            batch = order[i : i + 128]
            shift = torch.randint(-2, 3, (2,)).tolist()  # small translations
            images = torch.roll(x[batch], shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(judge(images), index[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    preds = judge.classify(x_test)
    acc = float(np.mean([p == t for p, t in zip(preds, y_test, strict=True)]))
    return judge.eval(), acc, time.perf_counter() - start


def encode(text_encoder, tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer(prompts, padding="max_length", max_length=8, return_tensors="pt")
    with torch.no_grad():
        states = text_encoder(**enc).last_hidden_state  # (P, 8, 384)
    return states, enc["attention_mask"]


def train_base(x: torch.Tensor, y: list[str], args):
    from diffusers import DDPMScheduler

    from peftkit.diffusion import TextToImageUNet
    from peftkit.diffusion.folders import load_text_encoder

    text_encoder, tokenizer = load_text_encoder("minilm-l6")
    text_encoder.eval()
    digits = sorted(set(y))
    states, masks = encode(text_encoder, tokenizer, [PROMPT.format(d) for d in digits] + [""])
    cls = torch.tensor([digits.index(v) for v in y])
    torch.manual_seed(args.seed)
    unet = TextToImageUNet(**UNET_CONFIG)
    scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    params = sum(p.numel() for p in unet.parameters())
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    warm = 50
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + np.cos(np.pi * s / args.train_steps))
    )
    gen = torch.Generator().manual_seed(args.seed)
    losses, start = [], time.perf_counter()
    unet.train()
    for step in range(args.train_steps):
        batch = torch.randint(0, len(x), (args.batch_size,), generator=gen)
        x0 = x[batch] * 2 - 1  # (B, 1, SIDE, SIDE) in [-1, 1]
        which = cls[batch].clone()
        which[torch.rand(len(batch), generator=gen) < 0.1] = len(digits)  # the empty prompt
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(batch),), generator=gen)
        noisy = scheduler.add_noise(x0, noise, t)
        pred = unet(noisy, t, states[which], encoder_attention_mask=masks[which]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 100 == 0:
            elapsed = time.perf_counter() - start
            print(f"step {step + 1}/{args.train_steps} loss {np.mean(losses[-100:]):.4f} "
                  f"{elapsed:.0f} s", flush=True)  # fmt: skip
    unet.eval()
    unet.attach(text_encoder, tokenizer, scheduler)
    return unet, losses, time.perf_counter() - start, params


def share_recognised(unet, judge, args, label: str = "base") -> tuple[dict, torch.Tensor]:
    from peftkit.diffusion import sample_images

    digits = [str(d) for d in range(10)]
    prompts = [PROMPT.format(d) for d in digits for _ in range(args.samples)]
    seeds = [1000 + i for i in range(len(prompts))]
    images = sample_images(unet, prompts, seeds, steps=args.steps, guidance_scale=args.guidance)
    preds = judge.classify(images)
    shares = {}
    for k, d in enumerate(digits):
        got = preds[k * args.samples : (k + 1) * args.samples]
        shares[d] = sum(p == d for p in got) / len(got)
    print(f"{label}: share recognised per prompt {shares}", flush=True)
    return shares, images


def write_pngs(images: np.ndarray, labels: np.ndarray, folder: Path) -> None:
    from PIL import Image

    counts: dict[str, int] = {}
    for image, label in zip(images, labels, strict=True):
        (folder / label).mkdir(parents=True, exist_ok=True)
        counts[label] = counts.get(label, 0) + 1
        Image.fromarray(image).save(folder / label / f"{counts[label] - 1:04d}.png")


def write_lora_data(train_x, train_y, test_x, test_y, out: Path, args) -> tuple:
    """data/lora_train: the first --lora-sevens 7s + --prior-per-digit images of each other
    digit (prior preservation: without them the other prompts drift towards 7);
    data/eval: --eval-per-digit held-out images per digit."""
    import shutil

    shutil.rmtree(out / "data", ignore_errors=True)
    sevens = np.flatnonzero(train_y == HELD_OUT)[: args.lora_sevens]
    prior = [np.flatnonzero(train_y == d)[: args.prior_per_digit]
             for d in map(str, range(10)) if d != HELD_OUT]  # fmt: skip
    chosen = np.concatenate([sevens, *prior])
    write_pngs(train_x[chosen], train_y[chosen], out / "data" / "lora_train")
    pick = np.concatenate(
        [np.flatnonzero(test_y == d)[: args.eval_per_digit] for d in map(str, range(10))]
    )
    write_pngs(test_x[pick], test_y[pick], out / "data" / "eval")
    return sevens, pick


def main() -> None:
    from peftkit.diffusion import grid, save_text_to_image
    from peftkit.models import cache_dir

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(cache_dir() / "t2i_digits"))
    p.add_argument("--train-steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--judge-epochs", type=int, default=3)
    p.add_argument("--samples", type=int, default=16, help="images per digit prompt")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--lora-sevens", type=int, default=200)
    p.add_argument("--prior-per-digit", type=int, default=25)
    p.add_argument("--eval-per-digit", type=int, default=20)
    p.add_argument("--data-only", action="store_true", help="rewrite data/ only (base cached)")
    p.add_argument("--threads", type=int, default=1)  # 2 on a busy 2-core box: 6x slower
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--prepare",
        action="store_true",
        help="only write base/, judge/, data/ (no benchmark result files); skip if READY exists",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out).expanduser()
    ready = out / "READY"
    if args.prepare and ready.is_file():
        print(f"{out}: already prepared ({ready.read_text().strip()}); delete it to rebuild")
        return

    images, labels = load_mnist()
    train_x, train_y = images[:8000], labels[:8000]
    test_x, test_y = images[8000:], labels[8000:]
    if args.data_only:
        write_lora_data(train_x, train_y, test_x, test_y, out, args)
        return
    judge, judge_acc, judge_s = train_judge(
        to_unit(train_x), list(train_y), to_unit(test_x), list(test_y), args
    )
    print(f"judge: held-out accuracy {judge_acc:.4f} on {len(test_y)} images ({judge_s:.0f} s)")
    judge.save(out / "judge")

    keep = train_y != HELD_OUT
    unet, losses, train_s, params = train_base(to_unit(train_x[keep]), list(train_y[keep]), args)
    save_text_to_image(out / "base", unet, unet.noise_scheduler, "minilm-l6")
    shares, samples = share_recognised(unet, judge, args)

    sevens, pick = write_lora_data(train_x, train_y, test_x, test_y, out, args)
    ready.write_text(
        f"base, judge and data for examples/lora_t2i_digits_minilm.yaml (seed {args.seed})\n"
    )
    if args.prepare:
        print(f"prepared {out}: base/, judge/, data/ (judge held-out accuracy {judge_acc:.3f})")
        return

    per_row = min(args.samples, 8)
    rows = torch.cat([samples[k * args.samples : k * args.samples + per_row] for k in range(10)])
    docs = ROOT / "docs" / "t2i_digits_base_samples.png"
    grid(rows, per_row, scale=2).save(docs)
    others = [v for d, v in shares.items() if d != HELD_OUT]
    result = {
        "unet_config": UNET_CONFIG,
        "scheduler_config": SCHEDULER_CONFIG,
        "unet_params": params,
        "train_images": int(keep.sum()),
        "train_steps": args.train_steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "threads": args.threads,
        "train_time_s": round(train_s, 1),
        "loss_first_100": float(np.mean(losses[:100])),
        "loss_last_100": float(np.mean(losses[-100:])),
        "loss_per_100_steps": [
            round(float(np.mean(losses[i : i + 100])), 4) for i in range(0, len(losses), 100)
        ],  # fmt: skip
        "judge_test_accuracy": judge_acc,
        "judge_test_images": len(test_y),
        "sampling": {
            "steps": args.steps,
            "guidance_scale": args.guidance,
            "samples_per_prompt": args.samples,
        },  # fmt: skip
        "share_recognised": shares,
        "share_recognised_held_out": shares[HELD_OUT],
        "share_recognised_others_mean": float(np.mean(others)),
        "lora_train_sevens": len(sevens),
        "lora_train_prior_per_digit": args.prior_per_digit,
        "eval_images": len(pick),
        "cache": str(out),
    }
    path = ROOT / "benchmarks" / "results" / "t2i_digits_base.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "loss_per_100_steps"}, indent=2))


if __name__ == "__main__":
    main()
