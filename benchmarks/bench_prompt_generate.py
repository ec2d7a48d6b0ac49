"""Greedy generation with prompt-learning adapters: speed vs the base model, and correctness.

Model: a randomly initialised Llama with SmolLM2-135M's shape (weights do not matter for speed;
``--quick`` keeps 8 of its 30 layers). Batch 4, prompts of 32 tokens (two rows left-padded to
it), 32 new tokens, greedy, no early stop. Adapters: prompt tuning, P-tuning (MLP) and prefix
tuning, 20 virtual tokens each, randomly initialised.

For peftkit and HF PEFT, per method:

* median ``generate`` time over interleaved repeats, and its ratio to the base model's;
* whether the tokens equal the cache-free reference: greedy decoding by one full forward pass
  of peftkit's adapted model per token (whose logits match PEFT's forward, see
  tests/test_prompt_parity.py), positions from the attention mask as ``generate`` uses them;
* whether they equal the base model's tokens (an adapter that is ignored gives the base output).

Run: ``.venv/bin/python benchmarks/bench_prompt_generate.py [--quick] [--repeats N]``;
writes ``benchmarks/results/prompt_generate.json``.
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

BATCH, PROMPT, NEW, VIRTUAL = 4, 32, 32, 20


def generating_model(quick: bool):
    """SmolLM2's shape, generating exactly NEW tokens (no EOS), padding with id 0."""
    model = smollm2_shape(8 if quick else 30, pad_token_id=0).eval()
    model.generation_config.eos_token_id = None  # always NEW tokens
    model.generation_config.pad_token_id = 0
    return model


def batch_inputs() -> dict:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 49152, (BATCH, PROMPT), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    mask[3, :13] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return {"input_ids": ids, "attention_mask": mask}


def configs(lib):
    common = dict(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL)
    return {
        "prompt_tuning": lib.PromptTuningConfig(**common),
        "p_tuning_mlp": lib.PromptEncoderConfig(**common, encoder_hidden_size=128),
        "prefix_tuning": lib.PrefixTuningConfig(**common),
    }


def greedy_reference(model, inputs: dict) -> torch.Tensor:
    """Cache-free greedy decoding with peftkit's forward (one full pass per new token)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    for _ in range(NEW):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False
        ).logits[:, -1]
        ids = torch.cat((ids, logits.argmax(-1, keepdim=True)), dim=1)
        mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
    return ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 layers instead of 30")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (1 avoids contention on a busy shared machine)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import peft

    import peftkit

    base = generating_model(args.quick)
    inputs = batch_inputs()
    kwargs = dict(max_new_tokens=NEW, do_sample=False)
    models = {"base": base}
    for lib_name, lib in (("peftkit", peftkit), ("peft", peft)):
        for method, config in configs(lib).items():
            torch.manual_seed(2)
            models[f"{lib_name}/{method}"] = lib.get_peft_model(copy.deepcopy(base), config).eval()
    for method in configs(peftkit):  # same adapter weights in both libraries
        ours = models[f"peftkit/{method}"].prompt_encoder["default"]
        models[f"peft/{method}"].prompt_encoder["default"].load_state_dict(ours.state_dict())

    outputs, times = {}, {name: [] for name in models}
    with torch.no_grad():
        for name, model in models.items():  # warm-up, and the tokens
            outputs[name] = model.generate(**inputs, **kwargs)[:, -NEW:]
        for _ in range(args.repeats):  # interleaved, so machine load hits all alike
            for name, model in models.items():
                start = time.perf_counter()
                model.generate(**inputs, **kwargs)
                times[name].append(time.perf_counter() - start)
        references = {
            m: greedy_reference(models[f"peftkit/{m}"], inputs)[:, -NEW:] for m in configs(peftkit)
        }

    base_time = statistics.median(times["base"])
    report = {
        "setup": {
            "layers": base.config.num_hidden_layers,
            "batch": BATCH,
            "prompt_tokens": PROMPT,
            "new_tokens": NEW,
            "virtual_tokens": VIRTUAL,
            "threads": torch.get_num_threads(),
            "repeats": args.repeats,
        },
        "base_seconds": base_time,
        "results": {},
    }
    print(f"base model generate: {base_time:.3f} s (median of {args.repeats})")
    print(f"{'adapter':26s} {'seconds':>8s} {'x base':>7s} {'= reference':>12s} {'= base':>7s}")
    for name in models:
        if name == "base":
            continue
        method = name.split("/")[1]
        seconds = statistics.median(times[name])
        row = {
            "seconds": seconds,
            "time_vs_base": seconds / base_time,
            "matches_reference": bool(torch.equal(outputs[name], references[method])),
            "equals_base_output": bool(torch.equal(outputs[name], outputs["base"])),
        }
        report["results"][name] = row
        print(
            f"{name:26s} {seconds:8.3f} {row['time_vs_base']:7.2f} "
            f"{str(row['matches_reference']):>12s} {str(row['equals_base_output']):>7s}"
        )

    out = os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results", "prompt_generate.json"
    )
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
