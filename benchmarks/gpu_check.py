"""What the seed's sharding and QLoRA chapters look like on a GPU, in one command (<= 8 min on
one 80 GB GPU). Nothing here is needed on CPU machines; `--smoke` runs the same code paths on a
tiny model on the CPU, which the test suite does not (it is a benchmark).

    pip install deepspeed bitsandbytes          # beside torch (CUDA), transformers, accelerate
    PYTHONPATH=src python benchmarks/gpu_check.py [--out DIR]
    PYTHONPATH=src python benchmarks/gpu_check.py --smoke     # the code paths, CPU, seconds

Part ``memory``: the seed recipe (``examples/seed_bloomz560m_zero3.yaml``: LoRA r=8 on
query_key_value, twitter_complaints) on a random-weight model of bloomz-560m's exact shape in
bf16, 3 optimizer steps and one evaluation, launched as a user would (``torchrun -m peftkit
train``), once as plain 1-process DDP and once as ZeRO-3 with CPU offload; prints each run's
PEFT-style memory lines (GPU memory before / consumed / peak per phase, the step parts) and a
per-phase table of GPU and CPU peaks.

Part ``qlora``: peftkit's NF4 ``Linear4bit`` on CUDA against bitsandbytes' ``Linear4bit`` (the
same weight; bf16 compute; forward + backward to the input at batch 8 x 128, bloomz-560m's
linear shapes): largest relative output difference, and the time ratio (medians).

Results: ``DIR/gpu_check.json`` (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
QLORA_SHAPES = {  # bloomz-560m's linear layers (in, out)
    "query_key_value 1024->3072": (1024, 3072),
    "dense_h_to_4h 1024->4096": (1024, 4096),
    "dense_4h_to_h 4096->1024": (4096, 1024),
}


def recipe(model: str, out: Path, strategy: str, offload: str, smoke: bool) -> Path:
    from peftkit.train.config import resolve_path

    seed = ROOT / "examples" / "seed_bloomz560m_zero3.yaml"
    config = yaml.safe_load(seed.read_text())
    data = config["data"]["train"]
    found = resolve_path(data["path"], str(seed.parent))  # as `peftkit train` finds it
    if found is None:
        sys.exit(f"gpu_check: the recipe's data {data['path']} is not here (../shared/data)")
    data["path"] = str(found.resolve())
    config["model"] = {"name": model, "dtype": "float32" if smoke else "bfloat16"}
    config["distributed"] = {"strategy": strategy, "offload": offload}
    config.update(
        output_dir=str(out),
        max_steps=3,
        epochs=1,
        eval_every_epoch=False,
        mixed_precision="no" if smoke else "bf16",
        progress=False,
        plots=False,
        tensorboard=False,
    )
    if smoke:
        config["method"]["target_modules"] = ["q_proj", "v_proj"]
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(config))
    return path


def part_memory(model: str, root: Path, smoke: bool) -> dict:
    from bench_scaling import phase_peaks

    rows = {}
    for strategy, offload in (("ddp", "none"), ("zero3", "cpu")):
        name = f"{strategy}{'+offload' if offload != 'none' else ''}"
        out = root / name
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        launch += ["--nproc-per-node=1", "-m", "peftkit", "train"]
        start = time.perf_counter()
        proc = subprocess.run(
            [*launch, str(recipe(model, out, strategy, offload, smoke))],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            rows[name] = {"error": (proc.stderr or proc.stdout)[-2000:]}
            print(f"{name}: FAILED\n{rows[name]['error']}", flush=True)
            continue
        summary = json.loads((out / "summary.json").read_text())
        gpu = {}
        for entry in summary["memory"]:
            phase = entry["phase"]
            if entry.get("gpu_peak") is not None:
                gpu[phase] = max(gpu.get(phase, 0), entry["gpu_peak"])
            for part, value in (entry.get("gpu_parts") or {}).items():
                gpu[part] = max(gpu.get(part, 0), value)
        lines = [s for s in (out / "train.log").read_text().splitlines() if "Memory" in s]
        print(f"--- {name}: memory lines of the run log ---", flush=True)
        print("\n".join(lines), flush=True)
        rows[name] = {
            "gpu_peak_mb": gpu,
            "cpu_peak_mb": phase_peaks(summary["memory"]),
            "peak_gpu_mb": summary.get("peak_gpu_mb"),
            "peak_cpu_mb": summary.get("peak_cpu_mb"),
            "step_time_s": round(summary["train_time_s"] / max(summary["global_step"], 1), 3),
            "wall_s": round(time.perf_counter() - start, 1),
            "offload_note": summary.get("offload_note"),
        }
    phases = ["load", "adapter", "prepare", "forward", "backward", "optimizer", "eval", "save"]
    print("| run | " + " | ".join(phases) + " | peak GPU / CPU MB |")
    print("|---|" + "---|" * (len(phases) + 1))
    for name, row in rows.items():
        if "error" in row:
            continue
        cells = [f"{row['gpu_peak_mb'].get(p, '-')}" for p in phases]
        print(
            f"| {name} | " + " | ".join(cells) + f" | {row['peak_gpu_mb']} / {row['peak_cpu_mb']} |"
        )
    return rows


def _median_ms(fn, repeats: int, sync) -> float:
    fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def part_qlora(device: torch.device, repeats: int) -> dict:
    import bitsandbytes as bnb

    from peftkit.quant.linear4bit import Linear4bit

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out = {}
    for label, (fan_in, fan_out) in QLORA_SHAPES.items():
        torch.manual_seed(0)
        weight = torch.randn(fan_out, fan_in) * 0.02
        ours = Linear4bit.from_weight(weight, None, "nf4", True, dtype).to(device)
        theirs = bnb.nn.Linear4bit(
            fan_in, fan_out, bias=False, compute_dtype=dtype, quant_type="nf4"
        )
        theirs.weight = bnb.nn.Params4bit(
            weight.clone(), requires_grad=False, quant_type="nf4", compress_statistics=True
        )
        theirs = theirs.to(device)  # bitsandbytes quantises as it moves
        x = torch.randn(8, 128, fan_in, device=device, dtype=dtype)

        def run(layer, x=x):
            xi = x.detach().requires_grad_(True)
            layer(xi).float().sum().backward()
            return xi.grad

        with torch.no_grad():
            a, b = ours(x).float(), theirs(x).float()
            rel = float((a - b).abs().max() / b.abs().max())
        t_ours = _median_ms(lambda o=ours: run(o), repeats, sync)
        t_bnb = _median_ms(lambda t=theirs: run(t), repeats, sync)
        out[label] = {
            "max_rel_output_diff": rel,
            "peftkit_ms": round(t_ours, 3),
            "bnb_ms": round(t_bnb, 3),
            "peftkit_over_bnb": round(t_ours / t_bnb, 3),
        }
        print(
            f"qlora {label}: rel diff {rel:.2e}, peftkit/bnb time {t_ours / t_bnb:.2f}", flush=True
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--parts", default="memory,qlora")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU: code paths")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        sys.exit("gpu_check: no CUDA device visible (use --smoke to run the code paths on CPU)")
    result: dict = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu (smoke)",
        "torch": torch.__version__,
    }
    root = Path(tempfile.mkdtemp(prefix="peftkit-gpu-check-"))
    if "memory" in args.parts:
        if args.smoke:
            sys.path.insert(0, str(ROOT / "tests"))
            from tiny_runs import make_model

            model = make_model("llama", root / "tiny-llama")
        else:
            from bench_scaling import shape_model

            model = shape_model("bloomz-560m")
        result["memory"] = part_memory(str(model), root, args.smoke)
    if "qlora" in args.parts:
        device = torch.device("cuda" if cuda else "cpu")
        result["qlora"] = part_qlora(device, args.repeats if cuda else 2)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / ("gpu_check_smoke.json" if args.smoke else "gpu_check.json")
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {path}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
