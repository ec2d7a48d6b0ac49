"""Resumable training checkpoints: everything needed to continue bit for bit.

::

    <run>/checkpoints/step-00000050/          (run_folder.RunFolder.checkpoint(50))
        adapter/                  the adapter at this step, HF PEFT format (usable on its own)
        trainable.safetensors     every trainable tensor by its in-memory name (exact bits)
        optimizer.pt              optimizer state (moments, step counts); FSDP2: gathered whole
        deepspeed/                ZeRO-2/3 instead of optimizer.pt: DeepSpeed's own checkpoint of
                                  the trainable partitions (fp32 master weights + moments, per rank)
        scheduler.pt              LR scheduler state
        rng/rank-<r>.safetensors  each rank's torch CPU (+ CUDA) generator states, and
        rng/rank-<r>.json         its Python / NumPy ones (the ranks' streams differ)
        method_state.pt           a method's own training state, when it has one (AdaLoRA)
        trainer_state.json        position (epoch, batch in epoch, global step), running epoch
                                  loss, best metric so far

A checkpoint is taken only between optimizer steps, where parameters, optimizer and RNG are a
consistent snapshot; the data order of an epoch is a pure function of (seed, epoch), so skipping
the batches already consumed puts the resumed run exactly where the first one stopped. Each
checkpoint is written into a temporary folder and renamed into place, so an interrupted save
never leaves a half checkpoint that ``--resume`` would pick up. ``.pt`` files load with
``torch.load(weights_only=True)``. With several processes every rank calls save/load (sharded
weights are gathered, DeepSpeed writes each rank's partition); rank 0 writes everything else.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..checkpoint import (
    atomic_file,
    atomic_write_text,
    replace_folder,
    save_tensors,
    temp_folder_for,
)
from .distributed import full_weights, plan_of
from .run_folder import CHECKPOINT_STATE, RunFolder

RNG_DIR = "rng"


@dataclasses.dataclass
class Progress:
    """Where the loop stands; saved in ``trainer_state.json``."""

    epoch: int = 0  # the epoch in progress (0-based)
    batch_in_epoch: int = 0  # micro-batches of that epoch already consumed
    global_step: int = 0  # optimizer steps done
    epoch_loss_sum: float = 0.0  # sum of micro-batch losses in the epoch so far
    epoch_batches: int = 0
    epoch_tokens: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    best_epoch: int | None = None
    train_time_s: float = 0.0
    tokens_seen: int = 0


def trainable_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters by name (what the optimizer changes), detached."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def trainable_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def full_trainable_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable tensors, whole (gathered when ZeRO-3 partitions or FSDP2 shards them) and
    copied to CPU. Every rank must call it."""
    with full_weights(model):
        return {k: v.to("cpu", copy=True) for k, v in trainable_tensors(model).items()}


def load_trainable(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy saved trainable tensors back, refusing a mismatch in names or shapes. Sharded
    parameters must be whole when this runs (see :func:`distributed.full_weights`)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(tensors))
    unexpected = sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ValueError(
            "checkpoint does not match the model being trained "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected "
            f"{unexpected[:3]}{'...' if len(unexpected) > 3 else ''}); resume with the same "
            "config the run was started with"
        )
    with torch.no_grad():
        for name, param in params.items():
            value = tensors[name]
            if value.shape != param.shape:
                raise ValueError(
                    f"checkpoint tensor {name} has shape {tuple(value.shape)}, the model "
                    f"{tuple(param.shape)}: resume with the config the run was started with"
                )
            param.copy_(value.to(param.device, param.dtype))


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state
    py = random.getstate()
    plain: dict[str, Any] = {"python": [py[0], list(py[1]), py[2]]}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        plain["numpy"] = [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    except ImportError:
        pass
    return tensors, plain


def _set_rng_state(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    if "python" in plain:
        version, state, gauss = plain["python"]
        random.setstate((version, tuple(state), gauss))
    if "numpy" in plain:
        import numpy as np

        kind, keys, pos, has_gauss, cached = plain["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _rank(accelerator: Any) -> int:
    return int(accelerator.process_index) if accelerator is not None else 0


def _save_rank_rng(folder: Path, accelerator: Any) -> None:
    """``rng/rank-<r>.safetensors`` + ``.json``: this rank's generators. The ranks' streams part
    after the first step: each draws dropout masks (and augmentations) for batches of its own
    shapes, so rank 0's state restored on every rank would not continue the run."""
    rank = _rank(accelerator)
    (folder / RNG_DIR).mkdir(exist_ok=True)
    tensors, plain = _rng_state()
    save_tensors(str(folder / RNG_DIR / f"rank-{rank}.safetensors"), tensors)
    atomic_write_text(str(folder / RNG_DIR / f"rank-{rank}.json"), json.dumps(plain) + "\n")


def _load_rank_rng(folder: Path, state: dict[str, Any]) -> None:
    """This rank's generators from ``folder`` (its own file; rank 0's where a run resumes with
    more processes than it had; the single ``rng.safetensors`` of older checkpoints)."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    files = folder / RNG_DIR
    for r in (rank, 0):
        if (files / f"rank-{r}.safetensors").exists():
            plain = json.loads((files / f"rank-{r}.json").read_text(encoding="utf-8"))
            _set_rng_state(load_file(str(files / f"rank-{r}.safetensors")), plain)
            return
    _set_rng_state(load_file(str(folder / "rng.safetensors")), state.get("rng", {}))


def _torch_save(obj: Any, path: Path) -> None:
    with atomic_file(path) as tmp:
        torch.save(obj, tmp)


def checkpoint_dir(output_dir: str | os.PathLike, step: int) -> Path:
    return RunFolder(output_dir).checkpoint(step)


def _barrier(accelerator: Any) -> None:
    if accelerator is not None:
        accelerator.wait_for_everyone()


def save_checkpoint(
    output_dir: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    progress: Progress,
    keep: int | None = None,
    engine: torch.nn.Module | None = None,
    accelerator: Any = None,
) -> Path:
    """Write a checkpoint for ``progress.global_step`` (atomically) and prune old ones.

    ``model`` is the unwrapped PeftModel; ``engine`` what ``accelerator.prepare`` returned
    (the DeepSpeed engine or FSDP2 module) when several processes train: then every rank calls.
    """
    main = accelerator is None or accelerator.is_main_process
    strategy = plan_of(accelerator).strategy if accelerator is not None else "ddp"
    final = checkpoint_dir(output_dir, progress.global_step)
    tmp = temp_folder_for(final, shared=True, create=main)  # every rank writes its part here
    _barrier(accelerator)
    tensors = full_trainable_tensors(model)
    with full_weights(model):
        if main:
            model.save_pretrained(tmp / "adapter")
    if strategy in ("zero2", "zero3"):
        engine.save_checkpoint(str(tmp / "deepspeed"), tag="state", exclude_frozen_parameters=True)
    elif strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        optim_state = get_optimizer_state_dict(engine, optimizer.optimizer, options=options)
        if main:
            _torch_save(optim_state, tmp / "optimizer.pt")
    elif main:
        _torch_save(optimizer.state_dict(), tmp / "optimizer.pt")
    _save_rank_rng(tmp, accelerator)  # every rank: each has drawn its own dropout masks
    _barrier(accelerator)  # every rank's parts are in the folder before it is renamed
    if not main:
        _barrier(accelerator)
        return final
    save_tensors(str(tmp / "trainable.safetensors"), tensors)
    _torch_save(scheduler.state_dict(), tmp / "scheduler.pt")
    method_state = getattr(getattr(model, "base_model", None), "training_state_dict", None)
    if callable(method_state):
        _torch_save(method_state(), tmp / "method_state.pt")
    state = {"progress": dataclasses.asdict(progress)}
    atomic_write_text(str(tmp / CHECKPOINT_STATE), json.dumps(state) + "\n")  # written last
    replace_folder(tmp, final)  # the whole checkpoint appears at once (checkpoint.atomic_folder)
    if keep is not None:
        prune_checkpoints(output_dir, keep)
    _barrier(accelerator)
    return final


def _is_fsdp2(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first."""
    return RunFolder(output_dir).complete_checkpoints()


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    return RunFolder(output_dir).latest_checkpoint()


def prune_checkpoints(output_dir: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints."""
    for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(
    folder: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    engine: torch.nn.Module | None = None,
) -> Progress:
    """Restore model, optimizer, scheduler and RNG from ``folder``; return the position.

    With several processes every rank calls; ``engine`` is what ``accelerator.prepare`` made.
    """
    folder = Path(folder)
    state_file = folder / CHECKPOINT_STATE
    if not state_file.exists():
        raise FileNotFoundError(
            f"{folder} is not a training checkpoint (no {CHECKPOINT_STATE}); pass a "
            "checkpoints/step-N folder or the run folder"
        )
    state = json.loads(state_file.read_text(encoding="utf-8"))
    deepspeed_dir = folder / "deepspeed"
    if deepspeed_dir.is_dir():
        if not hasattr(engine, "load_checkpoint"):
            raise ValueError(
                f"{folder} was saved under DeepSpeed ZeRO; resume it with the same "
                "distributed.strategy (zero2/zero3) and number of processes"
            )
        # the fp32 master partitions and moments, each rank its own; they set the weights too
        engine.load_checkpoint(
            str(deepspeed_dir),
            tag="state",
            load_module_strict=False,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
    else:
        if hasattr(engine, "load_checkpoint"):
            raise ValueError(
                f"{folder} holds no DeepSpeed state (it was saved under ddp or fsdp); resume "
                "with the strategy it was saved under"
            )
        with full_weights(model, modify=True):
            load_trainable(model, load_file(str(folder / "trainable.safetensors")))
        optim_state = torch.load(folder / "optimizer.pt", weights_only=True)
        inner = getattr(optimizer, "optimizer", optimizer)
        if engine is not None and _is_fsdp2(engine):
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_optimizer_state_dict,
            )

            options = StateDictOptions(full_state_dict=True)
            set_optimizer_state_dict(engine, inner, optim_state_dict=optim_state, options=options)
        else:
            optimizer.load_state_dict(optim_state)
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    method_file = folder / "method_state.pt"
    loader = getattr(getattr(model, "base_model", None), "load_training_state_dict", None)
    if method_file.exists() and callable(loader):
        loader(torch.load(method_file, weights_only=True))
    _load_rank_rng(folder, state)
    return Progress(**state["progress"])
