"""A real, short AdaLoRA fine-tune: the rank pattern it ends with, and parity with HF PEFT on it.

Model: the bundled SmolLM2-135M-Instruct (real weights). Data: tiny Shakespeare, 64-token chunks,
batch 8. AdaLoRA on q_proj and v_proj of all 30 blocks (60 matrices), init_r=8 -> target_r=4,
``total_step`` steps (30 by default) with a warm-up (``tinit`` = 10%), a cubic budget decay masking every ``deltaT``
steps, and a final phase (``tfinal`` = 20%) at the fixed pattern.

With ``--with-peft`` the same run goes through HF PEFT in lock-step (same seed => same initial
adapter, same batches, AdamW, ``update_and_allocate`` every step) and the script records whether
the two libraries agree on the rank pattern after every step, and how far their losses drift.

Run: ``.venv/bin/python benchmarks/adalora_real_run.py [--with-peft] [--steps 30]``; prints the
rank table, writes ``benchmarks/results/adalora_real_run.json`` and ``adalora_ranks.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
import warnings

import torch

warnings.filterwarnings("ignore")

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "..", "shared", "data", "causal_lm_tinyshakespeare", "input.txt")


def batches(tokenizer, n_train: int, n_eval: int, batch: int = 8, seq: int = 64):
    """Consecutive 64-token chunks of the text: training batches, then held-out eval batches."""
    with open(DATA, encoding="utf-8") as fh:
        text = fh.read()[:200_000]
    ids = torch.tensor(tokenizer(text)["input_ids"])
    chunks = ids[: (len(ids) // seq) * seq].view(-1, seq)  # (N, T)
    need = (n_train + n_eval) * batch
    if len(chunks) < need:
        raise SystemExit(f"only {len(chunks)} chunks of text, need {need}")
    groups = [chunks[i * batch : (i + 1) * batch] for i in range(n_train + n_eval)]
    return groups[:n_train], groups[n_train:]


@torch.no_grad()
def eval_loss(model, groups) -> float:
    model.eval()
    losses = [model(input_ids=g, labels=g).loss.item() for g in groups]
    return sum(losses) / len(losses)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--with-peft", action="store_true")
    parser.add_argument("--tag", default="", help="suffix of the result files (keeps earlier runs)")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 2)

    from peftkit import AdaLoraConfig, get_peft_model
    from peftkit.methods.adalora_report import final_ranks, plot_rank_heatmap, rank_report
    from peftkit.models import load_base_model

    t0 = time.perf_counter()
    base, tokenizer = load_base_model("smollm2-135m", dtype="float32")
    load_s = time.perf_counter() - t0
    train, held_out = batches(tokenizer, args.steps, n_eval=4)
    schedule = dict(
        task_type="CAUSAL_LM",
        target_modules=["q_proj", "v_proj"],
        init_r=8,
        target_r=4,
        lora_alpha=16,
        total_step=args.steps,
        tinit=max(1, args.steps // 10),
        tfinal=max(1, args.steps // 5),
        deltaT=2,
        orth_reg_weight=0.5,
    )
    base_loss = eval_loss(base, held_out)
    models = {}
    twin = copy.deepcopy(base) if args.with_peft else None
    torch.manual_seed(0)
    models["peftkit"] = get_peft_model(base, AdaLoraConfig(**schedule))
    if args.with_peft:
        import peft

        torch.manual_seed(0)
        models["peft"] = peft.get_peft_model(twin, peft.AdaLoraConfig(**schedule))
    opts = {
        k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-3)
        for k, m in models.items()
    }
    log = []
    same_pattern_every_step = True
    step_s = []
    for step, group in enumerate(train, start=1):
        row = {"step": step}
        for name, model in models.items():
            model.train()
            t = time.perf_counter()
            loss = model(input_ids=group, labels=group).loss
            loss.backward()
            opts[name].step()
            budget = model.base_model.update_and_allocate(step)
            opts[name].zero_grad()
            if name == "peftkit":
                step_s.append(time.perf_counter() - t)
                row["budget"] = budget
            row[f"{name}_loss"] = round(loss.item(), 5)
        if args.with_peft:
            # both keep PEFT's in-memory keys: <module>.lora_E.<adapter name>
            ours, theirs = (
                {k: list(v) for k, v in (m.peft_config["default"].rank_pattern or {}).items()}
                for m in (models["peftkit"], models["peft"])
            )
            row["same_pattern"] = ours == theirs
            same_pattern_every_step &= ours == theirs
        log.append(row)
        print(row, flush=True)

    ours = models["peftkit"]
    table = rank_report(ours)
    print(table)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    png = plot_rank_heatmap(ours, os.path.join(HERE, "results", f"adalora_ranks{args.tag}.png"))
    result = {
        "model": "SmolLM2-135M-Instruct (bundled GGUF, fp32)",
        "data": "tiny Shakespeare, batch 8 x seq 64",
        "config": schedule,
        "load_s": round(load_s, 1),
        "load_avg_1min_at_end": round(
            os.getloadavg()[0], 2
        ),  # the machine is shared: step times vary
        "median_step_s": round(sorted(step_s)[len(step_s) // 2], 2),
        "held_out_loss": {
            "base": round(base_loss, 4),
            "peftkit": round(eval_loss(ours, held_out), 4),
        },
        "final_ranks": final_ranks(ours),
        "rank_pattern": ours.peft_config["default"].rank_pattern,
        "rank_table": table,
        "log": log,
        "heatmap": os.path.relpath(png, HERE),
    }
    if args.with_peft:
        # PEFT adds the orthogonality penalty to every returned loss, eval included; peftkit only
        # in training. The transformers model inside PEFT's wrapper gives the plain eval loss.
        result["held_out_loss"]["peft (penalty included, as PEFT reports it)"] = round(
            eval_loss(models["peft"], held_out), 4
        )
        result["held_out_loss"]["peft"] = round(
            eval_loss(models["peft"].base_model.model, held_out), 4
        )
        result["same_rank_pattern_every_step_as_peft"] = same_pattern_every_step
        result["max_train_loss_rel_diff_vs_peft"] = max(
            abs(r["peftkit_loss"] - r["peft_loss"]) / abs(r["peft_loss"]) for r in log
        )
    with open(os.path.join(HERE, "results", f"adalora_real_run{args.tag}.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    print(
        json.dumps(
            {
                k: v
                for k, v in result.items()
                if k not in ("log", "rank_pattern", "final_ranks", "rank_table")
            }
        )
    )


if __name__ == "__main__":
    main()
