"""The run folder: where a run's files go (:class:`RunFolder`, the one map of its names), and
whether a run may start, resume or overwrite there.

A folder that already holds a run is never silently overwritten: ``--resume`` continues it,
``--overwrite`` clears the run's own files first (nothing else in the folder is touched).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from .config import ConfigError, RunConfig, read_yaml

# The file whose presence makes a checkpoint folder complete (train/state.py writes it last).
CHECKPOINT_STATE = "trainer_state.json"
TASK_STATE = "task_state.json"
_PLOTS = ("loss", "metrics", "memory", "confusion_matrix")


def _at(*parts: str) -> property:
    """A RunFolder property: the path ``root/<parts>``."""
    return property(lambda self: self.root.joinpath(*parts))


@dataclasses.dataclass(frozen=True)
class RunFolder:
    """Every name in a run folder, once: the run, the loop, checkpoints, the log, plots,
    predictions and the commands that read a run back all ask this map.

    ::

        <root>/ (default runs/<config stem>/)
            config.yaml                  .config        the resolved run config
            task_state.json              .task_state    what rebuilds the task (the label set)
            train.log  metrics.jsonl     .log .metrics  console lines; one JSON record per event
            tensorboard/                 .tensorboard
            summary.json                 .summary       the RunSummary
            adapter/                     .adapter       the adapter kept (HF PEFT format)
            best/                        .best          the best epoch's adapter, exact trainable
                                                        tensors (.best_tensors), which epoch
                                                        (.best_info)
            checkpoints/step-00000050/   .checkpoint(50)  resumable state (train/state.py's
                                                        layout; complete once trainer_state.json
                                                        is in it)
            loss.png metrics.png ...     .plot("loss")  (memory, confusion_matrix)
            predictions_<split>.csv      .predictions("eval")
        a method's or a task's own files come from their hooks (``write_run_report``,
        ``write_run_files``), which are given ``root``.
    """

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    config = _at("config.yaml")
    task_state = _at(TASK_STATE)
    log = _at("train.log")
    metrics = _at("metrics.jsonl")
    tensorboard = _at("tensorboard")
    summary = _at("summary.json")
    adapter = _at("adapter")
    best = _at("best")
    best_tensors = _at("best", "trainable.safetensors")
    best_info = _at("best", "best.json")
    checkpoints = _at("checkpoints")

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step:08d}"

    def complete_checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.checkpoints.is_dir():
            return []
        found = [
            p
            for p in self.checkpoints.iterdir()
            if p.is_dir() and p.name.startswith("step-") and (p / CHECKPOINT_STATE).exists()
        ]
        return sorted(found, key=lambda p: int(p.name[len("step-") :]))

    def latest_checkpoint(self) -> Path | None:
        found = self.complete_checkpoints()
        return found[-1] if found else None

    def plot(self, name: str) -> Path:
        if name not in _PLOTS:
            raise ValueError(f"unknown plot {name!r}; a run folder holds {', '.join(_PLOTS)}")
        return self.root / f"{name}.png"

    def predictions(self, split: str) -> Path:
        return self.root / f"predictions_{split}.csv"

    def run_files(self) -> list[Path]:
        """The run's own files and folders that exist (what ``--overwrite`` clears)."""
        named = [self.checkpoints, self.best, self.adapter, self.tensorboard, self.metrics]
        named += [self.log, self.summary, *(self.plot(p) for p in _PLOTS)]
        named += [self.config, self.task_state]
        return [p for p in named if p.exists()] + sorted(self.root.glob("predictions_*.csv"))


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
        run = RunFolder(output_dir)
        found = run.latest_checkpoint()
        if found is None:
            raise ConfigError(
                [
                    f"--resume: no checkpoint in {run.checkpoints}; "
                    "nothing to resume (start without --resume)"
                ]
            )
        return found
    path = Path(resume)
    if (path / CHECKPOINT_STATE).exists():
        return path
    found = RunFolder(path).latest_checkpoint()
    if found is None:
        raise ConfigError(
            [f"--resume {resume}: neither a checkpoint folder nor a run folder with checkpoints"]
        )
    return found


def prepare_output(output_dir: Path, resuming: bool, overwrite: bool) -> None:
    """Create ``output_dir``; refuse one holding a run unless resuming or overwriting it."""
    existing = RunFolder(output_dir).run_files()
    if existing and not resuming:
        if not overwrite:
            names = ", ".join(p.name for p in existing[:3])
            raise ConfigError(
                [
                    f"output_dir: {output_dir} already holds a run ({names}...); "
                    "pass --resume to continue it, --overwrite to start again, or set output_dir=..."
                ]
            )
        for target in existing:
            shutil.rmtree(target) if target.is_dir() else target.unlink()
    output_dir.mkdir(parents=True, exist_ok=True)


def config_changes(output_dir: Path, config: RunConfig) -> list[str]:
    """Top-level config keys that differ from the run folder's ``config.yaml`` (on resume)."""
    saved_path = RunFolder(output_dir).config
    if not saved_path.exists():
        return []
    saved = read_yaml(saved_path)
    now = config.to_dict()
    ignore = {"output_dir", "progress", "tensorboard", "plots"}
    return sorted(
        k for k in set(saved) | set(now) if k not in ignore and saved.get(k) != now.get(k)
    )


__all__ = [
    "CHECKPOINT_STATE",
    "TASK_STATE",
    "RunFolder",
    "config_changes",
    "default_output_dir",
    "prepare_output",
    "resolve_resume",
]
