"""LoRA overhead over the frozen-model floor, peftkit vs HF PEFT, all in one process (issue 12).

Model: a random Llama with SmolLM2-135M's widths (``--layers`` of its 30 layers; every model
shares the same frozen base tensors), batch 8 x 128, LoRA r=16 alpha=32, AdamW.

Cases, each timed for the floor, peftkit and PEFT in interleaved rounds (warm-up round first,
then medians of ``--repeats``), wall and process CPU seconds:

* ``train_*``: forward + backward + AdamW step (``_fastmask``: peftkit with
  ``set_dropout_mask("fast")``, no PEFT column); the floor is the frozen model's forward +
  backward with ``requires_grad`` on the input embeddings only (every input gradient computed,
  no weight gradient, no optimizer). The floor computes slightly MORE than LoRA needs: LoRA never
  needs the gradient of layer 0's input (the embeddings are frozen), the floor does.
* ``infer``: unmerged forward under ``no_grad`` vs the base model.
* ``generate``: greedy ``generate`` (batch 1, 32-token prompt, 32 new tokens) vs the base model.
* ``get_peft_model`` on all linear layers of the full 30-layer model (210 layers).

Memory: bytes autograd saves for backward in one training forward (unique storages: the
activation memory a step holds; exact, free of allocator noise).

Run: ``.venv/bin/python benchmarks/bench_lora_step.py [--layers 8] [--repeats 5]``; writes
``benchmarks/results/lora_step.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
import warnings
from pathlib import Path

import torch
from common import smollm2_shape

from peftkit.methods.dropout_mask import set_dropout_mask

warnings.filterwarnings("ignore")
RESULTS = Path(__file__).parent / "results" / "lora_step.json"
LIBS = ("floor", "peftkit", "peft")
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def sharing_copy(base):
    """A copy of ``base`` whose parameters ARE base's tensors (frozen; saves memory)."""
    with torch.device("meta"):
        model = type(base)(base.config)
    model.load_state_dict(base.state_dict(), assign=True)
    for name, buffer in base.named_buffers():  # non-persistent ones (rotary inv_freq) too
        owner, _, attr = name.rpartition(".")
        model.get_submodule(owner)._buffers[attr] = buffer
    model.tie_weights()
    return model.requires_grad_(False)


def wrap(lib: str, model, targets, dropout: float):
    kw = dict(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=dropout)
    kw["target_modules"] = targets
    if lib == "peftkit":
        import peftkit

        return peftkit.get_peft_model(model, peftkit.LoraConfig(**kw))
    import peft

    return peft.get_peft_model(model, peft.LoraConfig(**kw))


def saved_mb(fn) -> float:
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values()) / 2**20


def timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-peft", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    libs = tuple(lib for lib in LIBS if not (args.skip_peft and lib == "peft"))
    load_start = os.getloadavg()
    base = smollm2_shape(args.layers)
    ids = torch.randint(0, 49152, (8, 128), generator=torch.Generator().manual_seed(0))
    prompt = ids[:1, :32]

    cases = {  # name -> (targets, dropout, dropout mask); PEFT draws nn.Dropout's masks
        "train_all_linear_dropout0.05": (ALL_LINEAR, 0.05, "bernoulli"),
        "train_all_linear_dropout0.05_fastmask": (ALL_LINEAR, 0.05, "fast"),
        "train_all_linear_dropout0": (ALL_LINEAR, 0.0, "bernoulli"),
        "train_qv_dropout0.05": (["q_proj", "v_proj"], 0.05, "bernoulli"),
    }
    case_libs = {  # the fast mask is peftkit's alone: no PEFT column for it
        case: libs if mask == "bernoulli" else libs[:2] for case, (_, _, mask) in cases.items()
    }
    case_libs["infer"] = case_libs["generate"] = libs
    frozen = sharing_copy(base)
    embed = frozen.get_input_embeddings()

    def floor_step():
        emb = embed(ids).detach().requires_grad_(True)
        frozen(inputs_embeds=emb, labels=ids).loss.backward()

    # One case at a time, only its own models alive: with every case's models held at once the
    # same steps ran up to 20% slower (allocator pressure) and 30 layers did not fit in 24 GB.
    saved: dict[str, dict[str, float]] = {}
    times: dict[tuple[str, str], list[tuple[float, float]]] = {}
    groups = {  # timed together -> the model settings they use
        "train_all_linear_dropout0.05": ["train_all_linear_dropout0.05"],
        "train_all_linear_dropout0.05_fastmask": ["train_all_linear_dropout0.05_fastmask"],
        "train_all_linear_dropout0": ["train_all_linear_dropout0", "infer", "generate"],
        "train_qv_dropout0.05": ["train_qv_dropout0.05"],
    }
    for setting, timed_cases in groups.items():
        targets, p, mask = cases[setting]
        fns: dict[tuple[str, str], object] = {(setting, "floor"): floor_step}
        fns[("infer", "floor")] = lambda: _no_grad(frozen, ids)
        fns[("generate", "floor")] = lambda: _generate(frozen, prompt)
        saved[setting] = {
            "floor": saved_mb(
                lambda: frozen(inputs_embeds=embed(ids).detach().requires_grad_(True), labels=ids)
            )
        }
        models = {}
        for lib in case_libs[setting][1:]:
            model = wrap(lib, sharing_copy(base), targets, p).train()
            opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
            models[lib] = model

            def step(model=model, opt=opt, mask=mask):
                set_dropout_mask(mask)
                model.train()
                model(input_ids=ids, labels=ids).loss.backward()
                opt.step()
                opt.zero_grad()
                set_dropout_mask("bernoulli")

            fns[(setting, lib)] = step
            fns[("infer", lib)] = lambda m=model: _no_grad(m.eval(), ids)
            fns[("generate", lib)] = lambda m=model: _generate(m.eval(), prompt)
            saved[setting][lib] = saved_mb(lambda model=model: model(input_ids=ids, labels=ids))
        for round_ in range(args.repeats + 1):  # round 0 is warm-up
            for case in timed_cases:
                order = case_libs[case] if round_ % 2 == 0 else case_libs[case][::-1]
                for lib in order:
                    result = timed(fns[(case, lib)])
                    if round_:
                        times.setdefault((case, lib), []).append(result)
        print(f"{setting} done, load {os.getloadavg()[0]:.1f}", flush=True)
        del fns, models
        gc.collect()

    out: dict = {
        "model": f"Llama, SmolLM2-135M widths, {args.layers} of 30 layers",
        "batch": "8 x 128 (generate: 1 x 32 prompt + 32 new tokens)",
        "lora": "r=16, alpha=32, AdamW",
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "repeats": args.repeats,
        "cases": {},
    }
    for case in (*cases, "infer", "generate"):
        row = {}
        for lib in case_libs[case]:
            wall = statistics.median(w for w, _ in times[(case, lib)])
            cpu = statistics.median(c for _, c in times[(case, lib)])
            row[lib] = {"wall_ms": wall * 1e3, "cpu_ms": cpu * 1e3}
            if case in saved:
                row[lib]["saved_mb"] = saved[case][lib]
        for lib in case_libs[case][1:]:
            for key in ("wall_ms", "cpu_ms"):
                row[lib][f"{key}_over_floor"] = row[lib][key] / row["floor"][key] - 1
        if "peft" in row:
            row["peftkit_over_peft_wall"] = row["peftkit"]["wall_ms"] / row["peft"]["wall_ms"]
        out["cases"][case] = row
    out["get_peft_model_ms"] = _time_injection(libs[1:], args.repeats)
    print(json.dumps(out, indent=2))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    table = markdown_table(out)
    print(table)
    write_readme_table(table)


README = Path(__file__).resolve().parents[1] / "README.md"
MARK_START, MARK_END = "<!-- bench:lora_step -->", "<!-- /bench:lora_step -->"


def markdown_table(out: dict) -> str:
    """One table: median wall/CPU ms, saved-for-backward MB, overhead over the floor, vs PEFT."""
    lines = [
        f"{out['model']}, batch {out['batch']}, LoRA {out['lora']}; {out['torch_threads']} "
        f"threads on {out['cpu_count']} cores, load average {out['loadavg_start'][0]:.1f} at "
        f"start / {out['loadavg_end'][0]:.1f} at end; medians of {out['repeats']} interleaved "
        f"rounds. `get_peft_model` (all 210 linear layers of the 30-layer model): peftkit "
        f"{out['get_peft_model_ms']['peftkit']:.0f} ms"
        + (
            f", PEFT {out['get_peft_model_ms']['peft']:.0f} ms."
            if "peft" in out["get_peft_model_ms"]
            else "."
        ),
        "",
        "| case | floor ms (CPU ms) | peftkit ms (CPU ms) | PEFT ms (CPU ms) | peftkit over floor, wall / CPU "
        "| PEFT over floor, wall / CPU | peftkit / PEFT wall | saved MB floor / peftkit / PEFT |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case, row in out["cases"].items():

        def cell(lib, row=row):
            return f"{row[lib]['wall_ms']:.0f} ({row[lib]['cpu_ms']:.0f})" if lib in row else "-"

        def over(lib, row=row):
            if lib not in row:
                return "-"
            r = row[lib]
            return f"{r['wall_ms_over_floor']:+.1%} / {r['cpu_ms_over_floor']:+.1%}"

        saved = " / ".join(
            f"{row[lib]['saved_mb']:.0f}"
            for lib in ("floor", "peftkit", "peft")
            if "saved_mb" in row.get(lib, {})
        )
        ratio = f"{row['peftkit_over_peft_wall']:.2f}" if "peftkit_over_peft_wall" in row else "-"
        lines.append(
            f"| {case} | {cell('floor')} | {cell('peftkit')} | {cell('peft')} | {over('peftkit')} "
            f"| {over('peft')} | {ratio} | {saved or '-'} |"
        )
    return "\n".join(lines)


def write_readme_table(table: str) -> None:
    text = README.read_text()
    if MARK_START not in text:
        return
    head, rest = text.split(MARK_START, 1)
    _, tail = rest.split(MARK_END, 1)
    README.write_text(f"{head}{MARK_START}\n{table}\n{MARK_END}{tail}")


def _no_grad(model, ids):
    with torch.no_grad():
        model(input_ids=ids)


def _generate(model, prompt):
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=32, do_sample=False, min_new_tokens=32)


def _time_injection(libs, repeats: int) -> dict:
    """get_peft_model on every linear layer of the full 30-layer model (210 layers)."""
    base = smollm2_shape(30)
    out = {}
    for lib in libs:
        times = []
        for _ in range(repeats + 1):
            model = sharing_copy(base)
            start = time.perf_counter()
            wrap(lib, model, "all-linear", 0.0)
            times.append(time.perf_counter() - start)
        out[lib] = statistics.median(times[1:]) * 1e3
    return out


if __name__ == "__main__":
    main()
