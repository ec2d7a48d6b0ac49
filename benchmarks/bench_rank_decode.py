"""Generate vs rank decoding of trained classification-as-generation runs, side by side.

For each run folder (``peftkit train`` output, e.g. of ``benchmarks/configs/rank_decode/*.yaml``)
the model and adapter are loaded once and the run's eval rows are labelled three ways, in turn,
``--repeats`` times (so machine load falls on every decoding alike)::

    generate    greedy text after the prompt, matched to a label (task.decode: generate)
    rank_sum    each label's log-likelihood (tokens + EOS) after the prompt, the best one
    rank_mean   the same, per token (task.rank_score: mean): the same ranking pass, each sum
                divided by its label's token count (exactly what rank_score: mean computes),
                so it is not timed separately

Reported per decoding: accuracy, macro-F1, invalid rate (predictions that are no label) and
the median wall time of labelling the rows (decoding only; the teacher-forced loss pass that
every evaluation also runs is left out). Results go to ``benchmarks/results/rank_decode.json``
(one entry per run, merged into what is there).

    PYTHONPATH=$PWD/src .venv/bin/python benchmarks/bench_rank_decode.py runs/rank_decode/sms_lora
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch

from peftkit.checkpoint import atomic_write_text
from peftkit.tasks import EvalContext
from peftkit.train.inference import (
    find_target,
    load_for_inference,
    restore_task_state,
    run_config,
    spec_for,
)
from peftkit.train.splits import load_splits

DECODINGS = {
    "generate": {"decode": "generate"},
    "rank_sum": {"decode": "rank", "rank_score": "sum"},
}
RESULTS = Path(__file__).parent / "results" / "rank_decode.json"


def measure(run: str, repeats: int, batch_size: int | None, use_adapter: bool) -> dict:
    target = find_target(run)
    config = run_config(target)
    spec = restore_task_state(spec_for(config), target)
    if spec is None:
        raise SystemExit(f"{run}: no task_state.json (train the run first)")
    rows = load_splits(config).eval
    loaded = load_for_inference(target, config, spec, use_adapter=use_adapter)
    batch = batch_size or config.eval_batch_size or config.batch_size
    ctx = EvalContext(model=loaded.model, device=torch.device("cpu"), batch_size=batch)
    specs = {
        name: dataclasses.replace(spec, options=dataclasses.replace(spec.options, **options))
        for name, options in DECODINGS.items()
    }
    tasks = {name: s.build(loaded.tokenizer, loaded.model) for name, s in specs.items()}
    times: dict[str, list[float]] = {name: [] for name in tasks}
    predictions: dict[str, list[str]] = {}
    load_before = os.getloadavg()[0]
    ranker = tasks["rank_sum"]
    lengths = [len(c) for c in ranker.target_ids(ranker.label_set.texts)]
    labels = ranker.labels
    for _ in range(repeats):
        start = time.perf_counter()
        predictions["generate"] = tasks["generate"].predict(ctx, rows)
        times["generate"].append(time.perf_counter() - start)
        start = time.perf_counter()
        sums = ranker.label_scores(ctx, rows)  # per row, per label: summed log-likelihood
        predictions["rank_sum"] = [labels[max(range(len(s)), key=s.__getitem__)] for s in sums]
        times["rank_sum"].append(time.perf_counter() - start)
        means = [[v / n for v, n in zip(s, lengths)] for s in sums]
        predictions["rank_mean"] = [labels[max(range(len(s)), key=s.__getitem__)] for s in means]
    times["rank_mean"] = times["rank_sum"]
    tasks["rank_mean"] = ranker
    out: dict = {
        "run": run,
        "adapter": use_adapter,
        "rows": len(rows),
        "labels": list(labels or []),
        "label_tokens": lengths,
        "batch_size": batch,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "decodings": {},
    }
    for name, task in tasks.items():
        metrics = task.score(rows, predictions[name], eval_loss=0.0).metrics
        seconds = statistics.median(times[name])
        out["decodings"][name] = {
            "accuracy": round(metrics["accuracy"], 4),
            "macro_f1": round(metrics["macro_f1"], 4),
            "invalid_rate": round(metrics["invalid_rate"], 4),
            "time_s": round(seconds, 2),
            "times_s": [round(t, 2) for t in times[name]],
            "ms_per_row": round(1000 * seconds / max(len(rows), 1), 1),
        }
    gen = out["decodings"]["generate"]["time_s"]
    for name in ("rank_sum", "rank_mean"):
        out["decodings"][name]["time_vs_generate"] = round(
            out["decodings"][name]["time_s"] / gen, 3
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--batch-size", type=int, help="default: the run's eval_batch_size")
    parser.add_argument("--no-adapter", action="store_true", help="the base model (zero-shot)")
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    for run in args.runs:
        entry = measure(run, args.repeats, args.batch_size, not args.no_adapter)
        entry["commit"] = commit
        key = Path(run).name + ("_zero_shot" if args.no_adapter else "")
        results[key] = entry
        print(json.dumps({key: entry["decodings"]}, indent=1), flush=True)
        atomic_write_text(str(RESULTS), json.dumps(results, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
