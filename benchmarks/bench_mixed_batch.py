"""Mixed-adapter batch inference, peftkit vs HF PEFT in one process (interleaved, medians).

A batch of 16 rows where rows use 8 different LoRA adapters (r=8 on q/k/v/o) plus the base model.
PEFT loops over sub-batches per adapter in every layer; peftkit gathers each row's factors and runs
two batched einsums. Both must produce the same logits (checked here too).

Run: ``.venv/bin/python benchmarks/bench_mixed_batch.py``; writes ``results/mixed_batch.json``.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import time
import warnings

import torch
from common import smollm2_shape

warnings.filterwarnings("ignore")


def main() -> None:
    import peft

    import peftkit

    base = smollm2_shape(8, tie_word_embeddings=False).eval()
    kw = dict(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        init_lora_weights=False,
    )
    names = [f"a{i}" for i in range(8)]
    ours = peftkit.get_peft_model(
        copy.deepcopy(base), peftkit.LoraConfig(**kw), adapter_name=names[0]
    )
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw), adapter_name=names[0])
    for name in names[1:]:
        ours.add_adapter(name, peftkit.LoraConfig(**kw))
        theirs.add_adapter(name, peft.LoraConfig(**kw))
    theirs.load_state_dict(ours.state_dict())
    ours.eval(), theirs.eval()
    rows = [names[i % 8] if i % 9 else "__base__" for i in range(16)]
    ids = torch.randint(0, 49152, (16, 64), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {"peftkit": [], "peft": []}
    with torch.no_grad():
        a = ours(input_ids=ids, adapter_names=rows).logits
        b = theirs(input_ids=ids, adapter_names=rows).logits
        max_rel = ((a - b).abs().max() / b.abs().max()).item()
        for _ in range(7):
            for lib, model in (("peftkit", ours), ("peft", theirs)):
                t = time.perf_counter()
                model(input_ids=ids, adapter_names=rows)
                times[lib].append(time.perf_counter() - t)
    result = {
        "setup": "Llama 576 hidden x 8 layers, 8 adapters + base, batch 16 x 64",
        "max_relative_error": max_rel,
        "peftkit_s": statistics.median(times["peftkit"][1:]),
        "peft_s": statistics.median(times["peft"][1:]),
    }
    result["peftkit_over_peft"] = result["peftkit_s"] / result["peft_s"]
    print(json.dumps(result, indent=2))
    out = os.path.join(os.path.dirname(__file__), "results", "mixed_batch.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as fh:
        json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
