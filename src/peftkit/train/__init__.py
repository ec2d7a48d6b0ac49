"""Training: the run config, the loop on accelerate, memory reports, logs, plots, checkpoints.

::

    config.py   YAML + key=value overrides -> RunConfig, every problem reported at once
    splits.py   data files / hub names -> train, eval, test rows
    run.py      one run end to end: data -> model -> adapter -> Trainer -> run folder
    run_folder.py  RunFolder: every name in a run folder (writers and readers ask it)
    loop.py     Trainer: accumulation, mixed precision, clipping, schedule, eval, Ctrl-C
    state.py    resumable checkpoints (bit-for-bit continuation)
    memory.py   PEFT-style memory report per phase (GPU + CPU, MB)
    logger.py   console + train.log + metrics.jsonl + TensorBoard
    plots.py    loss.png, metrics.png
"""

from .config import ConfigError, RunConfig, load_config
from .loop import Trainer, make_accelerator, plan_steps
from .memory import MemoryTracker
from .run import run_train

__all__ = [
    "ConfigError",
    "MemoryTracker",
    "RunConfig",
    "Trainer",
    "load_config",
    "make_accelerator",
    "plan_steps",
    "run_train",
]
