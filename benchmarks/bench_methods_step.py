"""Training-step time of the methods README compares, side by side in one process (medians, ratios).

The recipe runs (``benchmarks/compare_methods.py``) give accuracy and memory, but their step
times come from separate runs on a machine shared with other jobs, whose load changed by 2x
between runs. Here the methods of each comparison take turns step by step in one process, so a
busy machine slows them alike, and the ratio to LoRA is the number to read::

    shape        base model (random weights of the recipe's model shape)  batch     methods
    twitter      SmolLM2-135M (Llama, 30 layers), causal LM               8 x 64    lora ia3 prompt_tuning
    sst2         all-MiniLM-L6-v2 (BERT, 6 layers), 2-label classifier    32 x 48   lora ia3 prompt_tuning
    t2i_digits   the digits UNet (~/.cache/peftkit/t2i_digits/base/unet,  16        lora loha lokr
                 make t2i-digits) + a frozen MiniLM-shaped text encoder
                 (8 tokens) run every step, as in the run

Each method's adapter is the recipe's (examples/*.yaml: same targets, ranks, virtual tokens;
the classifier head trains in full under seq_cls, as in the run). A step is forward + backward
+ AdamW; REPEATS rounds, each running every method once, after one warm-up step each.
Run: ``.venv/bin/python benchmarks/bench_methods_step.py [--shape twitter|sst2|t2i_digits]
[--threads 2]``; writes ``benchmarks/results/methods_step.json`` (merged by shape).
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

import peftkit
from peftkit.checkpoint import atomic_write_text

warnings.filterwarnings("ignore")
REPEATS = 7
OUT = Path(__file__).resolve().parent / "results" / "methods_step.json"
MINILM = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
              intermediate_size=1536, max_position_embeddings=512)  # fmt: skip
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


def _twitter():
    base = smollm2_shape(30)
    ids = torch.randint(0, 49152, (8, 64), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    configs = {
        "lora": peftkit.LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.1,
                                   target_modules=["q_proj", "v_proj"]),
        "ia3": peftkit.IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj",
                                 "down_proj"], feedforward_modules=["down_proj"]),
        "prompt_tuning": peftkit.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20),
    }  # fmt: skip
    return base, configs, lambda model: model(**batch).loss


def _sst2():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(**MINILM, num_labels=2))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 30522, (32, 48), generator=gen)
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.randint(0, 2, (32,), generator=gen),
    }
    configs = {
        "lora": peftkit.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.1,
                                   target_modules=["query", "value"]),
        "ia3": peftkit.IA3Config(task_type="SEQ_CLS", target_modules=["key", "value",
                                 "output.dense"], feedforward_modules=["output.dense"]),
        "prompt_tuning": peftkit.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=20),
    }  # fmt: skip
    return base, configs, lambda model: model(**batch).loss


def _t2i_digits():
    from diffusers import UNet2DConditionModel
    from transformers import BertConfig, BertModel

    folder = Path("~/.cache/peftkit/t2i_digits/base/unet").expanduser()
    if not folder.is_dir():
        raise SystemExit(f"{folder} is missing: run `make t2i-digits` first")
    base = UNet2DConditionModel.from_pretrained(folder)
    torch.manual_seed(0)
    encoder = BertModel(BertConfig(**MINILM)).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(16, 1, 16, 16, generator=gen)
    noise = torch.randn(16, 1, 16, 16, generator=gen)
    steps = torch.randint(0, 1000, (16,), generator=gen)
    tokens = torch.randint(0, 30522, (16, 8), generator=gen)

    def loss(model):
        with torch.no_grad():  # the frozen text encoder runs every step, as in the run
            context = encoder(input_ids=tokens).last_hidden_state
        noisy = images + 0.5 * noise  # the schedule's mixing costs nothing beside the UNet
        return torch.nn.functional.mse_loss(model(noisy, steps, context).sample, noise)

    configs = {
        "lora": peftkit.LoraConfig(r=8, lora_alpha=8, target_modules=ATTENTION),
        "loha": peftkit.LoHaConfig(r=4, alpha=4, target_modules=ATTENTION),
        "lokr": peftkit.LoKrConfig(r=8, alpha=8, target_modules=ATTENTION),
    }
    return base, configs, loss


SHAPES = {"twitter": _twitter, "sst2": _sst2, "t2i_digits": _t2i_digits}


def measure(shape: str) -> dict:
    base, configs, loss_of = SHAPES[shape]()
    models, steps = {}, {}
    for name, config in configs.items():
        torch.manual_seed(1)
        model = peftkit.get_peft_model(copy.deepcopy(base), config).train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step(model=model, opt=opt):
            loss_of(model).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        models[name] = {"trainable_params": sum(p.numel() for p in params)}
        steps[name] = step
    for step in steps.values():
        step()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in steps}
    load_before = os.getloadavg()[0]
    for _ in range(REPEATS):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    result = {
        "threads": torch.get_num_threads(),
        "repeats": REPEATS,
        "load_before": round(load_before, 2),
        "load_after": round(os.getloadavg()[0], 2),
    }
    first = next(iter(steps))
    for name, values in times.items():
        result[name] = {
            **models[name],
            "step_s_median": round(statistics.median(values), 4),
            "step_s_all": [round(v, 4) for v in values],
            f"ratio_to_{first}": round(
                statistics.median(values) / statistics.median(times[first]), 3
            ),
        }
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=list(SHAPES), action="append")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    results["machine"] = "2 CPU cores shared with other jobs (load average recorded per shape)"
    for shape in args.shape or list(SHAPES):
        results[shape] = measure(shape)
        print(shape, json.dumps(results[shape], indent=1), flush=True)
        atomic_write_text(OUT, json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
