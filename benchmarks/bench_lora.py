"""LoRA cost, peftkit vs HF PEFT side by side in one process (medians of repeats, ratios).

Model: a randomly initialised Llama with SmolLM2-135M's shape (the bundled real model's
architecture; weights do not matter for speed). Batch 8 x seq 64, LoRA r=8 on q/k/v/o.

Measured for each library:
* ``get_peft_model`` wall time (vs. the time to allocate the same adapter tensors by hand),
* a training step (forward + backward + AdamW) with lora_dropout 0.05 and 0,
* bytes autograd saves for backward in one forward (``saved_tensors_hooks``: the activation
  memory a step holds, exact and independent of allocator noise),
* unmerged inference forward vs. the base model.

Run: ``.venv/bin/python benchmarks/bench_lora.py [--quick]``; writes ``benchmarks/results/lora.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
import warnings

import torch
from common import median_time, smollm2_shape

warnings.filterwarnings("ignore")


def saved_bytes(model, batch) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _ = model(**batch).loss
    return total


def wrap(lib: str, base, dropout: float):
    kw = dict(
        task_type="CAUSAL_LM",
        r=8,
        lora_alpha=16,
        lora_dropout=dropout,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    )
    if lib == "peftkit":
        import peftkit

        return peftkit.get_peft_model(base, peftkit.LoraConfig(**kw))
    import peft

    return peft.get_peft_model(base, peft.LoraConfig(**kw))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="8 layers, fewer repeats")
    args = parser.parse_args()
    repeats = 3 if args.quick else 5
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    base = smollm2_shape(8 if args.quick else 30)
    ids = torch.randint(0, 49152, (8, 64), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    results: dict = {
        "model": f"Llama SmolLM2-135M shape ({base.config.num_hidden_layers} layers)",
        "batch": "8 x 64",
        "torch_threads": torch.get_num_threads(),
    }

    # adapter allocation floor: the same tensors, created and initialised by hand
    def allocate():
        for _ in range(base.config.num_hidden_layers * 4):
            a = torch.empty(8, 576)
            torch.nn.init.kaiming_uniform_(a, a=5**0.5)
            torch.zeros(576, 8)

    floor = median_time(allocate, repeats)
    results["allocate_floor_s"] = floor
    # Build both libraries' models, then time them interleaved (A, B, A, B, ...) so background
    # load on the machine hits both alike; ratios are of medians.
    models = {}
    for lib in ("peftkit", "peft"):
        results[lib] = {}
        copies = [copy.deepcopy(base) for _ in range(repeats)]
        wrap_times = []
        for fresh in copies:
            start = time.perf_counter()
            wrap(lib, fresh, 0.0)
            wrap_times.append(time.perf_counter() - start)
        results[lib]["get_peft_model_s"] = statistics.median(wrap_times)
        del copies
        for dropout in (0.05, 0.0):
            model = wrap(lib, copy.deepcopy(base), dropout).train()
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            models[(lib, dropout)] = (model, opt)
            results[lib][f"saved_for_backward_MB_dropout{dropout}"] = (
                saved_bytes(model, batch) / 2**20
            )

    def step(model, opt):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()

    frozen = copy.deepcopy(base).eval()
    timings: dict = {}
    for _ in range(repeats + 1):  # first round is warm-up
        for (lib, dropout), (model, opt) in models.items():
            model.train()
            t = time.perf_counter()
            step(model, opt)
            timings.setdefault(f"{lib}/train_step_s_dropout{dropout}", []).append(
                time.perf_counter() - t
            )
        with torch.no_grad():
            for lib in ("peftkit", "peft"):
                model = models[(lib, 0.0)][0].eval()
                t = time.perf_counter()
                model(input_ids=ids)
                timings.setdefault(f"{lib}/infer_unmerged_s", []).append(time.perf_counter() - t)
            t = time.perf_counter()
            frozen(input_ids=ids)
            timings.setdefault("base/infer_s", []).append(time.perf_counter() - t)
    for key, values in timings.items():
        lib, name = key.split("/")
        value = statistics.median(values[1:])
        if lib == "base":
            results["base_infer_s"] = value
        else:
            results[lib][name] = value
    ours, theirs = results["peftkit"], results["peft"]
    results["ratios_peftkit_over_peft"] = {
        k: ours[k] / theirs[k] for k in ours if isinstance(ours[k], float) and theirs[k]
    }
    results["unmerged_infer_over_base"] = {
        "peftkit": ours["infer_unmerged_s"] / results["base_infer_s"],
        "peft": theirs["infer_unmerged_s"] / results["base_infer_s"],
    }
    print(json.dumps(results, indent=2))
    out = os.path.join(os.path.dirname(__file__), "results", "lora.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as fh:
        json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
