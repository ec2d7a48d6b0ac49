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


# Real model shapes with random weights (the checkpoints cannot be fetched here), SmolLM2's
# tokenizer. Built once into peftkit's cache (2.1 GB each in fp32).
SHAPES = {
    # bigscience/bloomz-560m: 24 layers, hidden 1,024, 16 heads, vocab 250,880, tied embeddings
    "bloomz-560m": (
        "BloomConfig",
        dict(vocab_size=250880, hidden_size=1024, n_layer=24, n_head=16),
        ["query_key_value"],
    ),
    # a Llama of the same size whose embeddings are a small part: 16 layers, hidden 1,536,
    # MLP 4,096, 12 heads / 4 KV heads, SmolLM2's vocabulary (49,152), untied
    "llama-554m": (
        "LlamaConfig",
        dict(
            vocab_size=49152,
            hidden_size=1536,
            intermediate_size=4096,
            num_hidden_layers=16,
            num_attention_heads=12,
            num_key_value_heads=4,
            tie_word_embeddings=False,
        ),
        ["q_proj", "v_proj"],
    ),
}


def shape_model(shape: str) -> Path:
    """A folder holding a random-weight model of ``shape`` (see SHAPES), built once."""
    import torch
    import transformers

    from peftkit.models import cache_dir, tokenizer_folder

    config_cls, fields, _ = SHAPES[shape]
    folder = cache_dir() / "bench-shapes" / shape
    if (folder / "model.safetensors").exists() or (folder / "config.json").exists():
        return folder
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_folder("smollm2-135m"))
    config = getattr(transformers, config_cls)(
        **fields,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)
    print(f"built {shape}: {sum(p.numel() for p in model.parameters()):,d} parameters -> {folder}")
    return folder


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
        "phases": phase_peaks(summary["memory"]),
        "strategy": summary["strategy"],
        "offload": summary["offload"],
        "processes": summary["world_size"],
        "steps": summary["global_step"],
        "step_time_s": round(summary["train_time_s"] / max(summary["global_step"], 1), 3),
        "rank_peaks": summary["rank_peaks"],
        "wall_time_s": summary["wall_time_s"],
        "load_average_1min": round(
            os.getloadavg()[0], 1
        ),  # the machine is shared: read times with it
    }


def phase_peaks(memory: list[dict]) -> dict[str, list[int]]:
    """Each phase's peak RSS (MB) per rank, from summary.json's memory entries: load, adapter,
    prepare, the train step's forward / backward / optimizer parts, eval, save (max over
    epochs). The end of ``load`` (what the rank keeps of the model) is ``load_end``."""
    out: dict[str, list[int]] = {}

    def put(name: str, rank: int, value: int | None) -> None:
        if value is None:
            return
        values = out.setdefault(name, [])
        values += [0] * (rank + 1 - len(values))
        values[rank] = max(values[rank], value)

    for entry in memory:
        for rank, numbers in enumerate(entry.get("ranks") or [entry]):
            phase = entry["phase"]
            put(phase, rank, numbers.get("cpu_peak"))
            if phase == "load":
                put("start", rank, numbers.get("cpu_begin"))  # the runtime, before any weight
                put("load_end", rank, numbers.get("cpu_end"))
            for part, value in (numbers.get("cpu_parts") or {}).items():
                put(part, rank, value)
    return out


PHASE_COLUMNS = [
    "start",
    "load_end",
    "load",
    "adapter",
    "prepare",
    "forward",
    "backward",
    "optimizer",
    "eval",
    "save",
]


def table(rows: list[dict]) -> str:
    """The README table: one line per run, each phase's peak per rank (MB, ``r0 / r1``)."""
    head = "| processes | strategy | " + " | ".join(PHASE_COLUMNS) + " | peak | step (s) |"
    lines = [head, "|" + "---|" * (len(PHASE_COLUMNS) + 4)]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['processes']} | {row['strategy']} | error |")
            continue
        name = row["strategy"] + (" + cpu offload" if row["offload"] != "none" else "")
        cells = [" / ".join(f"{v:,d}" for v in row["phases"].get(c, [])) for c in PHASE_COLUMNS]
        peak = " / ".join(f"{p['cpu_peak_mb']:,d}" for p in row["rank_peaks"])
        lines.append(
            f"| {row['processes']} | {name} | "
            + " | ".join(cells)
            + f" | **{peak}** | {row['step_time_s']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", help="a run YAML (default: a tiny Llama built here)")
    parser.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        help="run the recipe on a random-weight model of this shape (built once, cached)",
    )
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
    if args.shape:
        recipe.setdefault("model", {})["name"] = str(shape_model(args.shape))
        recipe.setdefault("method", {})["target_modules"] = SHAPES[args.shape][2]
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
    print(table(rows))
    result = {
        "recipe": args.recipe or "tiny llama (tests/tiny_runs.py)",
        "shape": args.shape,
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
