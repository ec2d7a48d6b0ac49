"""One training run as a recipe, read top to bottom: setup → train → finish.

::

    RunConfig
    setup   ─> run folder (new / --resume / --overwrite) ─> task + data checked (no model yet)
            ─> base model + tokenizer ─> features ─> step plan ─> adapter (get_peft_model)
            ─> Trainer (accelerate)
    train   ─> Trainer.train: epochs, eval each epoch, best tracked, checkpoints, Ctrl-C
    finish  ─> adapter kept (best or last) and saved ─> the method's own report (AdaLoRA ranks)
            ─> eval predictions ─> test split (scored, or labelled) ─> plots
            ─> RunSummary ─> summary.json

Nothing heavy happens before the data has been read and checked against the task; every file
the run writes is written by the main process only.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import atomic_write_text
from ..methods.dropout_mask import set_dropout_mask
from ..progress import quiet_library_bars
from ..tasks import Task, TaskSpec
from .config import RunConfig, config_to_yaml
from .distributed import (
    full_weights,
    make_accelerator,
    offload_note,
    plan_of,
    zero3_load_config,
)
from .evaluate import SplitEvaluation, evaluate_split, write_predictions
from .logger import RunLog, read_metrics
from .loop import Trainer, TrainOutcome, plan_steps
from .memory import MemoryTracker, rank_peaks
from .run_folder import (
    CHECKPOINT_STATE,
    RunFolder,
    config_changes,
    default_output_dir,
    prepare_output,
    resolve_resume,
)
from .setup import attach_adapter, build_spec, check_data, load_model, trainable_line
from .splits import Splits, load_splits
from .state import Progress


@dataclasses.dataclass
class RunSummary:
    """What ``summary.json`` holds. Fields left None did not apply to this run and are omitted."""

    status: str  # "completed" | "interrupted"
    output_dir: str
    model: str
    method: str
    task: str
    trainable_params: int
    all_params: int
    epochs_done: int
    global_step: int
    total_steps: int
    train_time_s: float
    tokens_per_s: float | None
    baselines: dict[str, Any]
    before_training: dict[str, Any] | None = None
    checkpoint: str | None = None  # interrupted runs: where to resume from
    resume: str | None = None
    adapter: str | None = None
    adapter_choice: str | None = None
    method_report: dict[str, Any] | None = None  # e.g. AdaLoRA's ranks, under the method's name
    best: dict[str, Any] | None = None
    eval: dict[str, float] | None = None
    headline: str | None = None
    test: dict[str, Any] | None = None
    predictions: dict[str, str] | None = None
    peak_cpu_mb: int | None = None  # RSS high-water mark over every phase (MB)
    peak_cpu_anon_mb: int | None = None  # the anonymous part's peak (RssAnon, sampled; MB)
    peak_gpu_mb: int | None = None
    world_size: int = 1
    strategy: str = "ddp"  # ddp | zero2 | zero3 | fsdp (distributed.strategy, resolved)
    offload: str = "none"
    offload_note: str | None = None  # set where offload: cpu can move nothing (a CPU-only run)
    rank_peaks: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # MB, per rank
    memory: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    wall_time_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "method_report":
                out.update({self.method: value} if value is not None else {})
            elif value is not None or field.name in ("tokens_per_s", "peak_gpu_mb"):
                out[field.name] = value
            elif field.name == "eval" and self.status == "completed":
                out[field.name] = value
        return out


def run_train(
    config: RunConfig,
    resume: bool | str | None = None,
    overwrite: bool = False,
    on_step: Callable[[Progress], None] | None = None,
) -> dict[str, Any]:
    """Train per ``config``; returns the summary (also written to ``summary.json``)."""
    recipe = TrainRecipe(config)
    try:
        recipe.setup(resume=resume, overwrite=overwrite, on_step=on_step)
        outcome = recipe.train()
        return recipe.finish(outcome).to_dict()
    finally:
        recipe.close()


class TrainRecipe:
    """The three phases of a run; each reads the state the one before it left on ``self``."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.wall_start = time.perf_counter()
        self.log: RunLog | None = None

    # --- setup -----------------------------------------------------------------------------
    def setup(
        self,
        resume: bool | str | None = None,
        overwrite: bool = False,
        on_step: Callable[[Progress], None] | None = None,
    ) -> None:
        """Run folder, task and data (checked before any model loads), model, adapter, Trainer."""
        from accelerate.utils import set_seed

        config = self.config
        quiet_library_bars()
        self.output_dir = (
            Path(config.output_dir) if config.output_dir else default_output_dir(config)
        )
        config.output_dir = str(self.output_dir)
        self.run = RunFolder(self.output_dir)  # every name in the folder
        self.checkpoint = resolve_resume(self.output_dir, resume)
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        set_dropout_mask(config.dropout_mask)
        self.splits: Splits = load_splits(config)
        self.spec: TaskSpec = check_data(build_spec(config), self.splits, config.source)

        self.accelerator = make_accelerator(config)
        self.main = self.accelerator.is_main_process
        if self.main:
            prepare_output(self.output_dir, self.checkpoint is not None, overwrite)
        self.log = RunLog(
            self.output_dir,
            enabled=self.main,
            tensorboard=config.tensorboard,
            resume_step=self._checkpoint_step(),
        )
        log = self.log
        if self.checkpoint is not None and (changed := config_changes(self.output_dir, config)):
            log.info(
                f"warning: resuming with config changes in {changed}; the run will not "
                "repeat the original one exactly"
            )
        log.info(f"peftkit train: {config.source or '<config>'} -> {self.output_dir}")
        for note in self.splits.notes:
            log.info("data " + note)

        set_seed(config.seed)
        load_start = time.perf_counter()
        load_memory = MemoryTracker("load", self.accelerator.device)
        with load_memory:  # under ZeRO-3 partitioned while it loads, FSDP2 read by shards
            model, tokenizer = load_model(config, self.spec, zero3_load_config(self.accelerator))
        log.info(
            f"model: {config.model.name} ({type(model).__name__}, loaded in "
            f"{time.perf_counter() - load_start:.1f} s)"
        )
        features = self.spec.build(tokenizer, model)  # features need the tokenizer alone
        train_features = features.encode(self.splits.train)
        eval_features = features.encode(self.splits.eval) if self.splits.eval else []
        for split, rows, encoded in (
            ("train", self.splits.train, train_features),
            ("eval", self.splits.eval, eval_features),
        ):
            for note in features.feature_notes(split, rows, encoded) if rows else []:
                log.info(note)  # rows split / cut / left out by the task: never silently
        plan = plan_steps(len(train_features), config, self.accelerator.num_processes)
        with MemoryTracker("adapter", self.accelerator.device) as adapter_memory:
            peft_model = attach_adapter(config, model, self.spec, plan.total_steps)
        self.task: Task = self.spec.build(tokenizer, peft_model)  # batches as the adapter needs
        log.info(
            f"method: {config.method_type} -> {type(peft_model).__name__}; "
            f"{trainable_line(peft_model)}"
        )
        log.info(
            f"plan: {len(train_features)} train examples, {plan.batches_per_epoch} batches of "
            f"{config.batch_size} per epoch, grad_accum {config.grad_accum} -> "
            f"{plan.steps_per_epoch} steps/epoch, {plan.total_steps} steps in {plan.num_epochs} "
            f"epoch(s); device {self.accelerator.device}, mixed precision "
            f"{self.accelerator.mixed_precision}; {self.accelerator.num_processes} process(es), "
            f"strategy {plan_of(self.accelerator).strategy}, offload "
            f"{plan_of(self.accelerator).offload}"
        )
        if note := offload_note(self.accelerator):
            log.info(note)
        if self.main:
            atomic_write_text(self.run.config, config_to_yaml(config))
            atomic_write_text(self.run.task_state, json.dumps(self.spec.state()) + "\n")
        self.baselines = (
            self.task.baselines(self.splits.train, self.splits.eval) if self.splits.eval else {}
        )
        self.trainer = Trainer(
            config,
            peft_model,
            self.task,
            train_features,
            self.output_dir,
            log,
            self.accelerator,
            eval_records=self.splits.eval,
            eval_features=eval_features,
            on_step=on_step,
            setup_memory=[load_memory.result, adapter_memory.result],
        )

    def _checkpoint_step(self) -> int | None:
        if self.checkpoint is None:
            return None
        state = json.loads((self.checkpoint / CHECKPOINT_STATE).read_text())
        return state["progress"]["global_step"]

    # --- train -----------------------------------------------------------------------------
    def train(self) -> TrainOutcome:
        return self.trainer.train(resume_from=self.checkpoint)

    # --- finish ----------------------------------------------------------------------------
    def finish(self, outcome: TrainOutcome) -> RunSummary:
        """Keep the best (or last) adapter, report, predict on eval/test, plot, summarise."""
        summary = self._summary_of_training(outcome)
        if not outcome.interrupted:
            evaluation = self._keep_adapter(outcome, summary)
            summary.method_report = self._method_report()
            summary.predictions = {}
            if evaluation is not None:
                summary.eval = evaluation.metrics
                summary.headline = _headline(self.task, evaluation.metrics, self.baselines)
                self.log.info(summary.headline)
                path = self._write_predictions(evaluation, "eval")
                if path is not None:
                    summary.predictions["eval"] = str(path)
            if self.splits.test:
                summary.test, path = self._run_test()
                if path is not None:
                    summary.predictions["test"] = str(path)
            self._task_files()
        summary.peak_cpu_mb, summary.peak_gpu_mb = _peaks(outcome.memory)
        summary.peak_cpu_anon_mb = _anon_peak(outcome.memory)
        summary.rank_peaks = rank_peaks(outcome.memory)
        summary.memory = outcome.memory
        if not outcome.interrupted:
            gpu = f", GPU {summary.peak_gpu_mb} MB" if summary.peak_gpu_mb is not None else ""
            anon = summary.peak_cpu_anon_mb
            anon = f" (anonymous {anon} MB)" if anon is not None else ""
            self.log.info(f"peak memory: CPU {summary.peak_cpu_mb} MB{anon}{gpu}")
            if len(summary.rank_peaks) > 1:
                self.log.info(
                    "peak memory per rank: "
                    + ", ".join(
                        f"rank {p['rank']} CPU {p['cpu_peak_mb']} MB"
                        + (f" GPU {p['gpu_peak_mb']} MB" if p["gpu_peak_mb"] is not None else "")
                        for p in summary.rank_peaks
                    )
                )
            if self.main and self.config.plots:
                from .plots import plot_memory, plot_run

                plot_run(read_metrics(self.run.metrics), self.output_dir, self.baselines)
                plot_memory(summary.memory, self.run.plot("memory"))
        summary.wall_time_s = round(time.perf_counter() - self.wall_start, 2)
        if self.main:
            text = json.dumps(summary.to_dict(), indent=2) + "\n"
            atomic_write_text(self.run.summary, text)
        return summary

    def close(self) -> None:
        if self.log is not None:
            self.log.close()

    # --- finish, step by step ----------------------------------------------------------------
    def _summary_of_training(self, outcome: TrainOutcome) -> RunSummary:
        config, progress = self.config, outcome.progress
        trainable, total = self.trainer.unwrapped.get_nb_trainable_parameters()
        summary = RunSummary(
            status="interrupted" if outcome.interrupted else "completed",
            output_dir=str(self.output_dir),
            model=config.model.name,
            method=config.method_type,
            task=config.task["type"],
            trainable_params=trainable,
            all_params=total,
            epochs_done=progress.epoch,
            global_step=progress.global_step,
            total_steps=self.trainer.plan.total_steps,
            train_time_s=round(progress.train_time_s, 2),
            tokens_per_s=round(progress.tokens_seen / progress.train_time_s, 1)
            if progress.train_time_s
            else None,
            baselines=self.baselines,
            world_size=self.accelerator.num_processes,
            strategy=plan_of(self.accelerator).strategy,
            offload=plan_of(self.accelerator).offload,
            offload_note=offload_note(self.accelerator),
        )
        records = read_metrics(self.run.metrics) if self.main else []
        before = [r for r in records if r.get("kind") == "eval" and r.get("epoch") == 0]
        if before:
            summary.before_training = {
                k: v for k, v in before[0].items() if k not in ("kind", "step")
            }
        if outcome.interrupted:
            summary.checkpoint = str(outcome.checkpoint)
            summary.resume = f"peftkit train {config.source or 'CONFIG'} --resume"
        return summary

    def _keep_adapter(self, outcome: TrainOutcome, summary: RunSummary) -> SplitEvaluation | None:
        """Restore the best epoch's adapter when asked (else keep the last), save it; returns the
        evaluation of the adapter kept."""
        trainer, progress = self.trainer, outcome.progress
        chosen, evaluation = "last", outcome.last
        if (
            self.config.load_best_at_end
            and progress.best_epoch is not None
            and trainer.restore_best()
        ):
            chosen = (
                f"best (epoch {progress.best_epoch}, "
                f"{trainer.best_metric_name}={progress.best_metric:.4f})"
            )
            evaluation = outcome.best
            if evaluation is None and self.splits.eval:
                # resumed after the best epoch: recompute its predictions (not logged again, so
                # metrics.jsonl stays the record of one uninterrupted run)
                evaluation = evaluate_split(
                    trainer.eval_context(), self.task, self.splits.eval, trainer.eval_features
                )
        adapter_dir = self.run.adapter
        with MemoryTracker("save", self.accelerator.device) as memory:
            with full_weights(trainer.unwrapped):  # sharded (ZeRO-3, FSDP2): every rank gathers
                if self.main:
                    trainer.unwrapped.save_pretrained(adapter_dir)
            self.accelerator.wait_for_everyone()
        trainer.report_memory(memory.result, progress.epoch)
        summary.adapter, summary.adapter_choice = str(adapter_dir), chosen
        summary.best = {
            "metric": trainer.best_metric_name,
            "value": progress.best_metric,
            "epoch": progress.best_epoch,
            "step": progress.best_step,
        }
        self.log.info(f"adapter: {adapter_dir} ({chosen})")
        return evaluation

    def _task_files(self) -> None:
        """What the task itself writes into the run folder after training, when it has
        something (text_to_image: the adapter in diffusers' layout, sample grids)."""
        write = getattr(self.task, "write_run_files", None)
        if not self.main or not callable(write):
            return
        rows = self.splits.eval or self.splits.train
        for line in write(
            self.output_dir, self.trainer.unwrapped, self.trainer.eval_context(), rows
        ):
            self.log.info(line)

    def _method_report(self) -> dict[str, Any] | None:
        """The adapter method's own account of the run (AdaLoRA: the ranks it kept), when the
        method has one: ``write_run_report(folder, plots) -> (log text, summary dict)``."""
        report = getattr(self.trainer.unwrapped.adapter_model, "write_run_report", None)
        if not self.main or not callable(report):
            return None
        text, details = report(self.output_dir, self.config.plots)
        self.log.info(text)
        return details

    def _write_predictions(self, evaluation: SplitEvaluation, split: str) -> Path | None:
        if not self.main:
            return None
        return evaluation.write_predictions(self.run.predictions(split))

    def _run_test(self) -> tuple[dict[str, Any], Path | None]:
        """Score the test split when it has references, else label it."""
        test, trainer = self.splits.test, self.trainer
        if self.task.has_targets(test):
            plan = trainer.plan
            evaluation = trainer.evaluate(
                plan.num_epochs, plan.total_steps, test, self.task.encode(test), phase="test"
            )
            if evaluation is None:  # the rows encoded to nothing
                return {"rows": len(test)}, None
            metrics = evaluation.metrics
            self.log.info(
                "test: "
                + " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
            )
            return {"rows": len(test), **metrics}, self._write_predictions(evaluation, "test")
        start = time.perf_counter()
        preds = self.task.predict(trainer.eval_context(), test)
        elapsed = time.perf_counter() - start
        path = None
        if self.main and preds:
            path = write_predictions(self.run.predictions("test"), test, preds)
            total = self.splits.test_total
            more = (
                f" (the first {len(test)} of {total}; set data.test.limit to label more)"
                if len(test) < total
                else ""
            )
            self.log.info(f"test: labelled {len(test)} rows in {elapsed:.1f} s -> {path}{more}")
            if self.spec.labels:
                counts: dict[str, int] = {}
                for p in preds:
                    counts[p] = counts.get(p, 0) + 1
                self.log.info(
                    "test prediction counts: "
                    + ", ".join(f"{k!r}: {v}" for k, v in sorted(counts.items()))
                )
        return {
            "rows": len(test),
            "total_rows": self.splits.test_total,
            "time_s": round(elapsed, 2),
        }, path


def _headline(task: Task, metrics: dict[str, float], baselines: dict[str, Any]) -> str:
    """The one line a user reads first: the best metric, the others, the task's baselines."""
    name = getattr(task, "best_metric", "eval_loss")
    parts = [f"eval {name}={metrics.get(name, float('nan')):.4f}"]
    for key in ("accuracy", "macro_f1", "rouge_l", "bleu", "perplexity"):
        if key != name and key in metrics:
            parts.append(f"{key}={metrics[key]:.4f}")
    line = task.baseline_line(baselines) if baselines else None
    if line:
        parts.append(f"| {line}")
    return " ".join(parts)


def _anon_peak(memory: list[dict[str, Any]]) -> int | None:
    """Peak anonymous CPU MB (RssAnon) over every phase; None where it was not measured."""
    values = [m["cpu_anon_peak"] for m in memory if m.get("cpu_anon_peak") is not None]
    return max(values) if values else None


def _peaks(memory: list[dict[str, Any]]) -> tuple[int | None, int | None]:
    """Peak CPU and GPU MB over every phase's memory report."""
    cpu = max((m.get("cpu_peak") or 0 for m in memory), default=None)
    gpus = [m.get("gpu_peak") for m in memory if m.get("gpu_peak") is not None]
    return cpu, max(gpus) if gpus else None


__all__ = ["RunSummary", "TrainRecipe", "run_train", "write_predictions"]
