"""What a 4-bit load holds, and what QLoRA saves in the trainer (issue 16).

Part ``load``: a 1.1B Llama shape (TinyLlama's: hidden 2048, 22 layers, vocab 32000, untied head)
with random weights saved in bf16 (~2.1 GB safetensors, written once to ``--folder``, default
``/tmp/peftkit_llama1b_bf16``; never committed) is loaded in NF4 + double quantisation, bf16
compute, each way in a fresh interpreter:

* ``peftkit``      ``load_base_model(folder, dtype="bfloat16", quantization="nf4")``: quantised
                   tensor by tensor while loading (:mod:`peftkit.quant.load`);
* ``peftkit_old``  what it did before: ``from_pretrained`` then ``quantize_model``;
* ``transformers_bnb``  ``from_pretrained(quantization_config=BitsAndBytesConfig(nf4, double
                   quant), device_map="cpu")``: transformers + bitsandbytes on the CPU.

Reported: load time, then RSS, anonymous (RssAnon) and file-backed (RssFile) MB after the load
and the RSS peak during it (VmHWM), each with and without the interpreter's own baseline
(torch + transformers imported, the tokenizer loaded and the model's code imported: the Llama
modeling module and the loader's own modules; the numbers with the libraries alone are in the JSON
as ``libraries``), and the bytes of the model's tensors.

Part ``trainer``: the twitter_complaints recipe on the bundled SmolLM2-135M through the
trainer (``peftkit train``), LoRA vs QLoRA on the same targets (q_proj, v_proj), batch 8,
``--epochs`` epochs (default 3: 15 steps, as the issue measured), no zero-shot eval and no
test split, with and without gradient checkpointing, the trainer's ``trim_heap`` set to
``--trim-heap`` (default head); the peaks (RSS and anonymous) and the memory held before
training, from each run's summary.json / memory report, and each run's training time.

Run: ``.venv/bin/python benchmarks/bench_qlora_load.py [--parts load,trainer]``; prints tables
and writes ``benchmarks/results/qlora_load.json``. Times depend on what else the CPU runs;
memory does not.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "qlora_load.json"
ROOT = Path(__file__).resolve().parents[1]
LOAD_MODES = ("peftkit", "peftkit_old", "transformers_bnb")
MB = 2**20


def status_mb() -> dict[str, float]:
    text = Path("/proc/self/status").read_text()
    return {
        k: int(re.search(rf"^{k}:\s+(\d+)", text, re.M).group(1)) / 1024
        for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile")
    }


def make_checkpoint(folder: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
    )
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)


def load_worker(mode: str, folder: str) -> dict:
    import torch

    torch.set_num_threads(2)
    import transformers  # noqa: F401  (the baseline includes the libraries)

    from peftkit.models import load_base_model, tokenizer_folder

    # The tokenizer first, in every mode (its library is part of the runtime, ~100 MB of
    # anonymous memory for SmolLM2's): what follows is the model's load alone.
    libs = status_mb()
    tok = tokenizer_folder("smollm2-135m")  # random weights: any Llama tokenizer will do
    transformers.AutoTokenizer.from_pretrained(tok)
    # The code that holds the model is runtime too (~57 MB RSS, 34 MB anonymous): the modeling
    # module and the loader's own modules are imported before the snapshot, in every mode.
    import transformers.models.llama.modeling_llama  # noqa: F401

    if mode.startswith("peftkit"):
        import peftkit.quant.load  # noqa: F401
        import peftkit.tasks  # noqa: F401
    else:
        import bitsandbytes  # noqa: F401
    Path("/proc/self/clear_refs").write_text("5")
    before = status_mb()
    start = time.perf_counter()
    if mode == "peftkit":
        model, _ = load_base_model(
            folder, dtype="bfloat16", quantization="nf4", tokenizer_name_or_path=tok
        )
    elif mode == "peftkit_old":
        from transformers import AutoModelForCausalLM

        from peftkit.quant import quantize_model

        model = quantize_model(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16))
    else:
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        bnb = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        model = AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=bnb, dtype=torch.bfloat16, device_map="cpu"
        )
    seconds = time.perf_counter() - start
    after = status_mb()
    seen, tensor_bytes = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            tensor_bytes += t.numel() * t.element_size()
    with torch.no_grad():
        ids = torch.arange(16)[None]
        finite = bool(torch.isfinite(model(ids).logits.float()).all())
    return {
        "mode": mode,
        "load_s": round(seconds, 1),
        "tensors_mb": round(tensor_bytes / MB),
        "libraries": {k: round(v) for k, v in libs.items()},
        "before": {k: round(v) for k, v in before.items()},
        "after": {k: round(v) for k, v in after.items()},
        "peak_rss_mb": round(after["VmHWM"]),
        "forward_finite": finite,
    }


def part_load(folder: Path, modes: list[str]) -> dict:
    if (
        not (folder / "model.safetensors.index.json").is_file()
        and not (folder / "model.safetensors").is_file()
    ):
        print(f"writing the 1.1B bf16 checkpoint to {folder} ...", flush=True)
        subprocess.run(
            [sys.executable, __file__, "--make-checkpoint", str(folder)], check=True, cwd=ROOT
        )
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / MB
    runs = {}
    for mode in modes:
        print(f"loading: {mode} ...", flush=True)
        out = subprocess.run(
            [sys.executable, __file__, "--load-worker", mode, str(folder)],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        if out.returncode:
            runs[mode] = {"mode": mode, "error": out.stderr[-2000:]}
            print(out.stderr[-2000:])
            continue
        runs[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\n1.1B Llama shape, bf16 safetensors {size:,.0f} MB, NF4 + double quant, 2 threads")
    print(
        f"{'loader':18} {'load s':>7} {'tensors':>8} {'RSS':>6} {'anon':>6} {'file':>6} "
        f"{'peak RSS':>9} {'RSS-start':>10} {'anon-start':>11}"
    )
    for mode, r in runs.items():
        if "error" in r:
            print(f"{mode:18} failed")
            continue
        a, b = r["after"], r["before"]
        print(
            f"{mode:18} {r['load_s']:7.1f} {r['tensors_mb']:8} {a['VmRSS']:6} {a['RssAnon']:6} "
            f"{a['RssFile']:6} {r['peak_rss_mb']:9} {a['VmRSS'] - b['VmRSS']:10} "
            f"{a['RssAnon'] - b['RssAnon']:11}"
        )
    return {"checkpoint_mb": round(size), "runs": runs}


TRAINER_RUNS = {
    "lora": ("examples/lora_twitter_complaints.yaml", False),
    "qlora": ("examples/qlora_twitter_complaints.yaml", False),
    "lora_gc": ("examples/lora_twitter_complaints.yaml", True),
    "qlora_gc": ("examples/qlora_twitter_complaints.yaml", True),
}


def part_trainer(
    out_root: Path,
    names: list[str],
    malloc_mmap_threshold: int | None,
    trim_heap: str = "head",
    epochs: int = 3,
) -> dict:
    """The trainer runs ``names``; with ``malloc_mmap_threshold`` (bytes) each runs with glibc's
    ``MALLOC_MMAP_THRESHOLD_`` fixed there: blocks above it are mapped on their own and returned
    on free (no heap fragmentation), paid for with a page fault per page on every allocation.
    ``trim_heap``: the trainer key of that name (head | blocks | none: where free heap pages are
    given back each training forward; see peftkit.heap)."""
    runs = {}
    env = dict(os.environ)
    if malloc_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(malloc_mmap_threshold)
    for name in names:
        recipe, checkpointing = TRAINER_RUNS[name]
        out = out_root / name
        cmd = [sys.executable, "-m", "peftkit", "train", recipe, "--overwrite"]
        cmd += [
            f"epochs={epochs}",
            "eval_before_training=false",
            "data.test=null",
            "method.target_modules=[q_proj,v_proj]",
            f"gradient_checkpointing={str(checkpointing).lower()}",
            f"trim_heap={trim_heap}",
            "num_threads=2",
            "progress=false",
            "tensorboard=false",
            f"output_dir={out}",
        ]
        print(f"trainer: {name} ...", flush=True)
        start, children = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode:
            runs[name] = {"error": proc.stderr[-3000:]}
            print(proc.stderr[-3000:])
            continue
        summary = json.loads((out / "summary.json").read_text())
        train = [m for m in summary["memory"] if m["phase"] == "train"][0]
        runs[name] = {
            "recipe": recipe,
            "gradient_checkpointing": checkpointing,
            "wall_s": round(time.perf_counter() - start, 1),
            "steps": summary["global_step"],
            "peak_rss_mb": summary["peak_cpu_mb"],
            "peak_anon_mb": summary.get("peak_cpu_anon_mb"),
            "before_train_rss_mb": train["cpu_begin"],
            "before_train_anon_mb": train.get("cpu_anon_begin"),
            "train_peak_rss_mb": train["cpu_peak"],
            "train_peak_anon_mb": train.get("cpu_anon_peak"),
            "eval": summary.get("eval"),
            "train_time_s": summary.get("train_time_s"),
            "cpu_user_s": round(after.ru_utime - children.ru_utime, 1),
            "cpu_sys_s": round(after.ru_stime - children.ru_stime, 1),
        }
    print(f"\nSmolLM2-135M twitter_complaints, q_proj+v_proj r=8, batch 8, {epochs} epochs")
    print(
        f"{'run':9} {'GC':>3} {'before RSS':>10} {'before anon':>11} {'peak RSS':>9} "
        f"{'peak anon':>9} {'wall s':>7}"
    )
    for name, r in runs.items():
        if "error" in r:
            print(f"{name:9} failed")
            continue
        print(
            f"{name:9} {'yes' if r['gradient_checkpointing'] else 'no':>3} "
            f"{r['before_train_rss_mb']:10} {r['before_train_anon_mb']:11} "
            f"{r['peak_rss_mb']:9} {r['peak_anon_mb']:9} {r['wall_s']:7.1f}"
        )
    return {
        "setup": f"twitter_complaints recipes, epochs={epochs}, eval_before_training=false, "
        "data.test=null, method.target_modules=[q_proj,v_proj], num_threads=2",
        "malloc_mmap_threshold": malloc_mmap_threshold,
        "trim_heap": trim_heap,
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="load,trainer")
    parser.add_argument("--folder", default="/tmp/peftkit_llama1b_bf16")
    parser.add_argument("--load-modes", default=",".join(LOAD_MODES))
    parser.add_argument("--trainer-runs", default=",".join(TRAINER_RUNS))
    parser.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        help="trainer runs with MALLOC_MMAP_THRESHOLD_ fixed at this many bytes (e.g. 131072); "
        "stored as trainer_smollm2_mmap<N>",
    )
    parser.add_argument("--epochs", type=int, default=3, help="trainer runs' epochs")
    parser.add_argument(
        "--trim-heap",
        default="head",
        choices=("head", "blocks", "none"),
        help="the trainer's trim_heap; other than head, stored as trainer_smollm2[...]_trim<VALUE>",
    )
    parser.add_argument("--make-checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--load-worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make_checkpoint:
        make_checkpoint(Path(args.make_checkpoint))
        return
    if args.load_worker:
        print(json.dumps(load_worker(*args.load_worker)))
        return
    parts, new = args.parts.split(","), {}
    if "load" in parts:
        new["load_1b1_bf16"] = part_load(Path(args.folder), args.load_modes.split(","))
    if "trainer" in parts:
        with tempfile.TemporaryDirectory(prefix="peftkit-bench-") as tmp:
            key = "trainer_smollm2"
            if args.malloc_mmap_threshold:
                key += f"_mmap{args.malloc_mmap_threshold}"
            if args.trim_heap != "head":
                key += f"_trim{args.trim_heap}"
            new[key] = part_trainer(
                Path(tmp),
                args.trainer_runs.split(","),
                args.malloc_mmap_threshold,
                trim_heap=args.trim_heap,
                epochs=args.epochs,
            )
    payload = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}  # other parts kept
    payload["note"] = "memory in MB (2**20); times on a shared 2-core CPU, indicative only"
    payload.update(new)
    # imported here, not at the top: the load workers' runtime baseline stays as it was
    from peftkit.checkpoint import atomic_write_text

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(str(RESULTS), json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
