"""Methods side by side as a user runs them: ``peftkit train RECIPE`` for each recipe, one after
the other, then the numbers a user reads off each run's ``summary.json``::

    recipe ──peftkit train --overwrite──> runs/<name>/summary.json
      trainable parameters · held-out accuracy / macro-F1 (and the majority baseline)
      step time = train_time_s / optimizer steps (the loop's own clock: forward, backward and
      optimizer of each step, no evaluation) · peak CPU memory (RSS high-water mark, and its
      anonymous part; and the training phases' own peak) · wall time of the whole command

The machine's 1-minute load average is recorded before and after each run: on a shared machine
step times are only comparable between runs made under a similar load.
Usage: ``python benchmarks/compare_methods.py --name NAME RECIPE.yaml ... [--set K=V ...]
[--collect]`` (``--collect``: read the runs already there instead of training); writes
``benchmarks/results/<NAME>.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from peftkit.checkpoint import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
TIMING = ("overrides", "load_before", "load_after", "command_s")


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def run(recipe: Path, overrides: list[str]) -> dict:
    before = _load()
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "peftkit", "train", str(recipe), *overrides, "--overwrite"]
    subprocess.run(["nice", "-n", "5", *cmd], cwd=ROOT, check=True)
    return {
        "overrides": overrides,
        "load_before": before,
        "load_after": _load(),
        "command_s": round(time.perf_counter() - start, 1),
    }


def collect(recipe: Path, timing: dict | None) -> dict:
    config = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    folder = ROOT / config["output_dir"]
    summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    scores = summary.get("eval") or {}
    steps = summary["global_step"]
    row = {
        "recipe": str(recipe.relative_to(ROOT)),
        "method": summary["method"],
        "model": summary["model"],
        "task": summary["task"],
        "trainable_params": summary["trainable_params"],
        "all_params": summary["all_params"],
        "accuracy": scores.get("accuracy"),
        "macro_f1": scores.get("macro_f1"),
        "zero_shot_accuracy": (summary.get("before_training") or {}).get("accuracy"),
        "baselines": summary.get("baselines"),
        "adapter_choice": summary.get("adapter_choice"),
        "optimizer_steps": steps,
        "train_time_s": summary["train_time_s"],
        "step_time_s": round(summary["train_time_s"] / steps, 4) if steps else None,
        "peak_cpu_mb": summary.get("peak_cpu_mb"),
        # the training phases' own peak (RSS high-water mark while training; per epoch)
        "peak_cpu_train_mb": max(
            (m["cpu_peak"] for m in summary.get("memory", []) if m["phase"] == "train"),
            default=None,
        ),
        "peak_cpu_anon_mb": summary.get("peak_cpu_anon_mb"),
        "wall_time_s": summary.get("wall_time_s"),
    }
    if timing:
        row.update(timing)
    return row


def table(rows: list[dict]) -> str:
    lines = [
        "| method | trainable params | accuracy (macro-F1) | step time | peak CPU memory, training |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        acc = f"{r['accuracy']:.3f} ({r['macro_f1']:.3f})" if r["accuracy"] is not None else "-"
        lines.append(
            f"| {r['method']} | {r['trainable_params']:,} | {acc} | {r['step_time_s']:.2f} s | "
            f"{r['peak_cpu_train_mb']:,} MB |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("recipes", nargs="+", type=Path)
    p.add_argument("--name", required=True, help="benchmarks/results/<name>.json")
    p.add_argument("--collect", action="store_true", help="read existing runs, train nothing")
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="overrides for every run (e.g. data.test=null: skip labelling the test rows)",
    )
    args = p.parse_args()
    recipes = [r.resolve() for r in args.recipes]
    out = ROOT / "benchmarks" / "results" / f"{args.name}.json"
    previous = json.loads(out.read_text(encoding="utf-8")) if out.exists() else {}
    done = {r["recipe"]: r for r in previous.get("runs", [])}
    rows = []
    for recipe in recipes:
        key = str(recipe.relative_to(ROOT))
        kept = {k: v for k, v in done.get(key, {}).items() if k in TIMING}  # --collect: as run
        row = collect(recipe, kept if args.collect else run(recipe, args.set))
        rows.append(row)
        done[key] = row
        result = {"machine": "2 CPU cores shared with other jobs", "runs": list(done.values())}
        atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
