"""Scaling a run out: DDP, DeepSpeed ZeRO-2/3 (optionally offloaded to CPU) and FSDP2, all
through ``accelerate``; this module only says which one and reads full weights when sharded.

::

    distributed: {strategy, offload}  ──┐
    accelerate launch's env (ACCELERATE_*) ─┴─> resolve_strategy ─> (strategy, offload)
                                                   (both given and different: stop, say so)
    make_accelerator ─> Accelerator(cpu/cuda, mixed precision,
                                    DeepSpeedPlugin(ZeRO stage, offload)  | FSDP plugin (v2)
                                    gloo on CPU, NCCL on CUDA)
    full_weights(params) ─> inside: every rank sees whole tensors (ZeRO-3 gathers partitions,
                            FSDP2 unshards DTensors); outside: sharded again

Launch with ``torchrun --standalone --nproc_per_node N -m peftkit train RUN.yaml`` (the strategy
from the YAML) or ``accelerate launch --config_file examples/accelerate/zero3.yaml -m peftkit
train RUN.yaml`` (the strategy from the accelerate config; the YAML may leave it out). On CPU
the processes talk over gloo; on GPUs over NCCL.

DeepSpeed keeps the client optimizer (``torch.optim.AdamW``) even when it offloads to CPU
(``zero_force_ds_cpu_optimizer: false``): no ``cpu_adam`` extension to compile, and the same
update rule under every strategy, so 2 processes and 1 process train the same adapter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import torch

from .fsdp_units import can_shard_here, shard_units

Strategy = Literal["ddp", "zero2", "zero3", "fsdp"]
Offload = Literal["none", "cpu"]
STRATEGIES: tuple[str, ...] = ("ddp", "zero2", "zero3", "fsdp")
SHARDING = ("zero3", "fsdp")  # the strategies that cut parameters themselves into pieces
QUANTIZED_REFUSAL = (
    "distributed.strategy {strategy}: a 4-bit (QLoRA) base keeps its weights as packed uint8 "
    "bytes with per-block scales, which ZeRO-3 and FSDP2 cannot cut into shards; train QLoRA "
    "with strategy ddp or zero2 (the 4-bit base is already ~1/8 of fp32 on each process)"
)


@dataclasses.dataclass
class Zero3Window:
    """``distributed.zero3``: how much of the model ZeRO-3 keeps gathered at once, in
    parameters (elements). Each key left out is sized from the model (:func:`zero3_window`):
    one decoder block (the largest module of the model's ``_no_split_modules``) for the reuse
    distance and (on CUDA; none on the CPU) the prefetch bucket, two for the live limit,
    DeepSpeed's 100,000 for persistence. DeepSpeed's own defaults (1e9 live / reuse) keep a sub-1B model gathered
    whole after its first step, which costs more than one process holding all of it."""

    max_live_parameters: int | None = None
    max_reuse_distance: int | None = None
    prefetch_bucket_size: int | None = None
    param_persistence_threshold: int | None = None


@dataclasses.dataclass
class DistributedSection:
    """``distributed:`` in the run YAML. Left out, the strategy is the launcher's (an accelerate
    config file) or ``ddp``; ``offload: cpu`` moves optimizer state (ZeRO-2/3, FSDP2) and
    parameters (ZeRO-3, FSDP2) to CPU memory; ``zero3`` sizes ZeRO-3's gathered window."""

    strategy: Strategy | None = None
    offload: Offload | None = None
    zero3: Zero3Window = dataclasses.field(default_factory=Zero3Window)
    # zero3 / fsdp: a causal LM's frozen embedding and head cut by vocabulary rows across the
    # ranks instead of gathered whole (peftkit.vocab_parallel)
    vocab_parallel: bool = True


@dataclasses.dataclass(frozen=True)
class Plan:
    """The resolved choice: what the run does and reports in ``summary.json``."""

    strategy: str
    offload: str
    launcher: str  # "accelerate" | "torchrun" | "single"


def _true(value: str | None) -> bool:
    return str(value).lower() in ("1", "true", "yes")


def launcher_strategy(env: Mapping[str, str] | None = None) -> tuple[str | None, str | None, str]:
    """What ``accelerate launch``'s config asked for, read from the variables it sets:
    (strategy or None, offload or None, launcher)."""
    env = os.environ if env is None else env
    if _true(env.get("ACCELERATE_USE_DEEPSPEED")):
        stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
        offload = "none"
        for key in (
            "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE",
            "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE",
        ):
            if env.get(key, "none") not in ("none", ""):
                offload = env[key]
        return f"zero{stage}", offload, "accelerate"
    if _true(env.get("ACCELERATE_USE_FSDP")):
        version = env.get("FSDP_VERSION", "1")
        offload = "cpu" if _true(env.get("FSDP_OFFLOAD_PARAMS")) else "none"
        return f"fsdp{'' if version == '2' else version}", offload, "accelerate"
    if "ACCELERATE_MIXED_PRECISION" in env or "ACCELERATE_USE_CPU" in env:
        return "ddp", "none", "accelerate"
    return None, None, "torchrun" if "TORCHELASTIC_RUN_ID" in env else "single"


def resolve_strategy(section: DistributedSection, env: Mapping[str, str] | None = None) -> Plan:
    """The run YAML's ``distributed`` block against the launcher's choice.

    Raises ValueError (naming both sides) where they disagree, or where the launcher asks for
    something peftkit does not run (ZeRO-1, FSDP v1, NVMe offload).
    """
    launched, launched_offload, launcher = launcher_strategy(env)
    problems = []
    if launched is not None and launched not in STRATEGIES:
        fix = "fsdp_version: 2" if launched.startswith("fsdp") else "zero_stage: 2 or 3"
        problems.append(
            f"the accelerate config asks for {launched!r}, which peftkit does not run; "
            f"use {fix} (see examples/accelerate/)"
        )
    if launched_offload not in (None, "none", "cpu"):
        problems.append(f"the accelerate config offloads to {launched_offload!r}; only cpu works")
    if section.strategy is not None and launched is not None and section.strategy != launched:
        problems.append(
            f"distributed.strategy: the run YAML says {section.strategy!r} but the accelerate "
            f"config says {launched!r}; make them agree (or leave distributed.strategy out)"
        )
    strategy = section.strategy or launched or "ddp"
    if (
        section.offload is not None
        and launched_offload is not None
        and section.offload != launched_offload
        and section.strategy is not None
    ):
        problems.append(
            f"distributed.offload: the run YAML says {section.offload!r} but the accelerate "
            f"config says {launched_offload!r}; make them agree (or leave it out)"
        )
    offload = section.offload or launched_offload or "none"
    if offload == "cpu" and strategy == "ddp":
        problems.append(
            "distributed.offload: cpu needs strategy zero2, zero3 or fsdp (DDP keeps a whole "
            "copy of everything on each device)"
        )
    if problems:
        raise ValueError("; ".join(problems))
    return Plan(strategy, offload, launcher)


def _ds_config(config: Any, plan: Plan, precision: str, world: int) -> dict[str, Any]:
    """The DeepSpeed config, every number explicit (no 'auto': we prepare no dataloader)."""
    stage = 3 if plan.strategy == "zero3" else 2
    zero: dict[str, Any] = {"stage": stage}
    if plan.offload == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": config.batch_size,
        "gradient_accumulation_steps": config.grad_accum,
        "train_batch_size": config.batch_size * config.grad_accum * world,
        "gradient_clipping": config.max_grad_norm or 0.0,
        "zero_optimization": zero,
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif precision == "fp16":
        ds["fp16"] = {"enabled": True, "auto_cast": False}
    return ds


def make_accelerator(config: Any) -> Any:
    """An ``Accelerator`` for ``config``: CPU or CUDA per ``device``; ``mixed_precision: auto`` =
    bf16 (or fp16) on CUDA, none on CPU; the strategy's plugin; gloo when on CPU."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType, InitProcessGroupKwargs

    cuda = torch.cuda.is_available()
    if config.device == "cuda" and not cuda:
        raise ValueError(
            "device: cuda was asked for but no CUDA device is visible; use device=auto"
        )
    cpu = config.device == "cpu" or not cuda
    precision = config.mixed_precision
    launched_precision = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if launched_precision and precision != "auto" and launched_precision != precision:
        raise ValueError(
            f"mixed_precision: the run YAML says {precision!r} but the accelerate config says "
            f"{launched_precision!r}; make them agree (or use mixed_precision: auto)"
        )
    if launched_precision and precision == "auto":
        precision = launched_precision
    if precision == "auto":
        precision = "no" if cpu else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    if cpu and precision == "fp16":
        raise ValueError("mixed_precision: fp16 needs a CUDA device; use bf16 or no on CPU")
    _restore_launch_env()
    plan = resolve_strategy(config.distributed)
    if config.model.quantization is not None and plan.strategy in SHARDING:
        raise ValueError(QUANTIZED_REFUSAL.format(strategy=plan.strategy))
    if plan.strategy != "ddp" and "WORLD_SIZE" not in os.environ:
        _single_process_group_env()  # DeepSpeed / FSDP2 need a process group, even of one
    world = int(os.environ.get("WORLD_SIZE", "1"))
    quiet_distributed_warnings()
    kwargs: dict[str, Any] = {"mixed_precision": precision}
    if cpu:
        kwargs["cpu"] = plan.strategy != "zero2" and plan.strategy != "zero3"  # DeepSpeed: its own
        if "WORLD_SIZE" in os.environ:
            kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
    _forget_zero3_loading()  # a ZeRO-3 run earlier in this process must not shape this load
    if plan.strategy in ("zero2", "zero3"):
        from accelerate.utils import DeepSpeedPlugin

        ds = _ds_config(config, plan, precision, world)
        # the stage and offload the accelerate config gave are in `plan`; the DeepSpeed config
        # is the run's, so accelerate must not object that its own fields go unused
        os.environ.pop("ACCELERATE_CONFIG_DS_FIELDS", None)
        os.environ.pop("ACCELERATE_USE_CPU", None)  # it would turn DeepSpeed off; CPU is seen
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(
            hf_ds_config=ds,
            zero_stage=ds["zero_optimization"]["stage"],
            gradient_accumulation_steps=config.grad_accum,
            gradient_clipping=ds["gradient_clipping"],
            offload_optimizer_device=plan.offload,
            offload_param_device=plan.offload if plan.strategy == "zero3" else "none",
            zero3_save_16bit_model=plan.strategy == "zero3",
            zero3_init_flag=False,
        )
    elif plan.strategy == "fsdp":
        from accelerate.utils import FullyShardedDataParallelPlugin

        kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(
            fsdp_version=2,
            reshard_after_forward=True,
            auto_wrap_policy="transformer_based_wrap",
            cpu_offload=plan.offload == "cpu",
            state_dict_type="FULL_STATE_DICT",
            cpu_ram_efficient_loading=False,
            activation_checkpointing=False,
        )
    if AcceleratorState._shared_state:
        AcceleratorState._reset_state(True)  # a previous run in this process used other settings
    with _quiet_unless_rank0():
        accelerator = Accelerator(**kwargs)
    if plan.strategy == "fsdp" and accelerator.distributed_type != DistributedType.FSDP:
        # accelerate keeps MULTI_CPU and silently drops the FSDP plugin without a GPU, which
        # would train unsynchronised copies; FSDP2's fully_shard itself runs on CPU over gloo
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = kwargs["fsdp_plugin"]
    accelerator.peftkit_plan = plan
    return accelerator


@contextlib.contextmanager
def _quiet_unless_rank0() -> Iterator[None]:
    """DeepSpeed prints its communication-op build line from every rank; keep rank 0's."""
    if os.environ.get("RANK", "0") == "0":
        yield
        return
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        yield


def check_prepared(model: torch.nn.Module, accelerator: Any) -> None:
    """Refuse to train when ``prepare`` did not apply the strategy (unsynchronised copies)."""
    if accelerator.num_processes < 2 and plan_of(accelerator).strategy == "ddp":
        return
    strategy = plan_of(accelerator).strategy
    from torch.distributed.tensor import DTensor

    applied = {
        "ddp": isinstance(model, torch.nn.parallel.DistributedDataParallel),
        "zero2": hasattr(model, "set_gradient_accumulation_boundary"),
        "zero3": hasattr(model, "set_gradient_accumulation_boundary"),
        "fsdp": any(isinstance(p, DTensor) for p in model.parameters()),
    }[strategy]
    if not applied:
        raise RuntimeError(
            f"accelerate did not apply distributed.strategy {strategy!r} "
            f"(distributed type {accelerator.distributed_type}, model {type(model).__name__}); "
            "the processes would train unsynchronised copies"
        )


_LAUNCH_ENV: dict[str, str] | None = None  # the launcher's ACCELERATE_*/FSDP_* variables


def _restore_launch_env() -> None:
    """Accelerate writes its choices into ``ACCELERATE_*`` / ``FSDP_*`` variables; a second run
    in the same process (a notebook, a test driver) must read the launcher's, not the last
    run's: the first call keeps them, later calls put them back."""
    global _LAUNCH_ENV
    ours = ("ACCELERATE_", "FSDP_")
    if _LAUNCH_ENV is None:
        _LAUNCH_ENV = {k: v for k, v in os.environ.items() if k.startswith(ours)}
        return
    for key in [k for k in os.environ if k.startswith(ours)]:
        if key not in _LAUNCH_ENV:
            del os.environ[key]
    os.environ.update(_LAUNCH_ENV)


def _forget_zero3_loading() -> None:
    """transformers loads models partitioned (``zero.Init``) while an ``HfDeepSpeedConfig`` of
    stage 3 is alive; a DeepSpeedPlugin made for this run sets its own, an earlier run's goes."""
    try:
        from transformers.integrations import unset_hf_deepspeed_config
    except ImportError:
        return
    unset_hf_deepspeed_config()


def _single_process_group_env() -> None:
    """The variables torchrun would set for one process on this machine."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }.items():
        os.environ.setdefault(key, value)


def quiet_distributed_warnings() -> None:
    """DeepSpeed calls collectives torch has renamed: one FutureWarning per call and rank."""
    import warnings

    warnings.filterwarnings("ignore", message=r".*torch\.distributed\..* is deprecated")
    warnings.filterwarnings("ignore", message=r".*TypedStorage is deprecated")


def offload_note(accelerator: Any) -> str | None:
    """What ``offload: cpu`` does on this machine, when it does nothing: on a CPU-only run the
    parameters and optimizer state already live in CPU memory, so there is nothing to move and
    no memory to save (the run log and summary.json say so instead of implying a saving)."""
    plan = plan_of(accelerator)
    if plan.offload != "cpu" or accelerator.device.type != "cpu":
        return None
    return (
        "offload: cpu moves nothing on this CPU-only run (parameters and optimizer state are "
        "in CPU memory already); it saves accelerator memory on a GPU machine"
    )


def plan_of(accelerator: Any) -> Plan:
    return getattr(accelerator, "peftkit_plan", Plan("ddp", "none", "single"))


def is_zero3(accelerator: Any) -> bool:
    return plan_of(accelerator).strategy == "zero3" and accelerator.num_processes >= 1


def block_classes(model: torch.nn.Module) -> list[str]:
    """The class names of the model's repeated blocks (transformers' ``_no_split_modules``,
    found through the PEFT wrapper) that the model really has."""
    names: list[str] = []
    for module in model.modules():
        names += list(getattr(module, "_no_split_modules", None) or [])
    present = {type(m).__name__ for m in model.modules()}
    return sorted(set(names) & present)


def fsdp_unit_classes(model: torch.nn.Module) -> list[str]:
    """The block classes FSDP2 wraps one unit each: :func:`block_classes` less those holding
    the input or output embedding (BERT names ``BertEmbeddings``). accelerate gives those
    embeddings units of their own, and sharding a module inside an already sharded one
    fails (its weight is a DTensor already, taken for tensor parallelism)."""
    embeddings = set()
    for module in model.modules():
        for getter in ("get_input_embeddings", "get_output_embeddings"):
            try:
                found = getattr(module, getter)() if hasattr(module, getter) else None
            except (NotImplementedError, AttributeError):
                found = None
            if isinstance(found, torch.nn.Module):
                embeddings.add(id(found))
    holding = {
        type(m).__name__
        for m in model.modules()
        if any(id(sub) in embeddings for sub in m.modules())
    }
    return [name for name in block_classes(model) if name not in holding]


def _shard_tied_modules_together(model: torch.nn.Module, plugin: Any) -> list[str]:
    """FSDP2: the modules that share one parameter (a seq2seq model's ``shared``,
    ``encoder.embed_tokens``, ``decoder.embed_tokens`` and ``lm_head``) as one unit, before
    accelerate carves the input embedding into a unit of its own: a parameter may belong to
    one unit only, and accelerate knows only of input/output embedding ties. accelerate then
    leaves the already sharded modules alone."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    owners: dict[int, list[torch.nn.Module]] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), []).append(module)
    groups = [mods for mods in owners.values() if len(mods) > 1]
    notes = []
    for mods in groups:
        if any(isinstance(m, FSDPModule) for m in mods):
            continue
        fully_shard(
            mods,
            reshard_after_forward=plugin.reshard_after_forward,
            offload_policy=plugin.cpu_offload,
            mp_policy=plugin.mixed_precision_policy or MixedPrecisionPolicy(),
        )
        names = [n for n, m in model.named_modules() if any(m is g for g in mods)]
        notes.append(f"FSDP2: {', '.join(names)} share a weight: one unit")
    return notes


def _numel(param: torch.Tensor) -> int:
    return int(getattr(param, "ds_numel", 0) or param.numel())


def zero3_window(
    model: torch.nn.Module, window: Zero3Window | None = None, cuda: bool = True
) -> dict[str, int]:
    """DeepSpeed stage-3 keys for ``model`` (see :class:`Zero3Window`): the user's values,
    the rest from the size of one block (without blocks: a tenth of the model). Without CUDA
    nothing is prefetched: gloo's gathers do not overlap compute on the CPU, so a prefetched
    block would only be held longer."""
    window = window or Zero3Window()
    classes = set(block_classes(model))
    blocks = [m for m in model.modules() if type(m).__name__ in classes]
    if blocks:
        block = max(sum(_numel(p) for p in b.parameters()) for b in blocks)
    else:
        block = max(1, sum(_numel(p) for p in model.parameters()) // 10)
    prefetch = window.prefetch_bucket_size
    if prefetch is None:
        prefetch = block if cuda else 0
    sized = {
        "stage3_max_live_parameters": window.max_live_parameters or 2 * block,
        "stage3_max_reuse_distance": window.max_reuse_distance or block,
        "stage3_prefetch_bucket_size": prefetch,
        "stage3_param_persistence_threshold": window.param_persistence_threshold or 100_000,
    }
    return {k: int(v) for k, v in sized.items()}


def prepare_for_strategy(model: torch.nn.Module, accelerator: Any, config: Any = None) -> list[str]:
    """Things a strategy needs from the model before ``accelerator.prepare``; returns what was
    done, for the run log. Sharded (ZeRO-3, FSDP2, several ranks): a causal LM's embedding and
    head cut by vocabulary (:mod:`peftkit.vocab_parallel`). DDP leaves frozen weights out of
    its start-up broadcast (every rank read them from the same checkpoint). FSDP2 wraps the base model's own
    blocks (``_no_split_modules``, found through the PEFT wrapper). ZeRO-3's gathered window
    and both ZeRO stages' gradient buckets are sized from the model."""
    notes: list[str] = []
    section = getattr(config, "distributed", None) or DistributedSection()
    if plan_of(accelerator).strategy in SHARDING and section.vocab_parallel:
        from ..vocab_parallel import shard_vocabulary

        done = shard_vocabulary(model, accelerator.device)
        if done:
            notes.append(done)
    if plan_of(accelerator).strategy == "ddp" and accelerator.num_processes > 1:
        # DDP broadcasts rank 0's copy of every parameter at start; frozen base weights were
        # read from the same checkpoint on every rank, and their broadcast would write (and so
        # copy out of the memory map) the whole model on every rank: 2.1 GB on bloomz-560m
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            model, frozen
        )
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is not None and not plugin.transformer_cls_names_to_wrap:
        plugin.transformer_cls_names_to_wrap = fsdp_unit_classes(model) or None
    if plugin is not None:
        notes += _shard_tied_modules_together(model, plugin)
        if can_shard_here(plugin):
            units = shard_units(model, plugin, mixed_precision=accelerator.mixed_precision != "no")
            notes.append(f"FSDP2: {units} units sharded one at a time (full weights released)")
    ds_plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if ds_plugin is None:
        return notes
    zero = ds_plugin.deepspeed_config.setdefault("zero_optimization", {})
    # the gradient buckets hold trainable gradients: an adapter's, not 5e8 elements' worth
    trainable = sum(_numel(p) for p in model.parameters() if p.requires_grad)
    bucket = int(min(5e8, max(trainable, 2**20)))
    zero.setdefault("reduce_bucket_size", bucket)
    if zero.get("stage") == 3:
        window = zero3_window(model, section.zero3, cuda=accelerator.device.type == "cuda")
        zero.update(window)
        notes.append(
            "ZeRO-3 window: "
            + ", ".join(f"{k.removeprefix('stage3_')} {v:,d}" for k, v in window.items())
        )
    else:
        zero.setdefault("allgather_bucket_size", bucket)
    return notes


_HELD = -424242  # a sub-module id no DeepSpeed module has: "held by full_weights"


@contextlib.contextmanager
def full_weights(model: torch.nn.Module, modify: bool = False) -> Iterator[None]:
    """Inside: ``model``'s trainable parameters hold whole tensors on every rank, so the usual
    code (``save_pretrained``, state dicts, prompt encoders) reads them. Every rank must enter.

    ZeRO-3 gathers their partitions (``deepspeed.zero.GatheredParameters``; with ``modify``,
    rank 0's values are partitioned back on exit). FSDP2: each trainable DTensor is replaced by
    its ``full_tensor()`` for the duration (FSDP2's own unshard would not do: its state-dict
    hooks hand back DTensors); with ``modify`` the values are sharded back on exit. Elsewhere
    nothing happens.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    zero = [p for p in params if hasattr(p, "ds_id")]
    if zero:
        import deepspeed

        with deepspeed.zero.GatheredParameters(zero, modifier_rank=0 if modify else None):
            # a module run inside (a P-tuning encoder making its table) would release its
            # parameters on the way out: mark them in use until we are done
            for p in zero:
                p.ds_active_sub_modules.add(_HELD)
            try:
                yield
            finally:
                for p in zero:
                    p.ds_active_sub_modules.discard(_HELD)
        return
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in params):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()  # every group sharded: its state-dict hook then leaves ours alone
    swaps = []
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if isinstance(p, DTensor) and p.requires_grad:
                full = torch.nn.Parameter(p.full_tensor(), requires_grad=True)  # collective
                if p.grad is not None:  # AdaLoRA's allocation reads gradients too
                    full.grad = p.grad.full_tensor()
                module._parameters[name] = full
                swaps.append((module, name, p, full))
    try:
        yield
    finally:
        from torch.distributed.tensor import distribute_tensor

        for module, name, sharded, full in swaps:
            if modify:
                with torch.no_grad():
                    value = distribute_tensor(
                        full.detach(), sharded.device_mesh, sharded.placements
                    )
                    sharded.to_local().copy_(value.to_local())
            module._parameters[name] = sharded


def zero3_load_config(accelerator: Any) -> dict[str, Any] | None:
    """The DeepSpeed config a ZeRO-3 run loads its base model under (partitioned from the
    start, :mod:`peftkit.sharded_load`); None for every other strategy."""
    if plan_of(accelerator).strategy != "zero3":
        return None
    return accelerator.state.deepspeed_plugin.deepspeed_config


def full_shape(param: torch.Tensor) -> torch.Size:
    """A parameter's whole shape, partitioned (ZeRO-3) or sharded (FSDP2) or not."""
    if hasattr(param, "ds_shape"):
        return param.ds_shape
    return param.shape


__all__ = [
    "DistributedSection",
    "Plan",
    "Zero3Window",
    "block_classes",
    "zero3_window",
    "check_prepared",
    "STRATEGIES",
    "full_shape",
    "full_weights",
    "is_zero3",
    "launcher_strategy",
    "make_accelerator",
    "plan_of",
    "prepare_for_strategy",
    "resolve_strategy",
    "zero3_load_config",
]
