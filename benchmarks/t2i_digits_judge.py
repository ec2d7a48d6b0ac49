"""The text-to-image real run, part 2: judge the LoRA run on more samples than its evaluation did.

After ``peftkit train examples/lora_t2i_digits_minilm.yaml`` (part 1: t2i_digits_base.py), this
samples ``--samples`` images per digit prompt with the adapter disabled (the base model) and
enabled, from the same seeds, and lets the judge label them::

    run folder ──load_for_inference──> PeftModel(TextToImageUNet)   prompts "a handwritten {d}"
      with model.disable_adapter(): sample ──judge──> share recognised per digit (before)
      sample ──judge──> share recognised per digit (after)

Writes ``benchmarks/results/<name>_<method>.json`` (the shares, the run's training numbers
from its summary.json; ``<name>``: ``--name``, ``<method>``: the run's ``method.type``, e.g.
``t2i_digits_lora``, ``t2i_digits_loha``, ``t2i_digits_lokr``) and copies the run's sample grids,
loss curve and share-recognised curve into ``docs/<name>_<method>_*.png`` (small PNGs).
Usage: ``python benchmarks/t2i_digits_judge.py [RUN] [--name t2i_digits|t2i_digits_latent]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a handwritten {}"


def shares(model, task, ctx, samples: int, seed: int) -> dict[str, float]:
    digits = [str(d) for d in range(10)]
    prompts = [PROMPT.format(d) for d in digits for _ in range(samples)]
    seeds = [seed + i for i in range(len(prompts))]
    labels = task.judge.classify(task._sample(ctx, prompts, seeds))
    return {
        d: sum(p == d for p in labels[k * samples : (k + 1) * samples]) / samples
        for k, d in enumerate(digits)
    }


def main() -> None:
    from peftkit.tasks import EvalContext
    from peftkit.train.inference import find_target, load_for_inference, run_config, spec_for

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", nargs="?", default=str(ROOT / "runs" / "lora_t2i_digits_minilm"))
    p.add_argument("--samples", type=int, default=32, help="images per digit prompt")
    p.add_argument("--seed", type=int, default=5000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--name",
        default="t2i_digits",
        help="file prefix: t2i_digits (pixel run) or t2i_digits_latent (the latent run of "
        "t2i_digits_latent_base.py): reads <name>_base.json, writes <name>_<method>.json and "
        "docs/<name>_<method>_*.png (<method>: the run's method.type)",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    target = find_target(run)
    config = run_config(target)
    loaded = load_for_inference(target, config, spec_for(config))
    ctx = EvalContext(model=loaded.model, device=torch.device("cpu"), batch_size=40)
    with loaded.model.disable_adapter():
        before = shares(loaded.model, loaded.task, ctx, args.samples, args.seed)
    after = shares(loaded.model, loaded.task, ctx, args.samples, args.seed)
    summary = json.loads((run / "summary.json").read_text())
    base = json.loads((ROOT / "benchmarks" / "results" / f"{args.name}_base.json").read_text())

    def others(s: dict[str, float]) -> float:
        return float(np.mean([v for d, v in s.items() if d != "7"]))

    result = {
        "run": str(run),
        "samples_per_prompt": args.samples,
        "judge_test_accuracy": base["judge_test_accuracy"],
        "before": {"7": before["7"], "others_mean": others(before), "per_digit": before},
        "after": {"7": after["7"], "others_mean": others(after), "per_digit": after},
        "training": {
            k: summary.get(k)
            for k in (
                "trainable_params",
                "all_params",
                "global_step",
                "train_time_s",
                "wall_time_s",
                "peak_cpu_mb",
                "adapter_choice",
            )
        },  # fmt: skip
        "run_eval_before": summary.get("before_training"),
        "run_eval_best": summary.get("eval"),
    }
    from peftkit.checkpoint import atomic_write_text

    tag = f"{args.name}_{config.method_type}"  # t2i_digits_lora, t2i_digits_loha, ...
    path = ROOT / "benchmarks" / "results" / f"{tag}.json"
    atomic_write_text(str(path), json.dumps(result, indent=2) + "\n")
    for name, out in (("samples_before.png", "before"), ("samples_after.png", "after"),
                      ("loss.png", "loss"), ("metrics.png", "recognised")):  # fmt: skip
        if (run / name).is_file():
            shutil.copyfile(run / name, ROOT / "docs" / f"{tag}_{out}.png")
    print(json.dumps({k: result[k] for k in ("before", "after", "training")}, indent=2))


if __name__ == "__main__":
    main()
