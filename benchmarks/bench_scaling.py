"""Scaling table: one recipe under 1 and 2 processes for each strategy (ddp, zero2, zero3,
zero3 + CPU offload, fsdp), launched as a user would (``torchrun -m peftkit train``).

    python benchmarks/bench_scaling.py                      # a tiny Llama (seconds per run)
    python benchmarks/bench_scaling.py --recipe examples/seed_bloomz560m_zero3.yaml \\
        --set model.name=smollm2-135m --set 'method.target_modules=[q_proj,v_proj]' --steps 6

Per run: step time (train time / optimizer steps; the first step, with DeepSpeed's set-up,
included), each rank's peak CPU (GPU) MB from summary.json. Results: benchmarks/results/
scaling.json (--out to change).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
VARIANTS = [  # (strategy, offload)
    ("ddp", "none"),
    ("zero2", "none"),
    ("zero3", "none"),
    ("zero3", "cpu"),
    ("fsdp", "none"),
]


def tiny_recipe(root: Path) -> dict:
    sys.path.insert(0, str(HERE.parent / "tests"))
    from tiny_runs import base_config, make_model, method_block, write_corpus

    make_model("llama", root / "llama")
    write_corpus(root / "corpus.txt", n=200)
    task = {"type": "causal_lm", "block_size": 32}
    data = {"train": {"path": str(root / "corpus.txt"), "text_split": "line"}}
    return base_config(root / "llama", root / "out", task, data, method_block("lora"))


def run(
    recipe: dict,
    root: Path,
    name: str,
    processes: int,
    steps: int,
    batch: int,
    threads: int | None = None,
) -> dict:
    config = dict(recipe)
    strategy, offload = name.split("+") if "+" in name else (name, "none")
    config.update(
        output_dir=str(root / f"{name}-{processes}"),
        max_steps=steps,
        epochs=1,
        batch_size=batch // processes,  # the same global batch
        eval_every_epoch=False,
        plots=False,
        tensorboard=False,
        progress=False,
        num_threads=threads or max(1, (os.cpu_count() or 2) // processes),
        distributed={"strategy": strategy, "offload": offload},
    )
    config.setdefault("data", {}).pop("test", None)
    path = root / f"{name}-{processes}.yaml"
    path.write_text(yaml.safe_dump(config))
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    launch += [f"--nproc_per_node={processes}", "-m", "peftkit", "train", str(path)]
    proc = subprocess.run(launch, capture_output=True, text=True)
    if proc.returncode != 0:
        return {
            "strategy": strategy,
            "offload": offload,
            "processes": processes,
            "error": (proc.stderr or proc.stdout)[-500:],
        }
    summary = json.loads((root / f"{name}-{processes}" / "summary.json").read_text())
    return {
        "strategy": summary["strategy"],
        "offload": summary["offload"],
        "processes": summary["world_size"],
        "steps": summary["global_step"],
        "step_time_s": round(summary["train_time_s"] / max(summary["global_step"], 1), 3),
        "rank_peaks": summary["rank_peaks"],
        "wall_time_s": summary["wall_time_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", help="a run YAML (default: a tiny Llama built here)")
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE override")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8, help="global batch")
    parser.add_argument("--processes", default="1,2")
    parser.add_argument(
        "--threads",
        type=int,
        help="threads per process (default: the CPUs shared out; on a busy machine 1 each "
        "compares processes at equal compute)",
    )
    parser.add_argument(
        "--variants",
        default=",".join(s + (f"+{o}" if o != "none" else "") for s, o in VARIANTS),
        help="strategies to run, e.g. ddp,zero3,zero3+cpu",
    )
    parser.add_argument("--out", default=str(HERE / "results" / "scaling.json"))
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="peftkit-scaling-"))
    if args.recipe:
        from peftkit.train.config import apply_overrides, read_yaml, resolve_path

        recipe = apply_overrides(read_yaml(args.recipe), args.set)
        for split in ("train", "eval", "test"):  # found as `peftkit train` finds them
            source = (recipe.get("data") or {}).get(split)
            if isinstance(source, dict) and source.get("path"):
                found = resolve_path(source["path"], str(Path(args.recipe).parent))
                if found is not None:
                    source["path"] = str(found.resolve())
    else:
        recipe = tiny_recipe(root)
    rows = []
    for processes in [int(p) for p in args.processes.split(",")]:
        for name in args.variants.split(","):
            row = run(recipe, root, name, processes, args.steps, args.batch, args.threads)
            rows.append(row)
            peaks = " ".join(
                f"r{p['rank']}={p['cpu_peak_mb']}MB (anon {p.get('cpu_anon_peak_mb')})"
                for p in row.get("rank_peaks", [])
            )
            print(
                f"{processes} proc {name:10s} step {row.get('step_time_s', 'ERR')} s  {peaks}",
                row.get("error", ""),
                flush=True,
            )
    result = {
        "recipe": args.recipe or "tiny llama (tests/tiny_runs.py)",
        "overrides": args.set,
        "global_batch": args.batch,
        "steps": args.steps,
        "cpus": os.cpu_count(),
        "threads_per_process": args.threads or "cpus / processes",
        "runs": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
