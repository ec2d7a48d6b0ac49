"""The training loop, on ``accelerate``: accumulation, mixed precision, clipping, warm-up schedule,
evaluation every epoch, best-checkpoint tracking, resumable checkpoints and Ctrl-C.

One epoch::

    batches of (seed, epoch) permutation ──> forward ──> loss / window ──> backward
          (skip those done, on resume)              every grad_accum micro-batches:
                                                      clip -> optimizer.step -> scheduler.step
                                                      -> update_and_allocate (AdaLoRA) -> zero_grad
                                                      -> log, checkpoint every save_steps, Ctrl-C?
    then: memory report, eval (loss + task metrics + memory report; the task's one-line warning
          when the result looks broken, e.g. accuracy 0 while the loss fell), best?, checkpoint

Memory: only the loss outlives the forward (the logits are freed before backward allocates
their gradient), and on the CPU the heap's free pages go back to the kernel just before the
output head (``trim_heap: head``; ``blocks`` also before every repeated block; see
:mod:`peftkit.heap`), where a language model's step peaks, and once before each evaluation.

Gradient accumulation is done here rather than by ``accelerator.accumulate``: each window's loss is
divided by the window's *actual* size (the last window of an epoch may be short), and windows
never straddle epochs, so a checkpoint between steps is always a clean cut.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Sampler

from ..checkpoint import atomic_folder, atomic_write_text, save_tensors
from ..heap import trim_now, trimming_heap
from ..progress import progress_bar
from ..tasks.base import EvalContext, Task
from .config import RunConfig
from .distributed import SHARDING, check_prepared, full_weights, plan_of, prepare_for_strategy
from .distributed import make_accelerator as make_accelerator  # re-exported for train/__init__
from .evaluate import SplitEvaluation, evaluate_split
from .logger import RunLog, first_loss, read_metrics
from .memory import MemoryTracker, PhaseMemory, StepParts
from .run_folder import RunFolder
from .schedule import make_scheduler, warmup_steps
from .state import (
    Progress,
    full_trainable_tensors,
    load_checkpoint,
    load_trainable,
    save_checkpoint,
)


class EpochBatches(Sampler[list[int]]):
    """The batches of one epoch: a permutation seeded by ``seed + epoch``, cut into batches.

    With several processes each takes every ``num_replicas``-th batch (the batch list is padded
    by wrapping around so every process gets as many). ``set_epoch(e, skip=k)`` drops the first
    ``k`` of this process's batches (resume).
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        self.size, self.batch_size, self.seed, self.shuffle = size, batch_size, seed, shuffle
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def batches(self, epoch: int) -> list[list[int]]:
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.size, generator=gen).tolist()
        else:
            order = list(range(self.size))
        all_batches = [order[i : i + self.batch_size] for i in range(0, self.size, self.batch_size)]
        if self.num_replicas > 1 and all_batches:
            extra = (-len(all_batches)) % self.num_replicas
            all_batches += all_batches[:extra]
            all_batches = all_batches[self.rank :: self.num_replicas]
        return all_batches

    def __len__(self) -> int:
        return math.ceil(math.ceil(self.size / self.batch_size) / self.num_replicas)

    def __iter__(self):
        yield from self.batches(self.epoch)[self.skip :]


@dataclasses.dataclass
class StepPlan:
    """How many micro-batches, optimizer steps and epochs the run has."""

    batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    num_epochs: int


def plan_steps(num_examples: int, config: RunConfig, num_processes: int = 1) -> StepPlan:
    """Steps per epoch = ceil(batches / grad_accum); ``max_steps`` caps the total."""
    batches = math.ceil(math.ceil(num_examples / config.batch_size) / num_processes)
    if batches == 0:
        raise ValueError("no training examples: the train split encoded to nothing")
    steps = math.ceil(batches / config.grad_accum)
    total = config.epochs * steps
    epochs = config.epochs
    if config.max_steps is not None:
        total = config.max_steps
        epochs = math.ceil(total / steps)
    return StepPlan(batches, steps, total, epochs)


class StopFlag:
    """First Ctrl-C: finish the current step, save a resumable checkpoint, stop. Second: abort."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.requested = False
        self._log = log
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self._log(
            "\nCtrl-C: finishing this step, then saving a resumable checkpoint "
            "(press Ctrl-C again to abort without saving)"
        )

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


@dataclasses.dataclass
class TrainOutcome:
    """What :meth:`Trainer.train` hands back: where it stopped, the last and the best evaluation
    of this process's run (None when there was none), the checkpoint, the memory per phase."""

    progress: Progress
    interrupted: bool
    last: SplitEvaluation | None
    best: SplitEvaluation | None
    checkpoint: Path | None
    memory: list[dict[str, Any]]


class Trainer:
    """Trains a PeftModel on a task's features; see the module docstring for one epoch."""

    def __init__(
        self,
        config: RunConfig,
        model: torch.nn.Module,
        task: Task,
        train_features: Sequence[dict],
        output_dir: str | Path,
        log: RunLog,
        accelerator: Accelerator,
        eval_records: Sequence[dict] | None = None,
        eval_features: Sequence[dict] | None = None,
        on_step: Callable[[Progress], None] | None = None,
        setup_memory: Sequence[PhaseMemory] = (),
    ) -> None:
        self.config, self.task, self.log, self.accelerator = config, task, log, accelerator
        self.output_dir = Path(output_dir)
        self.eval_records = list(eval_records or [])
        self.eval_features = list(eval_features or [])
        self.on_step = on_step
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("the model has no trainable parameters; check method.target_modules")
        self.plan = plan_steps(len(train_features), config, accelerator.num_processes)
        self.memory: list[dict[str, Any]] = []
        for phase in setup_memory:  # load, adapter: measured before the trainer existed
            self.report_memory(phase, 0)
        with MemoryTracker("prepare", accelerator.device) as prepared:
            for note in prepare_for_strategy(model, accelerator, config):
                log.info(note)
            # built after: FSDP2 may have replaced the parameters with sharded ones
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
            total = self.plan.total_steps
            warm = warmup_steps(total, config.warmup_steps, config.warmup_ratio)
            self.scheduler = make_scheduler(optimizer, config.lr_scheduler, warm, total)
            # on the CPU the model stays where it is: accelerate's device there is `cpu:0`,
            # which `Module.to` takes for another device and copies every weight to (2.1 GB
            # of bloomz-560m out of its memory map, twice that at the peak)
            placement = None  # DeepSpeed places its own (and refuses a placement list)
            if accelerator.device.type == "cpu" and not plan_of(accelerator).strategy.startswith(
                "zero"
            ):
                placement = [False, False]
            self.model, self.optimizer = accelerator.prepare(
                model, optimizer, device_placement=placement
            )
            check_prepared(self.model, accelerator)
        self.report_memory(prepared.result, 0)
        # FSDP2 replaces the parameters with sharded ones: clip (and gather) what now trains
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.sharded = plan_of(accelerator).strategy != "ddp"
        self.sampler = EpochBatches(
            len(train_features),
            config.batch_size,
            config.seed,
            num_replicas=accelerator.num_processes,
            rank=accelerator.process_index,
        )
        # A private generator: creating a DataLoader iterator draws a base seed from it, which
        # must not advance the global RNG (dropout masks) or a resumed epoch would diverge.
        self.loader = DataLoader(
            list(train_features),
            batch_sampler=self.sampler,
            collate_fn=task.collate,
            generator=torch.Generator().manual_seed(config.seed),
        )
        self.best_metric_name = config.metric_for_best or task.best_metric
        self.lower_is_better = task.lower_is_better(self.best_metric_name)
        self.best_snapshot: dict[str, torch.Tensor] | None = None

    # --- helpers ---------------------------------------------------------------------------
    @property
    def _backward_kwargs(self) -> dict[str, Any]:
        """DeepSpeed would divide by its accumulation count; the loss is already divided by
        the window's actual size (the last window of an epoch may be short)."""
        return (
            {"scale_wrt_gas": False}
            if hasattr(self.model, "set_gradient_accumulation_boundary")
            else {}
        )

    @property
    def trim_heap(self) -> str:
        """Where the heap is trimmed (``trim_heap``; ``auto``: before every block where the
        strategy gathers and frees each block's weights every step, else before the head)."""
        if self.config.trim_heap != "auto":
            return self.config.trim_heap
        return "blocks" if plan_of(self.accelerator).strategy in SHARDING else "head"

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def eval_context(self) -> EvalContext:
        return EvalContext(
            model=self.unwrapped,
            device=self.accelerator.device,
            batch_size=self.config.eval_batch_size or self.config.batch_size,
            autocast=self.accelerator.autocast,
            progress=self.config.progress and self.accelerator.is_main_process,
            lockstep=self.accelerator.num_processes > 1
            and plan_of(self.accelerator).strategy in SHARDING,
            rank=self.accelerator.process_index,
            world=self.accelerator.num_processes,
        )

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.accelerator.device) for k, v in batch.items()}

    def report_memory(self, memory: PhaseMemory, epoch: int) -> None:
        """This rank's report, then (several processes; every rank calls) the max over ranks."""
        entry: dict[str, Any] = {"epoch": epoch, "phase": memory.phase, **memory.as_dict()}
        for line in memory.lines():
            self.log.info(line)
        if self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            ranks = gather_object([memory.as_dict()])
            for line in PhaseMemory.max_over(memory.phase, ranks).lines():
                self.log.info(line)
            entry["ranks"] = ranks
        self.memory.append(entry)

    # --- evaluation ------------------------------------------------------------------------
    def evaluate(
        self,
        epoch: int,
        step: int,
        records: Sequence[dict] | None = None,
        features: Sequence[dict] | None = None,
        phase: str = "eval",
    ) -> SplitEvaluation | None:
        """Score the eval rows (or ``records``): logged, memory-reported, kept in metrics.jsonl."""
        records = self.eval_records if records is None else list(records)
        features = self.eval_features if features is None else list(features)
        if not features:
            return None
        trim_now(self.unwrapped, self.trim_heap)  # training's heap holes, given back
        # sharded: every forward gathers and frees each block's weights; trimmed as in training
        gathers = plan_of(self.accelerator).strategy in SHARDING
        with trimming_heap(self.unwrapped, self.trim_heap, inference=gathers):
            evaluation = evaluate_split(self.eval_context(), self.task, records, features, phase)
        release = getattr(self.model, "empty_partition_cache", None)
        if callable(release):  # ZeRO-3: nothing evaluation gathered stays gathered
            release()
            trim_now(self.unwrapped, self.trim_heap)
        self.report_memory(evaluation.memory, epoch)
        earlier = first_loss(read_metrics(self.log.metrics_path)) if self.log.enabled else None
        self.log.record(phase, step, epoch=epoch, time_s=evaluation.time_s, **evaluation.metrics)
        warning = self.task.result_warning(evaluation.metrics, evaluation.result, earlier)
        if warning:  # a result that looks broken says so (accuracy 0 with a falling loss)
            self.log.info(f"{phase} epoch {epoch}: {warning}")
        return evaluation

    def _is_better(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        return value < best if self.lower_is_better else value > best

    def _track_best(self, progress: Progress, metrics: dict[str, float], epoch: int) -> bool:
        name = self.best_metric_name
        if name not in metrics:
            raise ValueError(
                f"metric_for_best={name!r} is not among the eval metrics {sorted(metrics)}"
            )
        if not self._is_better(metrics[name], progress.best_metric):
            return False
        progress.best_metric, progress.best_step, progress.best_epoch = (
            float(metrics[name]),
            progress.global_step,
            epoch,
        )
        self.best_snapshot = full_trainable_tensors(self.unwrapped)
        with full_weights(self.unwrapped):  # every rank gathers; rank 0 writes
            if self.accelerator.is_main_process:
                self._save_best(progress)
        self.accelerator.wait_for_everyone()
        return True

    def _save_best(self, progress: Progress) -> None:
        """``<run>/best/``: the adapter (HF PEFT format) + exact trainable tensors + which epoch,
        swapped in whole (``checkpoint.atomic_folder``)."""
        import json

        info = {
            "metric": self.best_metric_name,
            "value": progress.best_metric,
            "epoch": progress.best_epoch,
            "step": progress.best_step,
        }
        run = RunFolder(self.output_dir)
        with atomic_folder(run.best) as tmp:  # the same names as run.best_tensors / .best_info
            self.unwrapped.save_pretrained(tmp)
            save_tensors(str(tmp / run.best_tensors.name), self.best_snapshot or {})
            atomic_write_text(str(tmp / run.best_info.name), json.dumps(info, indent=2) + "\n")

    def restore_best(self) -> bool:
        """Put the best epoch's trainable tensors back into the model (False: none recorded)."""
        if self.best_snapshot is None:
            path = RunFolder(self.output_dir).best_tensors
            if not path.exists():
                return False
            from safetensors.torch import load_file

            self.best_snapshot = load_file(str(path))
        with full_weights(self.unwrapped, modify=True):
            load_trainable(self.unwrapped, self.best_snapshot)
        return True

    # --- training --------------------------------------------------------------------------
    def train(self, resume_from: str | Path | None = None) -> TrainOutcome:
        """Run (or continue) training; returns when done, or after Ctrl-C with a checkpoint."""
        progress = Progress()
        last = best = None
        if resume_from is not None:
            progress = load_checkpoint(
                resume_from, self.unwrapped, self.optimizer, self.scheduler, self.model
            )
            self.log.info(
                f"resumed from {resume_from}: epoch {progress.epoch + 1}, batch "
                f"{progress.batch_in_epoch}, step {progress.global_step}/{self.plan.total_steps}"
            )
        elif self.config.eval_before_training and self.eval_features:
            last = self.evaluate(epoch=0, step=0)
            self.log.info("before training: " + _format_metrics(last.metrics))
        checkpoint = None
        with StopFlag(self.log.info) as stop:
            while (
                progress.epoch < self.plan.num_epochs
                and progress.global_step < self.plan.total_steps
            ):
                status = self._train_epoch(progress, stop)
                epoch = progress.epoch + 1
                if status == "interrupted":
                    checkpoint = self._checkpoint(progress)
                    self.log.info(
                        f"interrupted at step {progress.global_step}; resumable "
                        f"checkpoint: {checkpoint}"
                    )
                    return TrainOutcome(progress, True, last, best, checkpoint, self.memory)
                epoch_done = progress.batch_in_epoch >= self.plan.batches_per_epoch
                train_loss = progress.epoch_loss_sum / max(progress.epoch_batches, 1)
                summary = {"train_epoch_loss": train_loss}
                if self.task.loss_is_nll:
                    ppl = math.exp(train_loss) if train_loss < 700 else math.inf
                    summary = {"train_ppl": ppl, **summary}
                last_step = progress.global_step >= self.plan.total_steps
                if self.eval_features and (self.config.eval_every_epoch or last_step):
                    last = self.evaluate(epoch, progress.global_step)
                    summary.update(last.metrics)
                    if self._track_best(progress, last.metrics, epoch):
                        best = last
                self.log.record("epoch", progress.global_step, epoch=epoch, **summary)
                self.log.info(f"epoch={epoch}: " + _format_metrics(summary))
                if epoch_done:
                    progress.epoch += 1
                    progress.batch_in_epoch = 0
                    progress.epoch_loss_sum, progress.epoch_batches, progress.epoch_tokens = (
                        0.0,
                        0,
                        0,
                    )
                checkpoint = self._checkpoint(progress)
                if stop.requested:
                    self.log.info(
                        f"stopped after epoch {epoch}; resumable checkpoint: {checkpoint}"
                    )
                    return TrainOutcome(progress, True, last, best, checkpoint, self.memory)
        return TrainOutcome(progress, False, last, best, checkpoint, self.memory)

    def _checkpoint(self, progress: Progress) -> Path | None:
        """Every rank takes part (sharded weights and optimizer state); rank 0 writes the rest."""
        self.accelerator.wait_for_everyone()
        path = save_checkpoint(
            self.output_dir,
            self.unwrapped,
            self.optimizer,
            self.scheduler,
            progress,
            keep=self.config.save_total_limit,
            engine=self.model,
            accelerator=self.accelerator,
        )
        return path if self.accelerator.is_main_process else None

    def _train_epoch(self, progress: Progress, stop: StopFlag) -> str:
        """Train from ``progress``'s position to the end of its epoch; 'done' | 'max_steps' | 'interrupted'.

        ::

            each micro-batch        _micro_batch: forward + backward, loss and token count kept
                                    on the device (no host sync)
            end of a window         _optimizer_step: clip, step, schedule, AdaLoRA's allocation
            (grad_accum batches)    _finish_step: the window's numbers read once, the record,
                                    the bar, hooks, a checkpoint; whether to stop here
        """
        config, acc, plan = self.config, self.accelerator, self.plan
        nb, ga = plan.batches_per_epoch, config.grad_accum
        self.sampler.set_epoch(progress.epoch, skip=progress.batch_in_epoch)
        self.model.train()
        bar = progress_bar(
            plan.steps_per_epoch,
            desc=f"epoch {progress.epoch + 1}/{plan.num_epochs}",
            unit="step",
            initial=progress.batch_in_epoch // ga,
            enabled=config.progress and acc.is_main_process,
        )
        status = None
        window = _Window()
        gathers = plan_of(acc).strategy in SHARDING  # a block's weights gathered in backward too
        trim = trimming_heap(self.unwrapped, self.trim_heap, backward=gathers)
        parts = StepParts(acc.device)  # where a step peaks: forward, backward, optimizer
        with MemoryTracker("train", acc.device) as mem, trim:
            for index, batch in enumerate(self.loader, start=progress.batch_in_epoch):
                window_start = (index // ga) * ga
                size = min(ga, nb - window_start)  # micro-batches in this window
                last_in_window = index - window_start + 1 == size
                window.add(*self._micro_batch(batch, size, last_in_window, parts))
                if not last_in_window:
                    continue
                grad_norm = self._optimizer_step(progress, parts)
                progress.global_step += 1
                progress.batch_in_epoch = index + 1
                status = self._finish_step(progress, window, grad_norm, bar, stop)
                if status is not None:
                    break
        bar.close()
        self.report_memory(parts.add_to(mem.result), progress.epoch + 1)
        return status or "done"

    def _micro_batch(
        self, batch: dict[str, torch.Tensor], window: int, last_in_window: bool, parts: StepParts
    ) -> tuple[torch.Tensor, torch.Tensor | int]:
        """Forward + backward of one micro-batch (its loss scaled by the window's size);
        returns the detached loss and the token count, still on the device."""
        acc = self.accelerator
        batch = self._to_device(batch)
        sync = contextlib.nullcontext() if last_in_window else acc.no_sync(self.model)
        # DeepSpeed steps inside backward at a window's end; our windows, our scaling
        acc.gradient_state._set_sync_gradients(last_in_window)
        with sync:
            with acc.autocast(), parts.part("forward"):
                # only the loss: the logits (batch x seq x vocab) go before backward
                # allocates their gradients, instead of living through it
                loss_t = self.model(**batch).loss
            with parts.part("backward"):
                acc.backward(loss_t / window, **self._backward_kwargs)
        return loss_t.detach(), self._tokens_of(batch)

    def _tokens_of(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | int:
        """What tokens/s counts in a batch: the attention mask's ones, else every input id,
        else the task's own count (images: one per example)."""
        mask = batch.get("attention_mask")
        if mask is not None:
            return mask.sum()
        ids = batch.get("input_ids")
        return ids.numel() if ids is not None else self.task.count_targets(batch)

    def _optimizer_step(self, progress: Progress, parts: StepParts) -> float | None:
        """Clip, step, schedule, AdaLoRA's allocation, zero the gradients; the clipped norm."""
        config, acc = self.config, self.accelerator
        with parts.part("optimizer"):
            grad_norm = None
            if config.max_grad_norm is not None:
                grad_norm = float(acc.clip_grad_norm_(self.params, config.max_grad_norm))
            self.optimizer.step()
            if not acc.optimizer_step_was_skipped:
                self.scheduler.step()
            allocate = getattr(
                getattr(self.unwrapped, "base_model", None), "update_and_allocate", None
            )
            if callable(allocate):  # AdaLoRA: re-budget ranks from these gradients
                with full_weights(self.unwrapped, modify=True):  # sharded: whole, then back
                    allocate(progress.global_step)
            self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _finish_step(
        self,
        progress: Progress,
        window: _Window,
        grad_norm: float | None,
        bar: Any,
        stop: StopFlag,
    ) -> str | None:
        """Account for the window just stepped (one host sync), record it, move the bar, run
        the hooks and a due checkpoint; returns why the epoch ends here, or None."""
        config, nb = self.config, self.plan.batches_per_epoch
        losses, tokens, elapsed = window.close()
        for loss in losses:  # in micro-batch order, as a running sum
            progress.epoch_loss_sum += loss
            progress.epoch_batches += 1
        progress.train_time_s += elapsed
        progress.tokens_seen += tokens
        progress.epoch_tokens += tokens
        step_loss = sum(losses) / len(losses)
        tok_s = tokens / elapsed if elapsed > 0 else 0.0
        if progress.global_step % config.logging_steps == 0 or progress.batch_in_epoch == nb:
            self.log.record(
                "train",
                progress.global_step,
                epoch=progress.epoch + progress.batch_in_epoch / nb,
                loss=step_loss,
                lr=self.scheduler.get_last_lr()[0],
                grad_norm=grad_norm,
                tokens_per_s=tok_s,
            )
        bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tok_s:.0f}", refresh=False)
        bar.update(1)
        if self.on_step is not None:
            self.on_step(progress)
        if config.save_steps and progress.global_step % config.save_steps == 0:
            self._checkpoint(progress)
        status = None
        if progress.global_step >= self.plan.total_steps:
            status = "max_steps" if progress.batch_in_epoch < nb else "done"
        elif stop.requested:
            status = "interrupted" if progress.batch_in_epoch < nb else "done"
        window.reset()  # the next window's time starts after the hooks and the checkpoint
        return status


class _Window:
    """The micro-batches since the last optimizer step: their losses and token counts, kept
    on the device until the step ends (one host sync per step), and when the window began."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.tokens: list[torch.Tensor | int] = []
        self.start = time.perf_counter()

    def add(self, loss: torch.Tensor, tokens: torch.Tensor | int) -> None:
        self.losses.append(loss)
        self.tokens.append(tokens)

    def close(self) -> tuple[list[float], int, float]:
        """``(losses, tokens, seconds since the window began)`` as host numbers; the time is
        taken after reading them, so it covers the window's device work."""
        losses = torch.stack([loss.float() for loss in self.losses]).tolist()
        counts = [t for t in self.tokens if isinstance(t, torch.Tensor)]
        tokens = sum(t for t in self.tokens if not isinstance(t, torch.Tensor))
        if counts:
            tokens += int(torch.stack(counts).sum())
        return losses, int(tokens), time.perf_counter() - self.start


def _format_metrics(metrics: dict[str, Any]) -> str:
    parts = []
    for key, value in metrics.items():
        parts.append(f"{key}={value:.4f}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts)
