"""Readable AdaLoRA results: the rank each adapted matrix ended with, as a table and a heatmap.

A matrix's rank is the number of triplets its ``rank_pattern`` mask keeps (its size before any
allocation). Matrices are laid out as a grid, one row per transformer block and one column per
module kind::

    model.layers.3.self_attn.q_proj  ->  row "model.layers.3", column "self_attn.q_proj" (shown "q_proj")

so the table and the PNG read the same way: which layers and which projections kept their rank.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

from torch import nn

from ..checkpoint import atomic_file
from ..config import PeftType
from .rank_allocator import module_path_of

# the first "<layers|h|block...>.<i>." in a path splits it into block (row) and module kind (column)
_BLOCK = re.compile(r"^(?P<row>(?:.*?\.)?(?:layers|layer|h|block|blocks)\.\d+)\.(?P<col>.+)$")


def _tuner_and_name(peft_model: nn.Module, adapter_name: str | None) -> tuple[Any, str]:
    """The AdaLoRA adapter model (``adalora.AdaLoraModel``) and the adapter's name, from a
    PeftModel (which keeps its adapter model in ``adapter_model``) or that adapter model itself.
    Told apart by the adapter's config, so this module need not import the model it reports on
    (``AdaLoraModel.write_run_report`` calls it)."""
    tuner = vars(peft_model).get("adapter_model", peft_model)
    configs = getattr(tuner, "peft_config", None)
    name = adapter_name or getattr(tuner, "active_adapter", None)
    if isinstance(configs, dict) and name is not None and name not in configs:
        raise ValueError(f"no adapter named {name!r}; have {list(configs)}")
    if not isinstance(configs, dict) or configs[name].peft_type is not PeftType.ADALORA:
        raise ValueError(
            f"rank reports need an AdaLoRA model (get_peft_model with AdaLoraConfig); got a "
            f"{type(peft_model).__name__}"
        )
    return tuner, name


def final_ranks(peft_model: nn.Module, adapter_name: str | None = None) -> dict[str, int]:
    """``{module path: rank}``: kept triplets per adapted matrix (all of them before allocation)."""
    tuner, name = _tuner_and_name(peft_model, adapter_name)
    pattern = tuner.peft_config[name].rank_pattern or {}
    masks = {module_path_of(key): keep for key, keep in pattern.items()}  # either key spelling
    ranks = {}
    for path, layer in tuner.adapter_layers():
        if name not in layer.lora_E:
            continue
        keep = masks.get(path)
        ranks[path] = int(sum(map(bool, keep))) if keep is not None else layer.r[name]
    return ranks


def rank_grid(ranks: dict[str, int]) -> tuple[list[str], list[str], list[list[int | None]]]:
    """Arrange ``{path: rank}`` as ``(row labels, column labels, rows x columns)``.

    Rows are blocks (``...layers.<i>``), columns are module kinds; a matrix outside any block gets a
    row of its own. Column labels are shortened to the last name when that stays unambiguous.
    """
    rows: list[str] = []
    cols: list[str] = []
    cells: dict[tuple[str, str], int] = {}
    for path, rank in ranks.items():
        found = _BLOCK.match(path)
        row, col = (found["row"], found["col"]) if found else ("-", path)
        if row not in rows:
            rows.append(row)
        if col not in cols:
            cols.append(col)
        cells[(row, col)] = rank
    grid = [[cells.get((r, c)) for c in cols] for r in rows]
    leaves = [c.rsplit(".", 1)[-1] for c in cols]
    labels = leaves if len(set(leaves)) == len(leaves) else cols
    return rows, labels, grid


def rank_report(peft_model: nn.Module, adapter_name: str | None = None) -> str:
    """A plain-text table of final ranks (blocks x modules) with the budget totals."""
    tuner, name = _tuner_and_name(peft_model, adapter_name)
    config = tuner.peft_config[name]
    ranks = final_ranks(peft_model, name)
    rows, cols, grid = rank_grid(ranks)
    kept, n = sum(ranks.values()), len(ranks)
    status = "allocated" if config.rank_pattern else "not allocated yet (full init_r)"
    lines = [
        f"AdaLoRA ranks, adapter {name!r} ({status}): init_r={config.init_r}, "
        f"target_r={config.target_r}, {n} matrices",
        f"kept {kept} of {config.init_r * n} triplets (target budget {config.target_r * n}); "
        f"mean rank {kept / max(n, 1):.2f}",
    ]
    row_w = max(len(r) for r in rows + ["block"])
    col_w = [max(len(c), 4) for c in cols]
    header = "block".ljust(row_w) + "  " + "  ".join(c.rjust(w) for c, w in zip(cols, col_w))
    lines += [header, "-" * len(header)]
    for label, values in zip(rows, grid):
        cells = ["." if v is None else str(v) for v in values]
        lines.append(
            label.ljust(row_w) + "  " + "  ".join(c.rjust(w) for c, w in zip(cells, col_w))
        )
    col_means = []
    for j, c in enumerate(cols):
        vals = [row[j] for row in grid if row[j] is not None]
        col_means.append(f"{c}={sum(vals) / len(vals):.1f}")
    lines.append("mean rank per module: " + ", ".join(col_means))
    return "\n".join(lines)


def plot_rank_heatmap(
    peft_model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None
) -> str:
    """Write a PNG heatmap of the model's final ranks (blocks down, modules across); returns the path."""
    tuner, name = _tuner_and_name(peft_model, adapter_name)
    config = tuner.peft_config[name]
    return plot_ranks(final_ranks(peft_model, name), path, config.init_r, config.target_r)


def plot_ranks(ranks: dict[str, int], path: str | os.PathLike, init_r: int, target_r: int) -> str:
    """Heatmap PNG of ``{module path: rank}`` (e.g. read back from a run's saved results).

    Uses matplotlib's Agg canvas directly (no pyplot state); the file is written atomically.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, cols, grid = rank_grid(ranks)
    data = [[math.nan if v is None else float(v) for v in row] for row in grid]  # (blocks, modules)
    short_rows = [r.rsplit(".", 1)[-1] for r in rows]
    row_labels = short_rows if len(set(short_rows)) == len(short_rows) else rows

    width = max(4.8, 2.2 + 0.9 * len(cols))
    fig = Figure(figsize=(width, 1.8 + 0.3 * len(rows)), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(data, cmap="viridis", vmin=0, vmax=init_r, aspect="auto")
    ax.set_xticks(range(len(cols)), labels=cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), labels=row_labels)
    ax.set_xlabel("module")
    ax.set_ylabel("layer")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if v is not None:
                color = "black" if v > 0.6 * init_r else "white"
                ax.text(j, i, str(v), ha="center", va="center", fontsize=8, color=color)
    kept = int(sum(v for row in grid for v in row if v is not None))
    ax.set_title(
        f"AdaLoRA final ranks\ninit_r={init_r}, target_r={target_r}, kept {kept} of "
        f"{init_r * len(ranks)}",
        fontsize=9,
    )
    fig.colorbar(image, ax=ax, label="rank")
    fig.tight_layout()
    out = os.fspath(path)
    with atomic_file(out) as tmp:
        fig.savefig(tmp, format="png")
    return out
