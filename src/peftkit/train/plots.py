"""``loss.png``, ``metrics.png`` and ``confusion_matrix.png`` in the run folder.

``loss.png``: training loss per optimizer step (thin) with its running mean, and the eval loss at
each evaluation (dots). ``metrics.png``: one panel per eval metric against the epoch, with the
majority-class baseline as a dashed line where the task has one (per-class metrics such as
``class_acc/cat`` stay in metrics.jsonl / TensorBoard). ``confusion_matrix.png``: for a
classifier (labels in ``task_state.json``), truth x prediction counts of the kept adapter on the
eval split (``predictions_eval.csv``), each row's share as the colour, per-class accuracy on the
left.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .. import metrics as M
from ..checkpoint import atomic_file
from .run_folder import RunFolder

_SKIP = {"kind", "step", "epoch", "eval_loss", "eval_ppl", "time_s", "rows"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")


def _running_mean(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_run(
    records: list[dict[str, Any]],
    output_dir: str | os.PathLike,
    baselines: dict[str, Any] | None = None,
) -> list[Path]:
    """Write the plots; returns the files written (none when there is nothing to draw)."""
    plt = _pyplot()
    out_dir = Path(output_dir)
    written = []
    train = [
        r for r in records if r.get("kind") == "train" and isinstance(r.get("loss"), (int, float))
    ]
    evals = [r for r in records if r.get("kind") == "eval"]
    if train or evals:
        fig, ax = plt.subplots(figsize=(7, 4))
        if train:
            steps = [r["step"] for r in train]
            losses = [r["loss"] for r in train]
            ax.plot(steps, losses, lw=0.6, alpha=0.5, label="train loss (per step)")
            window = max(1, len(losses) // 20)
            ax.plot(
                steps, _running_mean(losses, window), lw=1.6, label=f"train loss (mean of {window})"
            )
        points = [
            (r["step"], r["eval_loss"])
            for r in evals
            if isinstance(r.get("eval_loss"), (int, float))
        ]
        if points:
            ax.plot(*zip(*points), "o-", label="eval loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = RunFolder(out_dir).plot("loss")
        _save(fig, path)
        plt.close(fig)
        written.append(path)
    names = [
        k
        for k in dict.fromkeys(k for r in evals for k in r)
        if k not in _SKIP
        and "/" not in k
        and any(isinstance(r.get(k), (int, float)) for r in evals)
    ]
    if names:
        fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.4), squeeze=False)
        for ax, name in zip(axes[0], names):
            pts = [
                (r.get("epoch", 0), r[name]) for r in evals if isinstance(r.get(name), (int, float))
            ]
            ax.plot(*zip(*pts), "o-", label=name)
            base = (baselines or {}).get(f"majority_{name}")
            if isinstance(base, (int, float)):
                ax.axhline(base, ls="--", color="grey", label="majority class")
            ax.set_title(name)
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = RunFolder(out_dir).plot("metrics")
        _save(fig, path)
        plt.close(fig)
        written.append(path)
    confusion = _confusion_from_run(out_dir)
    if confusion is not None:
        written.append(plot_confusion(*confusion, RunFolder(out_dir).plot("confusion_matrix")))
    return written


def _confusion_from_run(run_dir: Path) -> tuple[list[str], list[str], list[str]] | None:
    """(labels, predictions, references) of a classifier run's eval predictions, or None."""
    import csv
    import json

    run = RunFolder(run_dir)
    state, preds_csv = run.task_state, run.predictions("eval")
    if not state.is_file() or not preds_csv.is_file():
        return None
    labels = json.loads(state.read_text(encoding="utf-8")).get("labels")
    if not labels or len(labels) > 50:
        return None
    with open(preds_csv, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "reference" not in rows[0]:
        return None
    return list(labels), [r["prediction"] for r in rows], [r["reference"] for r in rows]


def plot_confusion(
    labels: list[str], preds: list[str], refs: list[str], path: str | os.PathLike
) -> Path:
    """Truth (rows) x prediction (columns) counts, coloured by each row's share; the y labels
    carry each class's accuracy."""
    plt = _pyplot()
    matrix = M.confusion_matrix(preds, refs, labels)
    per_class = M.per_class_accuracy(preds, refs, labels)
    shares = [[c / max(sum(row), 1) for c in row] for row in matrix]
    n = len(labels)
    side = min(2.2 + 0.55 * n, 16)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            if matrix[i][j]:
                color = "white" if shares[i][j] > 0.6 else "black"
                ax.text(j, i, matrix[i][j], ha="center", va="center", fontsize=8, color=color)
    acc = M.accuracy(preds, refs) if refs else 0.0
    ax.set_xticks(range(n), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(
        range(n),
        [f"{c} ({per_class[c]:.0%})" if per_class[c] is not None else c for c in labels],
        fontsize=8,
    )
    ax.set_xlabel("prediction")
    ax.set_ylabel("truth (per-class accuracy)")
    ax.set_title(f"eval confusion matrix: {len(refs)} rows, accuracy {acc:.1%}")
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the row")
    fig.tight_layout()
    out = Path(path)
    _save(fig, out)
    plt.close(fig)
    return out


def plot_memory(memory: list[dict[str, Any]], path: str | os.PathLike) -> Path | None:
    """``memory.png``: each phase's CPU memory (MB) as the trainer reported it: RSS and its
    anonymous part (RssAnon), at the phase's start (hollow) and peak (filled), and the GPU's
    allocated memory when there is one. None when there is nothing to draw.

    The gap between the two CPU lines is file-backed memory (mapped weights, library code):
    resident, but not owned by the process (see :mod:`peftkit.train.memory`).
    """
    entries = [m for m in memory if m.get("cpu_peak") is not None]
    if not entries:
        return None
    plt = _pyplot()
    x = list(range(len(entries)))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * len(entries) + 3), 3.8))
    series = [("RSS", "cpu", "C0"), ("anonymous", "cpu_anon", "C1"), ("GPU", "gpu", "C2")]
    for label, key, color in series:
        peaks = [m.get(f"{key}_peak") for m in entries]
        if all(v is None for v in peaks):
            continue
        begins = [m.get(f"{key}_begin") for m in entries]
        ax.plot(x, peaks, "o-", color=color, label=f"{label} peak")
        ax.plot(x, begins, "o--", color=color, mfc="none", alpha=0.7, label=f"{label} at start")
    ax.set_xticks(x, [f"{m.get('phase', '?')} {m.get('epoch', '')}" for m in entries])
    ax.tick_params(axis="x", labelrotation=45, labelsize=8)
    ax.set_ylabel("MB")
    ax.set_ylim(bottom=0)
    ax.set_title("memory per phase (RSS = anonymous + file-backed)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path)
    _save(fig, out)
    plt.close(fig)
    return out
