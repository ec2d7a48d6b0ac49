"""One training run from a checked config to a finished run folder.

::

    RunConfig ─> task ─> splits (read, held out, limited) ─> columns/labels checked
              ─> base model + tokenizer (models.load_base_model) ─> features
              ─> adapter config (method block -> registry class) ─> get_peft_model
              ─> Trainer.train (resume?) ─> best adapter ─> eval / test predictions
              ─> <output_dir>/: adapter/ config.yaml metrics.jsonl summary.json plots predictions

Nothing heavy happens before the data has been read and checked against the task.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import atomic_write_text
from ..progress import quiet_library_bars
from ..tasks import EvalResult, Task
from .config import ConfigError, RunConfig, config_to_yaml, read_yaml
from .logger import RunLog, read_metrics
from .loop import Trainer, TrainOutcome, evaluate_rows, make_accelerator, plan_steps
from .setup import attach_adapter, build_task, check_data, load_model, trainable_line
from .splits import Splits, load_splits
from .state import Progress, latest_checkpoint

TASK_STATE = "task_state.json"


def default_output_dir(config: RunConfig) -> Path:
    stem = Path(config.source).stem if config.source else "peftkit"
    return Path("runs") / stem


def _cell(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ||| ".join(str(v) for v in value)
    return "" if value is None else str(value)


def write_predictions(
    path: Path,
    rows: Sequence[dict],
    predictions: Sequence[str],
    references: Sequence[Any] | None = None,
) -> Path:
    """CSV of each row's columns + ``prediction`` (+ ``reference`` and ``correct``), atomically."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    extra = ["prediction"] + (["reference", "correct"] if references is not None else [])
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(columns + extra)
    for i, row in enumerate(rows):
        cells = [_cell(row.get(c)) for c in columns] + [predictions[i]]
        if references is not None:
            ref = references[i]
            correct = predictions[i] in ref if isinstance(ref, list) else predictions[i] == ref
            cells += [_cell(ref), str(bool(correct)).lower()]
        writer.writerow(cells)
    atomic_write_text(str(path), buf.getvalue())
    return path


def _resolve_resume(output_dir: Path, resume: bool | str | None) -> Path | None:
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


def _prepare_output(output_dir: Path, resuming: bool, overwrite: bool) -> None:
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


def _config_changes(output_dir: Path, config: RunConfig) -> list[str]:
    saved_path = output_dir / "config.yaml"
    if not saved_path.exists():
        return []
    saved = read_yaml(saved_path)
    now = config.to_dict()
    ignore = {"output_dir", "progress", "tensorboard", "plots"}
    return sorted(
        k for k in set(saved) | set(now) if k not in ignore and saved.get(k) != now.get(k)
    )


def run_train(
    config: RunConfig,
    resume: bool | str | None = None,
    overwrite: bool = False,
    on_step: Callable[[Progress], None] | None = None,
) -> dict[str, Any]:
    """Train per ``config``; returns the summary (also written to ``summary.json``)."""
    wall_start = time.perf_counter()
    quiet_library_bars()
    output_dir = Path(config.output_dir) if config.output_dir else default_output_dir(config)
    config.output_dir = str(output_dir)
    checkpoint = _resolve_resume(output_dir, resume)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    task = build_task(config)
    splits = load_splits(config)
    check_data(task, splits, config.source)

    accelerator = make_accelerator(config)
    main = accelerator.is_main_process
    if main:
        _prepare_output(output_dir, checkpoint is not None, overwrite)
    resume_step = None
    if checkpoint is not None:
        resume_step = json.loads((checkpoint / "trainer_state.json").read_text())["progress"][
            "global_step"
        ]
    log = RunLog(output_dir, enabled=main, tensorboard=config.tensorboard, resume_step=resume_step)
    try:
        return _train(
            config, task, splits, accelerator, log, output_dir, checkpoint, on_step, wall_start
        )
    finally:
        log.close()


def _train(
    config: RunConfig,
    task: Task,
    splits: Splits,
    accelerator: Any,
    log: RunLog,
    output_dir: Path,
    checkpoint: Path | None,
    on_step: Any,
    wall_start: float,
) -> dict[str, Any]:
    from accelerate.utils import set_seed

    if checkpoint is not None:
        changed = _config_changes(output_dir, config)
        if changed:
            log.info(
                f"warning: resuming with config changes in {changed}; the run will not "
                "repeat the original one exactly"
            )
    log.info(f"peftkit train: {config.source or '<config>'} -> {output_dir}")
    for note in splits.notes:
        log.info("data " + note)
    set_seed(config.seed)
    load_start = time.perf_counter()
    model, tokenizer = load_model(config, task)
    log.info(
        f"model: {config.model.name} ({type(model).__name__}, loaded in "
        f"{time.perf_counter() - load_start:.1f} s)"
    )
    train_features = task.encode(splits.train)
    eval_features = task.encode(splits.eval) if splits.eval else []
    plan = plan_steps(len(train_features), config, accelerator.num_processes)
    peft_model = attach_adapter(config, model, task, plan.total_steps)
    log.info(
        f"method: {config.method_type} -> {type(peft_model).__name__}; {trainable_line(peft_model)}"
    )
    log.info(
        f"plan: {len(train_features)} train examples, {plan.batches_per_epoch} batches of "
        f"{config.batch_size} per epoch, grad_accum {config.grad_accum} -> "
        f"{plan.steps_per_epoch} steps/epoch, {plan.total_steps} steps in {plan.num_epochs} "
        f"epoch(s); device {accelerator.device}, mixed precision {accelerator.mixed_precision}"
    )
    if accelerator.is_main_process:
        atomic_write_text(str(output_dir / "config.yaml"), config_to_yaml(config))
        labels = getattr(task, "labels", None)
        atomic_write_text(str(output_dir / TASK_STATE), json.dumps({"labels": labels}) + "\n")
    baselines = task.baselines(splits.train, splits.eval) if splits.eval else {}
    trainer = Trainer(
        config,
        peft_model,
        task,
        train_features,
        output_dir,
        log,
        accelerator,
        eval_records=splits.eval,
        eval_features=eval_features,
        on_step=on_step,
    )
    outcome = trainer.train(resume_from=checkpoint)
    summary = _finish(config, task, splits, trainer, outcome, baselines, output_dir, log)
    summary["wall_time_s"] = round(time.perf_counter() - wall_start, 2)
    if accelerator.is_main_process:
        atomic_write_text(str(output_dir / "summary.json"), json.dumps(summary, indent=2) + "\n")
    return summary


def _finish(
    config: RunConfig,
    task: Task,
    splits: Splits,
    trainer: Trainer,
    outcome: TrainOutcome,
    baselines: dict[str, Any],
    output_dir: Path,
    log: RunLog,
) -> dict[str, Any]:
    """Pick the adapter to keep, write it, predict on eval/test, plot, summarise."""
    main = trainer.accelerator.is_main_process
    progress = outcome.progress
    model = trainer.unwrapped
    summary: dict[str, Any] = {
        "status": "interrupted" if outcome.interrupted else "completed",
        "output_dir": str(output_dir),
        "model": config.model.name,
        "method": config.method_type,
        "task": config.task["type"],
        "trainable_params": model.get_nb_trainable_parameters()[0],
        "all_params": model.get_nb_trainable_parameters()[1],
        "epochs_done": progress.epoch,
        "global_step": progress.global_step,
        "total_steps": trainer.plan.total_steps,
        "train_time_s": round(progress.train_time_s, 2),
        "tokens_per_s": round(progress.tokens_seen / progress.train_time_s, 1)
        if progress.train_time_s
        else None,
        "baselines": baselines,
    }
    records = read_metrics(output_dir / "metrics.jsonl") if main else []
    before = [r for r in records if r.get("kind") == "eval" and r.get("epoch") == 0]
    if before:
        summary["before_training"] = {
            k: v for k, v in before[0].items() if k not in ("kind", "step")
        }
    if outcome.interrupted:
        summary["checkpoint"] = str(outcome.checkpoint)
        summary["resume"] = f"peftkit train {config.source or 'CONFIG'} --resume"
        summary.update(_memory_summary(outcome.memory))
        return summary
    chosen = "last"
    result: EvalResult | None = outcome.last_result
    final_eval = outcome.last_eval
    if config.load_best_at_end and progress.best_epoch is not None and trainer.restore_best():
        chosen = f"best (epoch {progress.best_epoch}, {trainer.best_metric_name}={progress.best_metric:.4f})"
        result, final_eval = outcome.best_result, outcome.best_eval
        if result is None and splits.eval:
            # resumed after the best epoch: recompute its predictions (not logged again, so
            # metrics.jsonl stays the record of one uninterrupted run)
            final_eval, result = evaluate_rows(
                trainer.eval_context(), task, splits.eval, trainer.eval_features
            )
    adapter_dir = output_dir / "adapter"
    if main:
        model.save_pretrained(adapter_dir)
    summary["adapter"] = str(adapter_dir)
    summary["adapter_choice"] = chosen
    if main and config.method_type == "adalora":
        summary["adalora"] = _report_adalora_ranks(model, output_dir, config.plots, log)
    summary["best"] = {
        "metric": trainer.best_metric_name,
        "value": progress.best_metric,
        "epoch": progress.best_epoch,
        "step": progress.best_step,
    }
    summary["eval"] = final_eval
    log.info(f"adapter: {adapter_dir} ({chosen})")
    predictions: dict[str, str] = {}
    if main and result is not None and result.predictions:
        rows = result.rows if result.rows is not None else splits.eval
        path = write_predictions(
            output_dir / "predictions_eval.csv", rows, result.predictions, result.references
        )
        predictions["eval"] = str(path)
    if final_eval:
        line = _headline(task, final_eval, baselines)
        log.info(line)
        summary["headline"] = line
    if splits.test:
        summary["test"], test_path = _run_test(task, splits, trainer, output_dir, main, log)
        if test_path is not None:
            predictions["test"] = str(test_path)
    summary["predictions"] = predictions
    summary.update(_memory_summary(outcome.memory))
    log.info(
        f"peak memory: CPU {summary['peak_cpu_mb']} MB"
        + (f", GPU {summary['peak_gpu_mb']} MB" if summary.get("peak_gpu_mb") is not None else "")
    )
    if main and config.plots:
        from .plots import plot_run

        plot_run(read_metrics(output_dir / "metrics.jsonl"), output_dir, baselines)
    return summary


def _report_adalora_ranks(model: Any, output_dir: Path, plots: bool, log: RunLog) -> dict:
    """Where AdaLoRA put its budget: a rank table in the log and ``adalora_ranks.txt``, a
    heatmap ``adalora_ranks.png`` beside ``loss.png``, the per-matrix ranks in the summary."""
    from ..methods.adalora_report import final_ranks, plot_rank_heatmap, rank_report

    table = rank_report(model)
    log.info(table)
    atomic_write_text(str(output_dir / "adalora_ranks.txt"), table + "\n")
    ranks = final_ranks(model)
    report: dict[str, Any] = {
        "ranks": ranks,
        "kept": sum(ranks.values()),
        "mean_rank": round(sum(ranks.values()) / max(len(ranks), 1), 3),
    }
    if plots:
        report["heatmap"] = plot_rank_heatmap(model, output_dir / "adalora_ranks.png")
    return report


def _headline(task: Task, metrics: dict[str, float], baselines: dict[str, Any]) -> str:
    name = getattr(task, "best_metric", "eval_loss")
    parts = [f"eval {name}={metrics.get(name, float('nan')):.4f}"]
    for key in ("accuracy", "macro_f1", "rouge_l", "bleu", "perplexity"):
        if key != name and key in metrics:
            parts.append(f"{key}={metrics[key]:.4f}")
    base = baselines.get("majority_accuracy")
    if base is not None:
        parts.append(
            f"| majority-class baseline accuracy={base:.4f} (always "
            f"{baselines.get('majority_label')!r}), macro_f1="
            f"{baselines.get('majority_macro_f1', 0.0):.4f}"
        )
    return " ".join(parts)


def _run_test(
    task: Task, splits: Splits, trainer: Trainer, output_dir: Path, main: bool, log: RunLog
) -> tuple[dict[str, Any], Path | None]:
    test = splits.test
    if task.has_targets(test):
        features = task.encode(test)
        metrics, result = trainer.evaluate(
            trainer.plan.num_epochs,
            trainer.plan.total_steps,
            records=test,
            features=features,
            phase="test",
        )
        log.info(
            "test: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        )
        path = None
        if main and result is not None and result.predictions:
            rows = result.rows if result.rows is not None else test
            path = write_predictions(
                output_dir / "predictions_test.csv", rows, result.predictions, result.references
            )
        return {"rows": len(test), **metrics}, path
    start = time.perf_counter()
    preds = task.predict(trainer.eval_context(), test)
    elapsed = time.perf_counter() - start
    path = None
    if main and preds:
        path = write_predictions(output_dir / "predictions_test.csv", test, preds)
        more = (
            f" (the first {len(test)} of {splits.test_total}; set data.test.limit to label more)"
            if len(test) < splits.test_total
            else ""
        )
        log.info(f"test: labelled {len(test)} rows in {elapsed:.1f} s -> {path}{more}")
        counts: dict[str, int] = {}
        for p in preds:
            counts[p] = counts.get(p, 0) + 1
        if getattr(task, "labels", None):
            log.info(
                "test prediction counts: "
                + ", ".join(f"{k!r}: {v}" for k, v in sorted(counts.items()))
            )
    return {"rows": len(test), "total_rows": splits.test_total, "time_s": round(elapsed, 2)}, path


def _memory_summary(memory: list[dict[str, Any]]) -> dict[str, Any]:
    cpu = max((m.get("cpu_peak") or 0 for m in memory), default=None)
    gpus = [m.get("gpu_peak") for m in memory if m.get("gpu_peak") is not None]
    return {"peak_cpu_mb": cpu, "peak_gpu_mb": max(gpus) if gpus else None, "memory": memory}


__all__ = ["run_train", "write_predictions"]
