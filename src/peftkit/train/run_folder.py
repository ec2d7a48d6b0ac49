"""The run folder: where a run's files go, and whether it may start, resume or overwrite there.

::

    <output_dir>/ (default runs/<config stem>/)
        config.yaml  task_state.json  train.log  metrics.jsonl  summary.json  tensorboard/
        adapter/  best/  checkpoints/step-N/  loss.png  metrics.png  predictions_*.csv

A folder that already holds a run is never silently overwritten: ``--resume`` continues it,
``--overwrite`` clears the run's own files first (nothing else in the folder is touched).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .config import ConfigError, RunConfig, read_yaml
from .state import latest_checkpoint

TASK_STATE = "task_state.json"


def default_output_dir(config: RunConfig) -> Path:
    """``runs/<config file stem>``."""
    stem = Path(config.source).stem if config.source else "peftkit"
    return Path("runs") / stem


def resolve_resume(output_dir: Path, resume: bool | str | None) -> Path | None:
    """The checkpoint ``--resume`` means: the run's latest (``True``), a checkpoint folder, or the
    latest in another run folder; None when not resuming. Errors say what was looked for."""
    if not resume:
        return None
    if resume is True:
        found = latest_checkpoint(output_dir)
        if found is None:
            raise ConfigError(
                [
                    f"--resume: no checkpoint in {output_dir / 'checkpoints'}; "
                    "nothing to resume (start without --resume)"
                ]
            )
        return found
    path = Path(resume)
    if (path / "trainer_state.json").exists():
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise ConfigError(
            [f"--resume {resume}: neither a checkpoint folder nor a run folder with checkpoints"]
        )
    return found


_RUN_ITEMS = (
    "checkpoints",
    "best",
    "adapter",
    "tensorboard",
    "metrics.jsonl",
    "train.log",
    "summary.json",
    "loss.png",
    "metrics.png",
    "config.yaml",
    TASK_STATE,
)


def prepare_output(output_dir: Path, resuming: bool, overwrite: bool) -> None:
    """Create ``output_dir``; refuse one holding a run unless resuming or overwriting it."""
    existing = [n for n in _RUN_ITEMS if (output_dir / n).exists()]
    if existing and not resuming:
        if not overwrite:
            raise ConfigError(
                [
                    f"output_dir: {output_dir} already holds a run ({', '.join(existing[:3])}...); "
                    "pass --resume to continue it, --overwrite to start again, or set output_dir=..."
                ]
            )
        for name in existing:
            target = output_dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        for old in output_dir.glob("predictions_*.csv"):
            old.unlink()
    output_dir.mkdir(parents=True, exist_ok=True)


def config_changes(output_dir: Path, config: RunConfig) -> list[str]:
    """Top-level config keys that differ from the run folder's ``config.yaml`` (on resume)."""
    saved_path = output_dir / "config.yaml"
    if not saved_path.exists():
        return []
    saved = read_yaml(saved_path)
    now = config.to_dict()
    ignore = {"output_dir", "progress", "tensorboard", "plots"}
    return sorted(
        k for k in set(saved) | set(now) if k not in ignore and saved.get(k) != now.get(k)
    )


__all__ = ["TASK_STATE", "config_changes", "default_output_dir", "prepare_output", "resolve_resume"]
