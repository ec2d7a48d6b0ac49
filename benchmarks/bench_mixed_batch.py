"""Mixed-adapter batch inference against the base model and HF PEFT, in one process.

A model holding N LoRA adapters (r=8 on q/k/v/o, random non-zero factors) runs one batch of 32
rows of 64 tokens in which every ninth row asks for the base model (``"__base__"``) and the
others cycle through the adapters (8 adapters: each used by ~3 rows; 64 adapters: 28 distinct
ones in the batch). The forward is a serving prefill: the backbone over every token and the
logits of the last one (``logits_to_keep=1``), so the LM head's matmul over the whole vocabulary
does not dilute the adapters' share.

Cases, timed in interleaved rounds after a warm-up (median wall ms and process CPU ms):

* ``floor``      the base model without adapters (what any serving stack pays);
* ``peftkit_N``  ``model(input_ids, adapter_names=rows)``: one batched update per layer;
* ``peft_N``     the same call on HF PEFT (a loop over sub-batches per adapter in every layer).

Correctness: the logits of the mixed batch against each row run alone with its adapter set
(``set_adapter``, or the adapters disabled for base rows), and against PEFT's mixed batch.

Run: ``.venv/bin/python benchmarks/bench_mixed_batch.py [--layers 8 --repeats 5]``; writes
``results/mixed_batch.json``.
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
from common import smollm2_shape

warnings.filterwarnings("ignore")
BATCH, SEQ = 32, 64


def rows_for(names: list[str]) -> list[str]:
    return [names[i % len(names)] if i % 9 else "__base__" for i in range(BATCH)]


def build(lib, base: torch.nn.Module, names: list[str], kw: dict) -> torch.nn.Module:
    model = lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(**kw), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, lib.LoraConfig(**kw))
    return model.eval()


def alone(model, ids: torch.Tensor, rows: list[str]) -> torch.Tensor:
    """Each row through its own adapter, one row at a time: the reference for a mixed batch."""
    out = []
    for i, name in enumerate(rows):
        if name == "__base__":
            with model.disable_adapter():
                out.append(model(input_ids=ids[i : i + 1], logits_to_keep=1).logits)
        else:
            model.set_adapter(name)
            out.append(model(input_ids=ids[i : i + 1], logits_to_keep=1).logits)
    return torch.cat(out)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def main() -> None:
    import peft

    import peftkit

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--adapters", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    base = smollm2_shape(args.layers, tie_word_embeddings=False).eval()
    kw = dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    kw["init_lora_weights"] = False  # random B as well: every adapter changes the output
    ids = torch.randint(0, 49152, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    calls = {"floor": lambda: base(input_ids=ids, logits_to_keep=1)}
    checks = {}
    with torch.no_grad():
        for n in args.adapters:
            names = [f"a{i}" for i in range(n)]
            torch.manual_seed(n)
            ours = build(peftkit, base, names, kw)
            theirs = build(peft, base, names, kw)
            theirs.load_state_dict(ours.state_dict())
            rows = rows_for(names)
            mixed = ours(input_ids=ids, adapter_names=rows, logits_to_keep=1).logits
            checks[f"{n}_adapters"] = {
                "distinct_adapters_in_batch": len(set(rows) - {"__base__"}),
                "base_rows": rows.count("__base__"),
                "max_rel_vs_each_row_alone": rel(mixed, alone(ours, ids, rows)),
                "max_rel_vs_peft_mixed": rel(
                    mixed, theirs(input_ids=ids, adapter_names=rows, logits_to_keep=1).logits
                ),
            }
            calls[f"peftkit_{n}"] = lambda m=ours, r=rows: m(
                input_ids=ids, adapter_names=r, logits_to_keep=1
            )
            calls[f"peft_{n}"] = lambda m=theirs, r=rows: m(
                input_ids=ids, adapter_names=r, logits_to_keep=1
            )
        wall: dict[str, list[float]] = {k: [] for k in calls}
        cpu: dict[str, list[float]] = {k: [] for k in calls}
        for fn in calls.values():
            fn()  # warm-up
        for _ in range(args.repeats):
            for name, fn in calls.items():
                w, c = time.perf_counter(), time.process_time()
                fn()
                cpu[name].append((time.process_time() - c) * 1e3)
                wall[name].append((time.perf_counter() - w) * 1e3)
    med = {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in calls}
    floor_w, floor_c = med["floor"]
    cases = {}
    for name, (w, c) in med.items():
        cases[name] = {"wall_ms": round(w, 1), "cpu_ms": round(c, 1)}
        if name != "floor":
            cases[name]["wall_over_floor"] = round(w / floor_w - 1, 4)
            cases[name]["cpu_over_floor"] = round(c / floor_c - 1, 4)
    for n in args.adapters:
        cases[f"peftkit_{n}"]["peftkit_over_peft_wall"] = round(
            med[f"peftkit_{n}"][0] / med[f"peft_{n}"][0], 3
        )
    result = {
        "setup": f"Llama, SmolLM2-135M widths, {args.layers} layers; LoRA r=8 on q/k/v/o, random "
        f"factors; batch {BATCH} x {SEQ}, every ninth row __base__, logits of the last token",
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "repeats": args.repeats,
        "checks": checks,
        "cases": cases,
    }
    print(json.dumps(result, indent=2))
    out = os.path.join(os.path.dirname(__file__), "results", "mixed_batch.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".tmp", "w") as fh:
        json.dump(result, fh, indent=2)
    os.replace(out + ".tmp", out)


if __name__ == "__main__":
    main()
