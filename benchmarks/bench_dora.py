"""DoRA cost, peftkit vs HF PEFT side by side in one process (medians of repeats, ratios).

Model: a randomly initialised Llama with SmolLM2-135M's shape but 4 layers (weights do not
matter for speed). Batch 4 x seq 64, DoRA r=8 on q/k/v/o, no dropout, 2 threads.

Measured for each library (the two models hold the same tensors):
* a training step (forward + backward + AdamW), median of repeats,
* the memory a step holds: bytes autograd saves for backward in one forward
  (``saved_tensors_hooks``; exact, free of allocator noise; the frozen weights are the same),
* unmerged inference forward,
each timing the median of REPEATS (9) repeats interleaved between the libraries; the step
also in process CPU seconds (less sensitive to other jobs on a shared machine).

Run: ``.venv/bin/python benchmarks/bench_dora.py``; writes ``benchmarks/results/dora.json``.
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
REPEATS = 9  # interleaved repeats per library


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


def wrap(lib: str, base):
    kwargs = dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    if lib == "peft":
        import peft

        return peft.get_peft_model(base, peft.LoraConfig(use_dora=True, **kwargs))
    import peftkit

    return peftkit.get_peft_model(base, peftkit.LoraConfig(use_dora=True, **kwargs))


def main() -> None:
    base = smollm2_shape(4)
    batch_ids = torch.randint(0, 49152, (4, 64))
    batch = {"input_ids": batch_ids, "labels": batch_ids}
    models = {lib: wrap(lib, copy.deepcopy(base)) for lib in ("peft", "peftkit")}
    state = {
        k.replace(".weight", "") if "magnitude" in k else k: v
        for k, v in models["peft"].state_dict().items()
        if "lora_" in k
    }
    own = dict(models["peftkit"].named_parameters())
    with torch.no_grad():  # same adapter tensors in both
        for key, value in state.items():
            own[key].copy_(value)
    with torch.no_grad():
        a = models["peft"](**batch).logits
        b = models["peftkit"](**batch).logits
    max_rel = ((a - b).abs().max() / a.abs().max()).item()

    results: dict = {"shape": "SmolLM2-135M (4 layers), batch 4 x seq 64, r=8 q/k/v/o, 2 threads"}
    results["max_rel_err_logits"] = max_rel
    steps, infers = {}, {}
    for lib, model in models.items():
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step(model=model, opt=opt):
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def infer(model=model):
            with torch.no_grad():
                model(**batch)

        steps[lib], infers[lib] = step, infer
        results[lib] = {"saved_for_backward_mb": saved_bytes(model, batch) / 2**20}
    # Interleaved repeats (peft, peftkit, peft, ...): a busy shared machine slows both alike.
    # CPU seconds of the process beside wall seconds: other jobs on the machine inflate the
    # wall time of whichever library happens to run beside them, far less its CPU time.
    times: dict = {
        lib: {"train_step_s": [], "train_step_cpu_s": [], "inference_s": []} for lib in models
    }
    for lib in models:
        steps[lib]()  # warm-up
    for _ in range(REPEATS):
        for lib in models:
            cpu = time.process_time()
            times[lib]["train_step_s"].append(median_time(steps[lib], repeats=1, warmup=0))
            times[lib]["train_step_cpu_s"].append(time.process_time() - cpu)
            times[lib]["inference_s"].append(median_time(infers[lib], repeats=1, warmup=0))
    for lib in models:
        for key, values in times[lib].items():
            results[lib][key] = statistics.median(values)
    for key in ("train_step_s", "train_step_cpu_s", "saved_for_backward_mb", "inference_s"):
        results[f"ratio_{key}"] = results["peftkit"][key] / results["peft"][key]
    print(json.dumps(results, indent=2))
    out = os.path.join(os.path.dirname(__file__), "results", "dora.json")
    with open(out, "w") as fh:
        json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
