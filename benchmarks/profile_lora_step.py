"""Where a LoRA training step's time goes beyond the frozen-model floor (issue 12's profile).

Same model, batch and cases as ``bench_lora_step.py`` (SmolLM2-135M widths, batch 8 x 128, LoRA
r=16 on every linear layer, AdamW). One profiled step each (after two warm-up steps) of the
floor and of peftkit, torch.profiler's self CPU time per op, grouped:

* ``base matmul``     products with no dimension equal to the rank (the model's own, both ways);
* ``LoRA matmul``     products with a rank-sized dimension (the A and B projections);
* ``dropout mask``    drawing, applying, packing and unpacking the keep-mask;
* ``optimizer``       AdamW's update of the adapter weights (the floor has none);
* ``other``           everything else (attention, norms, loss, elementwise ops, autograd).

Run: ``.venv/bin/python benchmarks/profile_lora_step.py [--layers 8 --dropout 0.05]``; prints one
table and writes ``results/profile_lora_step.json``.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from pathlib import Path

import torch
from bench_lora_step import ALL_LINEAR, sharing_copy, wrap
from common import smollm2_shape
from torch.profiler import profile

from peftkit.methods.dropout_mask import set_dropout_mask

RESULTS = Path(__file__).parent / "results" / "profile_lora_step.json"
MASK_OPS = ("randint", "random_", "bernoulli", "where", "index", "ge", "bitwise", "__rshift__")
MATMULS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::matmul")


def group(event, rank: int) -> str:
    name = event.key
    if name in MATMULS:
        shapes = [s for s in event.input_shapes if s]
        if any(rank in s for s in shapes):
            return "LoRA matmul"
        return "base matmul"
    if "adam" in name.lower() or "_foreach" in name:
        return "optimizer"
    if any(op in name for op in MASK_OPS):
        return "dropout mask"
    return "other"


def profiled(step, rank: int) -> dict[str, float]:
    for _ in range(2):
        step()
    with profile(record_shapes=True) as prof:
        step()
    totals: dict[str, float] = defaultdict(float)
    for event in prof.key_averages(group_by_input_shape=True):
        totals[group(event, rank)] += event.self_cpu_time_total / 1e3  # ms
    return dict(totals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dropout-mask", choices=["bernoulli", "fast"], default="bernoulli")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    set_dropout_mask(args.dropout_mask)
    base = smollm2_shape(args.layers)
    ids = torch.randint(0, 49152, (8, 128), generator=torch.Generator().manual_seed(0))
    frozen = sharing_copy(base)
    embed = frozen.get_input_embeddings()

    def floor_step():
        emb = embed(ids).detach().requires_grad_(True)
        frozen(inputs_embeds=emb, labels=ids).loss.backward()

    model = wrap("peftkit", sharing_copy(base), ALL_LINEAR, args.dropout).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def lora_step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()

    rows = {"floor": profiled(floor_step, 16), "peftkit": profiled(lora_step, 16)}
    groups = ["base matmul", "LoRA matmul", "dropout mask", "optimizer", "other"]
    floor_total = sum(rows["floor"].values())
    print(
        f"{args.layers} layers, batch 8 x 128, LoRA r=16 all-linear, dropout {args.dropout} "
        f"({args.dropout_mask} masks), "
        f"{args.threads} threads, load {os.getloadavg()[0]:.1f}; self CPU ms of one step"
    )
    print(f"{'group':14} {'floor':>8} {'peftkit':>8} {'delta':>8} {'of floor':>9}")
    for g in [*groups, "total"]:
        f = floor_total if g == "total" else rows["floor"].get(g, 0.0)
        p = sum(rows["peftkit"].values()) if g == "total" else rows["peftkit"].get(g, 0.0)
        print(f"{g:14} {f:8.0f} {p:8.0f} {p - f:+8.0f} {(p - f) / floor_total:+9.1%}")
    out = {
        "setup": f"SmolLM2 widths, {args.layers} layers, batch 8x128, r=16 all-linear, "
        f"dropout {args.dropout} ({args.dropout_mask} masks), {args.threads} threads",
        "loadavg": os.getloadavg(),
        "self_cpu_ms": rows,
    }
    payload = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    payload[f"dropout_{args.dropout:g}_{args.dropout_mask}"] = out  # one entry per setting
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
