"""The run config: one YAML file per run, plus ``key=value`` overrides from the command line.

::

    model:  {name: smollm2-135m, dtype: float32}          what to fine-tune (models.load_base_model)
    task:   {type: causal_lm_cls, text: "...", ...}        how rows become features and metrics
    data:   {train: FILE, eval: FILE, test: FILE, ...}     files (or hub names) to read
    method: {type: lora, r: 8, lora_alpha: 16, ...}        the adapter; fields are the config class's
    epochs: 3, lr: 3e-3, batch_size: 8, ...                the loop (top level, so `epochs=5` works)
    distributed: {strategy: zero3, offload: cpu}           ddp (default) | zero2 | zero3 | fsdp

:func:`load_config` reads the YAML, applies dotted overrides (``method.r=16``), and checks the
whole thing before anything heavy happens: unknown keys, wrong types and missing files come back
together in one :class:`ConfigError`. The ``method`` block is checked against the config class of
its ``type``'s row in the method table (:mod:`peftkit.methods.table`, so adapter methods added
later need no change here), and the ``task`` block against the task's own options class.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from ..methods.table import METHODS
from ..model_sources import looks_like_path
from .distributed import QUANTIZED_REFUSAL, SHARDING, DistributedSection
from .schema import ConfigError, build, check_block, field_hints, join, unknown_key

# Config-class fields the run fills in itself; setting them in the YAML is an error.
_METHOD_FIELDS_SET_BY_RUN = ("task_type", "peft_type", "inference_mode", "base_model_name_or_path")


@dataclasses.dataclass
class ModelSection:
    """The base model: a bundled short name, a hub id, a local folder or a ``.gguf`` file."""

    name: str
    gguf_file: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    quantization: Literal["nf4", "fp4"] | None = None
    tokenizer: str | None = None


@dataclasses.dataclass
class DataSource:
    """One split's rows: a file (any format ``peftkit.data.read_records`` reads) or a hub name.

    ``path`` wins when it exists; otherwise ``hub`` (``NAME[:SUBSET][@SPLIT]``, read through
    ``datasets``) is the fallback for users with network access. Reader options (``columns``,
    ``has_header``, ...) pass through to the reader. ``limit`` keeps the first N rows.
    """

    path: str | None = None
    hub: str | None = None
    format: str | None = None
    columns: list[str] | None = None
    has_header: bool | None = None
    delimiter: str | None = None
    encoding: str | None = None
    text_split: Literal["file", "line", "paragraph"] | None = None
    chunk_chars: int | None = None
    limit: int | None = None


@dataclasses.dataclass
class DataSection:
    """Splits. Without an ``eval`` source, ``eval_size`` rows (an int, or a fraction of the
    train rows) are held out of ``train`` after a seeded shuffle (``split_seed``, default ``seed``)."""

    train: DataSource | None = None
    eval: DataSource | None = None
    test: DataSource | None = None
    eval_size: int | float | None = None
    split_seed: int | None = None


@dataclasses.dataclass
class RunConfig:
    """A whole run. Top-level keys are the training loop's knobs."""

    model: ModelSection
    task: dict[str, Any]
    method: dict[str, Any]
    data: DataSection = dataclasses.field(default_factory=DataSection)
    distributed: DistributedSection = dataclasses.field(default_factory=DistributedSection)
    output_dir: str | None = None
    # the command that makes this recipe's local files (base model, data) when they are missing,
    # e.g. `make t2i-digits`: the error that reports them names it
    prepare: str | None = None
    seed: int = 42
    epochs: int = 3
    max_steps: int | None = None
    lr: float = 1e-3
    batch_size: int = 8
    eval_batch_size: int | None = None
    grad_accum: int = 1
    weight_decay: float = 0.0
    lr_scheduler: Literal["linear", "cosine", "constant"] = "linear"
    warmup_steps: int | None = None
    warmup_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    gradient_checkpointing: bool = False  # recompute activations in backward (less memory)
    # LoRA dropout masks: PEFT's draw (same seed, same masks) or a ~3.5x cheaper one
    dropout_mask: Literal["bernoulli", "fast"] = "bernoulli"
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_threads: int | None = None
    # CPU: give freed heap pages back before the output head (+ every block) each step;
    # auto: blocks where parameters are sharded (ZeRO-3, FSDP2 gather and free a block's
    # weights every step), else head
    trim_heap: Literal["auto", "head", "blocks", "none"] = "auto"
    eval_before_training: bool = False
    eval_every_epoch: bool = True
    save_steps: int | None = None
    save_total_limit: int = 2
    metric_for_best: str | None = None
    load_best_at_end: bool = True
    logging_steps: int = 1
    progress: bool = True
    tensorboard: bool = True
    plots: bool = True
    # Filled in by load_config, never read from YAML.
    source: str | None = dataclasses.field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain data (what ``config.yaml`` in the run folder holds)."""
        out = dataclasses.asdict(self)
        out.pop("source", None)
        return out

    @property
    def method_type(self) -> str:
        return self.method["type"]


def parse_overrides(items: Sequence[str]) -> list[tuple[list[str], Any]]:
    """``["method.r=16", "epochs=3"]`` -> ``[(["method", "r"], 16), (["epochs"], 3)]``.

    Values are parsed as YAML scalars, so ``true``, ``3e-3``, ``[q_proj,v_proj]`` and ``null``
    mean what they mean in the file.
    """
    out = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError([f"override {item!r}: write KEY=VALUE, e.g. method.r=16 or epochs=3"])
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, (dict, list)) and not raw.strip().startswith(("{", "[")):
            value = raw  # `task.text=review : {review}` is text, not a YAML mapping
        out.append((key.strip().split("."), value))
    return out


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set each dotted key in a copy of ``data`` (creating blocks on the way).

    ``lora.r=16`` (the method's own name as first segment) is accepted as ``method.r=16``.
    """
    data = copy.deepcopy(data)
    method_name = str((data.get("method") or {}).get("type", ""))
    for keys, value in parse_overrides(overrides):
        if len(keys) > 1 and keys[0] not in data and keys[0] == method_name:
            keys = ["method", *keys[1:]]
        node = data
        for i, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None or isinstance(child, str) and key in ("train", "eval", "test"):
                # data.train=FILE is shorthand; data.train.limit=5 needs the long form
                child = {} if child is None else {"path": child}
                node[key] = child
            if not isinstance(child, dict):
                raise ConfigError(
                    [f"override {'.'.join(keys)}: {'.'.join(keys[: i + 1])} is not a block"]
                )
            node = child
        node[keys[-1]] = value
    return data


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping, with errors naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"config file not found: {p} (resolved to {p.resolve()})"])
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {exc}"], source=str(p)) from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            [f"the top level must be a mapping of keys, got {type(data).__name__}"], source=str(p)
        )
    return data


def load_config(
    path: str | os.PathLike | None,
    overrides: Sequence[str] = (),
    data: Mapping[str, Any] | None = None,
    check_files: bool = True,
    require_train: bool = True,
) -> RunConfig:
    """Read, override and check a run config; every problem is reported in one ConfigError.

    Args:
        path: the YAML file (or ``None`` with ``data``).
        overrides: ``KEY=VALUE`` strings applied on top (dotted keys reach into blocks).
        data: the mapping itself instead of a file.
        check_files: report data files and local models that do not exist.
        require_train: the train split must be given (``peftkit train``).
    """
    source = os.fspath(path) if path is not None else None
    raw = read_yaml(path) if path is not None else copy.deepcopy(dict(data or {}))
    raw = apply_overrides(raw, overrides)
    problems: list[str] = []
    values = check_config(raw, problems, require_train=require_train)
    hint = None
    if check_files:
        config_dir = os.path.dirname(os.path.abspath(source)) if source else None
        missing = missing_files(values, config_dir)
        problems.extend(missing)
        hint = prepare_hint(values) if missing else None
    if problems:
        raise ConfigError(problems, source=source, hint=hint)
    try:
        config = build(RunConfig, values)
    except (TypeError, ValueError) as exc:
        raise ConfigError([str(exc)], source=source) from exc
    config.source = source
    return config


def check_config(
    raw: dict[str, Any], problems: list[str], require_train: bool = True
) -> dict[str, Any]:
    """Check the mapping, appending problems; return the checked (coerced) values."""
    raw = copy.deepcopy(raw)
    data = raw.get("data")
    if isinstance(data, dict):
        for split in ("train", "eval", "test"):
            if isinstance(data.get(split), str):
                data[split] = {"path": data[split]}  # shorthand: `train: file.csv`
    values = check_block(raw, RunConfig, "", problems, skip=("task", "method", "source"))
    if "source" in raw:
        problems.append(unknown_key("source", "source", list(field_hints(RunConfig))))
    values["task"] = _check_task(raw.get("task"), problems)
    values["method"] = _check_method(raw.get("method"), problems)
    model = values.get("model")
    method_row = METHODS.get((values["method"] or {}).get("type"))
    default_quantization = method_row.quantization if method_row else None  # QLoRA: nf4
    if default_quantization and isinstance(model, dict) and model.get("quantization") is None:
        model["quantization"] = default_quantization
    data_values = values.get("data") if isinstance(values.get("data"), dict) else {}
    if require_train and not data_values.get("train"):
        problems.append("data.train: required to train (a file path or {path: ..., hub: ...})")
    for split in ("train", "eval", "test"):
        split_source = data_values.get(split)
        if (
            isinstance(split_source, dict)
            and not split_source.get("path")
            and not split_source.get("hub")
        ):
            problems.append(f"data.{split}: give a path or a hub name")
    if data_values.get("eval") and data_values.get("eval_size"):
        problems.append("data.eval_size: set either data.eval (a file) or data.eval_size, not both")
    for key in ("epochs", "batch_size", "grad_accum", "logging_steps", "save_total_limit"):
        value = values.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            problems.append(f"{key}: must be >= 1, got {value}")
    dist = values.get("distributed") if isinstance(values.get("distributed"), dict) else {}
    quantized = isinstance(model, dict) and model.get("quantization") is not None
    if quantized and dist.get("strategy") in SHARDING:
        problems.append(QUANTIZED_REFUSAL.format(strategy=dist["strategy"]))
    if dist.get("offload") == "cpu" and dist.get("strategy") == "ddp":
        problems.append(
            "distributed.offload: cpu needs strategy zero2, zero3 or fsdp "
            "(DDP keeps a whole copy of everything on each device)"
        )
    if isinstance(values.get("lr"), float) and values["lr"] <= 0:
        problems.append(f"lr: must be > 0, got {values['lr']}")
    return values


def _check_task(raw: Any, problems: list[str]) -> dict[str, Any] | None:
    """``task.type`` picks the task; the other keys are checked against its options class."""
    from ..tasks import TASKS

    if raw is None:
        problems.append(f"task: required block is missing (task.type: one of {', '.join(TASKS)})")
        return None
    if not isinstance(raw, Mapping):
        problems.append(f"task: expected a mapping, got {type(raw).__name__}")
        return None
    kind = raw.get("type")
    if kind not in TASKS:
        problems.append(
            f"task.type: {'missing' if kind is None else repr(kind) + ' is unknown'}; "
            f"use one of {', '.join(TASKS)}"
        )
        return None
    before = len(problems)
    options = check_block(raw, TASKS[kind].Options, "task", problems, skip=("type",))
    if len(problems) > before:
        return {"type": kind, **options}
    try:
        filled = dataclasses.asdict(TASKS[kind].Options(**options))  # defaults written out
    except (TypeError, ValueError) as exc:
        problems.append(f"task: {exc}")
        filled = options
    return {"type": kind, **filled}


def _check_method(raw: Any, problems: list[str]) -> dict[str, Any] | None:
    """``method.type`` names the adapter; other keys are checked against its config class."""
    if raw is None:
        problems.append(
            f"method: required block is missing (method.type: one of {', '.join(METHODS)})"
        )
        return None
    if not isinstance(raw, Mapping):
        problems.append(f"method: expected a mapping, got {type(raw).__name__}")
        return None
    kind = raw.get("type")
    if kind not in METHODS:
        problems.append(
            f"method.type: {'missing' if kind is None else repr(kind) + ' is unknown'}; "
            f"use one of {', '.join(METHODS)}"
        )
        return None
    cls = METHODS[kind].config
    for key in _METHOD_FIELDS_SET_BY_RUN:
        if key in raw:
            problems.append(
                f"method.{key}: set by the run (from task.type and model.name); remove it"
            )
    options = check_block(raw, cls, "method", problems, skip=("type", *_METHOD_FIELDS_SET_BY_RUN))
    return {"type": kind, **options}


def resolve_path(value: str, config_dir: str | None) -> Path | None:
    """Find a relative path: from the working directory, then the config's folder, then (for
    ``.../shared/data/...`` paths) under :func:`peftkit.data.shared_data_dir`. None if nowhere."""
    p = Path(value).expanduser()
    if p.is_absolute():
        return p if p.exists() else None
    candidates = [Path.cwd() / p]
    if config_dir:
        candidates.append(Path(config_dir) / p)
    parts = p.as_posix().split("shared/data/", 1)
    if len(parts) == 2:
        try:
            from ..data import shared_data_dir

            candidates.append(shared_data_dir() / parts[1])
        except FileNotFoundError:
            pass
    for c in candidates:
        if c.exists():
            return c
    return None


def missing_files(values: Mapping[str, Any], config_dir: str | None) -> list[str]:
    """Problems for data files and local model paths that do not exist (hub fallbacks excepted)."""
    problems = []
    data = values.get("data") if isinstance(values.get("data"), Mapping) else {}
    for split in ("train", "eval", "test"):
        source = data.get(split)
        if not isinstance(source, Mapping) or not isinstance(source.get("path"), str):
            continue
        if resolve_path(source["path"], config_dir) is None and not source.get("hub"):
            where = _where(source["path"], config_dir)
            problems.append(
                f"data.{split}.path: file not found: {source['path']} ({where}); fix "
                f"the path, or add data.{split}.hub: NAME[:SUBSET][@SPLIT] as a fallback"
            )
    task = values.get("task") if isinstance(values.get("task"), Mapping) else {}
    if task.get("type") in _task_classes():
        for key in _task_classes()[task["type"]].Options.local_paths:
            value = task.get(key)
            if isinstance(value, str) and resolve_path(value, config_dir) is None:
                problems.append(f"task.{key}: not found: {value} ({_where(value, config_dir)})")
    model = values.get("model") if isinstance(values.get("model"), Mapping) else {}
    name = model.get("name")
    if isinstance(name, str) and looks_like_path(name) and resolve_path(name, config_dir) is None:
        problems.append(
            f"model.name: {name!r} looks like a local path but does not exist; give a bundled "
            "short name (smollm2-135m, minilm-l6), a hub id, a model folder or a .gguf file"
        )
    return problems


def _where(value: str, config_dir: str | None) -> str:
    """Where a path that was not found was looked for, for the error."""
    p = Path(value).expanduser()
    if p.is_absolute():
        return f"resolved to {p}"
    return f"looked in {Path.cwd()}" + (f" and {config_dir}" if config_dir else "")


def _task_classes() -> Mapping[str, Any]:
    from ..tasks import TASKS

    return TASKS


def prepare_hint(values: Mapping[str, Any]) -> str | None:
    """The line naming the recipe's ``prepare`` command, for an error about missing files."""
    prepare = values.get("prepare")
    if not isinstance(prepare, str) or not prepare.strip():
        return None
    return (
        f"The missing files are made by `{prepare.strip()}` (this recipe's `prepare`): run it "
        "once from the repository root, then this command again."
    )


def config_to_yaml(config: RunConfig) -> str:
    """The resolved config as YAML text (saved as ``config.yaml`` in the run folder)."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True)


__all__ = [
    "ConfigError",
    "DataSection",
    "DataSource",
    "DistributedSection",
    "ModelSection",
    "RunConfig",
    "apply_overrides",
    "config_to_yaml",
    "join",
    "load_config",
    "missing_files",
    "parse_overrides",
    "prepare_hint",
    "resolve_path",
]
