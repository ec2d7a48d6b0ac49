"""Learning-rate schedules with linear warm-up, as multipliers of the base LR::

    step < W:          s / W                                 (warm-up from 0)
    linear:            (T - s) / (T - W)                     (down to 0 at step T)
    cosine:            0.5 * (1 + cos(pi * (s - W) / (T - W)))
    constant:          1

``s`` counts optimizer steps, ``W`` warm-up steps, ``T`` total steps. The multiplier functions are
plain module-level code (not closures over objects), so the scheduler's ``state_dict`` holds only
numbers and reloads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import functools
import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def lr_multiplier(step: int, kind: str, warmup: int, total: int) -> float:
    """Multiplier of the base LR at optimizer step ``step`` (0-based)."""
    if warmup > 0 and step < warmup:
        return step / warmup
    if kind == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr_scheduler {kind!r}; use linear, cosine or constant")


def warmup_steps(total: int, steps: int | None, ratio: float) -> int:
    """Warm-up length: explicit ``steps`` wins, else ``ceil(ratio * total)``."""
    if steps is not None:
        return max(0, steps)
    return math.ceil(max(0.0, ratio) * total)


def make_scheduler(optimizer: Optimizer, kind: str, warmup: int, total: int) -> LambdaLR:
    """A ``LambdaLR`` following :func:`lr_multiplier`."""
    fn = functools.partial(lr_multiplier, kind=kind, warmup=warmup, total=total)
    return LambdaLR(optimizer, fn)
