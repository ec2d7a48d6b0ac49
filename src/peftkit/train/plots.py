"""``loss.png`` and ``metrics.png`` in the run folder, drawn from ``metrics.jsonl``.

``loss.png``: training loss per optimizer step (thin) with its running mean, and the eval loss at
each evaluation (dots). ``metrics.png``: one panel per eval metric against the epoch, with the
majority-class baseline as a dashed line where the task has one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..checkpoint import atomic_write

_SKIP = {"kind", "step", "epoch", "eval_loss", "eval_ppl", "time_s", "rows"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    atomic_write(str(path), lambda tmp: fig.savefig(tmp, dpi=110, format="png"))


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
        path = out_dir / "loss.png"
        _save(fig, path)
        plt.close(fig)
        written.append(path)
    names = [
        k
        for k in dict.fromkeys(k for r in evals for k in r)
        if k not in _SKIP and any(isinstance(r.get(k), (int, float)) for r in evals)
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
        path = out_dir / "metrics.png"
        _save(fig, path)
        plt.close(fig)
        written.append(path)
    return written
