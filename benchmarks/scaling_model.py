"""Per-rank memory for 1/2/4/8 ranks, per strategy: a short model checked against measured runs.

    python benchmarks/scaling_model.py benchmarks/results/scaling_bloomz560m.json [more.json]

What a rank holds at its peak (the forward/backward of a training step), global batch G split
into b = G / N rows per rank, fp32, on the CPU (on a GPU the same terms hold, in device memory):

    runtime R         torch, transformers, accelerate (+ DeepSpeed): measured before the load
    weights           DDP / ZeRO-2: the whole model, less an untied input embedding (memory-
                      mapped: a lookup reads a few rows);
                      ZeRO-3 / FSDP2, N >= 2: (blocks + norms) / N, plus the output head's
                      rows / N (vocabulary-parallel, read every step), plus the embedding's
                      rows / N only when tied to the head; N = 1: the whole model
    window            ZeRO-3 / FSDP2, N >= 2: two blocks gathered at once (the one computing
                      and the next one / the live limit); 0 for DDP / ZeRO-2
    activations A(b)  what autograd keeps for b rows plus the step's logits: a + c * b, the
                      two constants fitted to the DDP runs at the two smallest N measured
                      (nothing else is fitted)
    trainable state   gradients + Adam moments of the adapter: 3 x 4 bytes per trainable value
                      (LoRA r=8 here: a few MB, left out), / N under ZeRO / FSDP

The model's structure (weights, embedding, head, largest block) is read from the checkpoint
the runs used. Every other strategy's prediction is then checked against its measured
training-step peak (the run's peak, evaluation included, is shown beside it: a sharded
evaluation builds each rank's whole logits, which this model does not cover).
"""

from __future__ import annotations

import argparse
import json
import re
import struct
from collections import defaultdict
from pathlib import Path

MB = 2**20
EMBED = re.compile(r"(embed_tokens|word_embeddings|wte)\.weight$")
HEAD = re.compile(r"lm_head\.weight$")
BLOCK = re.compile(r"\.(layers|h)\.(\d+)\.")


def structure(folder: Path) -> dict[str, float]:
    """Bytes (MB) of the whole model, its input embedding, output head (0 when tied) and
    largest block, from the safetensors header (nothing else is read)."""
    path = folder / "model.safetensors"
    with path.open("rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    total = embed = head = 0
    blocks: dict[str, int] = defaultdict(int)
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        size = meta["data_offsets"][1] - meta["data_offsets"][0]
        total += size
        if EMBED.search(name):
            embed += size
        elif HEAD.search(name):
            head += size
        elif match := BLOCK.search(name):
            blocks[match.group(2)] += size
    return {
        "weights": total / MB,
        "embed": embed / MB,
        "head": head / MB,
        "tied": head == 0,
        "block": max(blocks.values()) / MB,
    }


def resident_weights(strategy: str, ranks: int, s: dict) -> float:
    """The weights term of the module docstring."""
    if strategy in ("ddp", "zero2"):  # memory-mapped; an untied embedding is hardly read
        return s["weights"] - (0 if s["tied"] else s["embed"])
    if ranks == 1:  # partitioned / sharded to itself: every weight copied in
        return s["weights"]
    body = s["weights"] - s["embed"] - s["head"]
    vocab = s["embed"] if s["tied"] else s["head"]
    return (body + vocab) / ranks


def window(strategy: str, ranks: int, s: dict) -> float:
    return 2 * s["block"] if strategy in ("zero3", "fsdp") and ranks > 1 else 0.0


def measured(rows: list[dict]) -> dict[tuple[str, int], dict]:
    out = {}
    for row in rows:
        if "error" in row:
            continue
        name = row["strategy"] + ("+cpu" if row["offload"] != "none" else "")
        out[(name, row["processes"])] = row
    return out


def mean(values: list[int]) -> float:
    return sum(values) / len(values)


def predict(results: dict, s: dict, batch: int) -> list[dict]:
    """Fit A(b) to DDP at 1 and 2 ranks, then predict every (strategy, N)."""
    runs = measured(results["runs"])
    counts = sorted(n for name, n in runs if name == "ddp")[:2]
    if len(counts) < 2:
        raise SystemExit("the model needs DDP runs at two process counts")
    ddp = {n: runs[("ddp", n)] for n in counts}

    def peak(row: dict) -> float:  # the training step's (forward, backward, optimizer)
        return max(max(row["phases"][part]) for part in ("forward", "backward", "optimizer"))

    def run_peak(row: dict) -> float:  # the whole run's, evaluation included
        return max(p["cpu_peak_mb"] for p in row["rank_peaks"])

    def runtime(row: dict) -> float:
        return mean(row["phases"]["start"])

    act = {n: peak(r) - runtime(r) - resident_weights("ddp", n, s) for n, r in ddp.items()}
    (n1, a1), (n2, a2) = sorted(act.items())
    c = (a1 - a2) / (batch / n1 - batch / n2)  # MB per row
    a = a1 - c * batch / n1
    starts = {}
    for (name, _ranks), row in runs.items():
        starts.setdefault(name.split("+")[0], []).append(runtime(row))
    lines = []
    names = sorted(
        {name for name, _ in runs}, key=["ddp", "zero2", "zero3", "zero3+cpu", "fsdp"].index
    )
    for name in names:
        strategy = name.split("+")[0]
        r = mean(starts[strategy])
        for n in (1, 2, 4, 8):
            terms = {
                "runtime": r,
                "weights": resident_weights(strategy, n, s),
                "window": window(strategy, n, s),
                "activations": a + c * batch / n,
            }
            row = runs.get((name, n))
            lines.append(
                {
                    "strategy": name,
                    "ranks": n,
                    **{k: round(v) for k, v in terms.items()},
                    "predicted": round(sum(terms.values())),
                    "measured": round(peak(row)) if row else None,
                    "run_peak": round(run_peak(row)) if row else None,
                }
            )
    return lines


def render(lines: list[dict], shape: str) -> str:
    head = (
        "| strategy | ranks | runtime | weights | window | activations | **predicted** "
        "| measured step peak | error | measured run peak |"
    )
    out = [f"{shape} (MB per rank, the worst rank):", "", head, "|" + "---|" * 10]
    for x in lines:
        err = f"{(x['predicted'] - x['measured']) / x['measured']:+.0%}" if x["measured"] else ""
        got = f"{x['measured']:,d}" if x["measured"] else ""
        run = f"{x['run_peak']:,d}" if x["run_peak"] else ""
        out.append(
            f"| {x['strategy']} | {x['ranks']} | {x['runtime']:,d} | {x['weights']:,d} | "
            f"{x['window']:,d} | {x['activations']:,d} | **{x['predicted']:,d}** | {got} | {err} "
            f"| {run} |"
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="bench_scaling.py result files of one shape")
    args = parser.parse_args()
    results = {"runs": []}
    for path in args.results:
        data = json.loads(Path(path).read_text())
        results["runs"] += data["runs"]
        shape, batch = data["shape"], data["global_batch"]
    from bench_scaling import shape_model

    s = structure(shape_model(shape))
    print(render(predict(results, s, batch), shape))


if __name__ == "__main__":
    main()
