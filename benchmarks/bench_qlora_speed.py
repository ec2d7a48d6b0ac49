"""QLoRA's speed targets (issue 12), each measured side by side in one process.

Part ``layer``: an NF4 + double-quant linear layer, forward + backward to its input (the frozen
base of a QLoRA layer), peftkit's ``Linear4bit`` against bitsandbytes' ``Linear4bit`` on the CPU,
same weight, float32 compute, for SmolLM2-135M's three linear shapes at batch 8 x 128.

Part ``step``: a LoRA training step (r=8 on every linear layer, AdamW, batch 8 x 128) on a random
Llama with SmolLM2-135M's widths, its base in float32 (LoRA) and in NF4 (QLoRA: the same
weights quantised with ``quantize_model``), both without and both with gradient checkpointing:
like is compared with like.

Every case runs in interleaved rounds after a warm-up; medians of wall and process CPU time.

Run: ``.venv/bin/python benchmarks/bench_qlora_speed.py [--layers 8 --repeats 5]``; writes
``results/qlora_speed.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
import warnings
from pathlib import Path

import torch
from common import smollm2_shape

warnings.filterwarnings("ignore")
RESULTS = Path(__file__).parent / "results" / "qlora_speed.json"
SHAPES = {
    "q/o 576->576": (576, 576),
    "gate/up 576->1536": (576, 1536),
    "down 1536->576": (1536, 576),
}


def interleaved(calls: dict, repeats: int) -> dict[str, dict[str, float]]:
    for fn in calls.values():
        fn()
    wall: dict[str, list[float]] = {k: [] for k in calls}
    cpu: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            w, c = time.perf_counter(), time.process_time()
            fn()
            cpu[name].append((time.process_time() - c) * 1e3)
            wall[name].append((time.perf_counter() - w) * 1e3)
    return {
        k: {"wall_ms": statistics.median(wall[k]), "cpu_ms": statistics.median(cpu[k])}
        for k in calls
    }


def part_layer(repeats: int) -> dict:
    import bitsandbytes as bnb

    from peftkit.quant.linear4bit import Linear4bit

    out = {}
    for label, (fan_in, fan_out) in SHAPES.items():
        torch.manual_seed(0)
        weight = torch.randn(fan_out, fan_in) * 0.02
        ours = Linear4bit.from_weight(weight, None, "nf4", True, torch.float32)
        theirs = bnb.nn.Linear4bit(
            fan_in, fan_out, bias=False, compute_dtype=torch.float32, quant_type="nf4"
        )
        theirs.weight = bnb.nn.Params4bit(
            weight.clone(), requires_grad=False, quant_type="nf4", compress_statistics=True
        )
        theirs = theirs.to("cpu")  # quantises on the CPU (bitsandbytes' CPU backend)
        x = torch.randn(8, 128, fan_in)

        def run(layer, x=x):
            xi = x.detach().requires_grad_(True)
            layer(xi).sum().backward()
            return xi.grad

        with torch.no_grad():
            rel = ((ours(x) - theirs(x)).abs().max() / theirs(x).abs().max()).item()
        calls = {"peftkit": lambda o=ours: run(o), "bnb": lambda t=theirs: run(t)}
        times = interleaved(calls, repeats)
        out[label] = {
            **times,
            "peftkit_over_bnb_cpu": times["peftkit"]["cpu_ms"] / times["bnb"]["cpu_ms"],
            "peftkit_over_bnb_wall": times["peftkit"]["wall_ms"] / times["bnb"]["wall_ms"],
            "max_rel_output_diff": rel,
        }
    return out


def part_step(layers: int, repeats: int) -> dict:
    import peftkit
    from peftkit.quant import quantize_model

    base = smollm2_shape(layers).requires_grad_(False)
    ids = torch.randint(0, 49152, (8, 128), generator=torch.Generator().manual_seed(0))
    calls = {}
    for kind in ("lora", "qlora"):
        for gc in (False, True):
            model = copy.deepcopy(base)
            if kind == "qlora":
                quantize_model(model, "nf4")
            if gc:
                model.activation_checkpointing_enable({"use_reentrant": False})
            cfg = peftkit.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
            pm = peftkit.get_peft_model(model, cfg).train()
            if gc:
                pm.enable_input_require_grads()
            opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)

            def step(pm=pm, opt=opt):
                pm(input_ids=ids, labels=ids).loss.backward()
                opt.step()
                opt.zero_grad()

            calls[f"{kind}{'_gc' if gc else ''}"] = step
    times = interleaved(calls, repeats)
    for gc in ("", "_gc"):
        for key in ("wall_ms", "cpu_ms"):
            times[f"qlora{gc}"][f"over_lora{gc}_{key}"] = (
                times[f"qlora{gc}"][key] / times[f"lora{gc}"][key]
            )
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="layer,step")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result: dict = {
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
        "repeats": args.repeats,
    }
    if "layer" in args.parts:
        result["layer_fwd_bwd_batch_8x128"] = part_layer(args.repeats * 4)
    if "step" in args.parts:
        result["step"] = {
            "setup": f"SmolLM2 widths, {args.layers} layers, r=8 all-linear, batch 8x128, AdamW",
            **part_step(args.layers, args.repeats),
        }
    result["loadavg_end"] = os.getloadavg()
    print(json.dumps(result, indent=2))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
