"""LoHa, LoKr and IA3 cost, peftkit vs HF PEFT side by side in one process (medians, ratios).

Model: a randomly initialised Llama with SmolLM2-135M's shape but 4 layers (weights do not
matter for speed). Batch 4 x seq 64, 2 threads. Per method the two libraries hold the same
adapter tensors (PEFT's, copied into peftkit; the logits are compared):

* LoHa r=8 alpha=16 and LoKr r=8 alpha=16 on q/k/v/o (no dropout): peftkit runs one product
  with ``W + ΔW`` where PEFT runs ``W x`` and ``ΔW x`` (methods/lycoris.py);
* IA3 on k/v/down_proj, down_proj feed-forward (PEFT's Llama default).

Measured for each library: a training step (forward + backward + AdamW) in wall and process CPU
seconds, the bytes autograd saves for backward in one forward (``saved_tensors_hooks``: exact,
free of allocator noise), and an unmerged inference forward; REPEATS repeats interleaved
between the libraries (a busy shared machine slows both alike), medians.

Run: ``.venv/bin/python benchmarks/bench_lycoris_ia3.py``; writes
``benchmarks/results/lycoris_ia3.json``.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import time
import warnings

import torch
from common import median_time, smollm2_shape

warnings.filterwarnings("ignore")
torch.set_num_threads(2)
REPEATS = 7
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
METHODS = {
    "loha": ("LoHaConfig", dict(r=8, alpha=16, target_modules=ATTENTION)),
    "lokr": ("LoKrConfig", dict(r=8, alpha=16, target_modules=ATTENTION)),
    "ia3": (
        "IA3Config",
        dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    ),
}


def saved_bytes(model, batch) -> int:
    """Bytes autograd keeps for backward in one forward (distinct storages)."""
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch)
    return sum(seen.values())


def pair(method: str, base) -> dict:
    """PEFT and peftkit models with the same random (non-identity) adapter."""
    import peft

    import peftkit

    cls, kwargs = METHODS[method]
    init = {"init_ia3_weights": False} if method == "ia3" else {"init_weights": False}
    torch.manual_seed(1)
    theirs = peft.get_peft_model(copy.deepcopy(base), getattr(peft, cls)(**kwargs, **init))
    ours = peftkit.get_peft_model(copy.deepcopy(base), getattr(peftkit, cls)(**kwargs))
    own = dict(ours.named_parameters())
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if param.requires_grad:
                own[name].copy_(param)
    return {"peft": theirs, "peftkit": ours}


def measure(models: dict, batch: dict) -> dict:
    with torch.no_grad():
        a = models["peft"](**batch).logits
        b = models["peftkit"](**batch).logits
    results: dict = {"max_rel_err_logits": ((a - b).abs().max() / a.abs().max()).item()}
    steps, infers = {}, {}
    for lib, model in models.items():
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step(model=model, opt=opt):
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def infer(model=model):
            with torch.no_grad():
                model(**batch)

        steps[lib], infers[lib] = step, infer
        results[lib] = {
            "trainable_params": sum(p.numel() for p in params),
            "saved_for_backward_mb": saved_bytes(model, batch) / 2**20,
        }
    times = {lib: {"train_step_s": [], "train_step_cpu_s": [], "inference_s": []} for lib in models}
    for lib in models:
        steps[lib]()  # warm-up
    for _ in range(REPEATS):
        for lib in models:
            cpu = time.process_time()
            times[lib]["train_step_s"].append(median_time(steps[lib], repeats=1, warmup=0))
            times[lib]["train_step_cpu_s"].append(time.process_time() - cpu)
            models[lib].eval()
            times[lib]["inference_s"].append(median_time(infers[lib], repeats=1, warmup=0))
            models[lib].train()
    for lib in models:
        for key, values in times[lib].items():
            results[lib][key] = statistics.median(values)
    for key in ("train_step_s", "train_step_cpu_s", "saved_for_backward_mb", "inference_s"):
        results[f"ratio_{key}"] = results["peftkit"][key] / results["peft"][key]
    return results


def main() -> None:
    from peftkit.checkpoint import atomic_write_text

    base = smollm2_shape(4)
    ids = torch.randint(0, 49152, (4, 64), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    results: dict = {"shape": "SmolLM2-135M (4 layers), batch 4 x seq 64, 2 threads"}
    for method in METHODS:
        results[method] = measure(pair(method, base), batch)
        print(method, json.dumps(results[method], indent=1), flush=True)
    out = os.path.join(os.path.dirname(__file__), "results", "lycoris_ia3.json")
    atomic_write_text(out, json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
