"""Setting a run up: the task spec, its data checked, the base model, the adapter, the task.

::

    RunConfig ─> build_spec (task block) ─> check_data (columns, label set) -> TaskSpec
              ─> load_model (Auto class from the task table, head sized by the label set)
              ─> build_peft_config (method block + what the run knows) ─> attach_adapter
              ─> spec.build(tokenizer, adapted model) -> the Task the run trains and scores with

Nothing heavy happens before the data has been read and checked against the task.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..methods.table import METHODS, check_serves
from ..tasks import TaskSpec, task_spec
from .config import ConfigError, RunConfig
from .splits import Splits


def build_spec(config: RunConfig) -> TaskSpec:
    """The spec of ``config.task`` (its options were checked by load_config); no labels yet.
    A method that cannot adapt the task's kind of model (prompt methods on images) is refused
    here, by asking the method table."""
    try:
        spec = task_spec(config.task)
    except (TypeError, ValueError) as exc:
        raise ConfigError([f"task: {exc}"], source=config.source) from exc
    try:
        check_serves(config.method_type, spec.name, spec.kind.family)
    except ValueError as exc:
        raise ConfigError([f"method.type: {exc}"], source=config.source) from exc
    return spec


def check_data(spec: TaskSpec, splits: Splits, source: str | None = None) -> TaskSpec:
    """Columns each split needs, then the label set from train, then labels of eval rows;
    returns the spec with its label set (every problem raised as one ConfigError)."""
    problems: list[str] = []

    def check(split: str, need_targets: bool) -> list[str]:
        found = spec.check_records(getattr(splits, split), split, need_targets)
        origin = splits.origins.get(split)
        return [f"{p} [rows read from {origin}]" if origin else p for p in found]

    if splits.train:
        problems += check("train", True)
    if splits.eval:
        problems += check("eval", True)
    if splits.test:
        problems += check("test", False)
    if problems:
        raise ConfigError(problems, source=source)
    try:
        spec = spec.fit(splits.train or splits.eval)
    except (ValueError, KeyError) as exc:
        raise ConfigError([f"task {spec.name}: {exc}"], source=source) from exc
    if splits.eval:
        problems += check("eval", True)
    if problems:
        raise ConfigError(problems, source=source)
    return spec


def load_model(
    config: RunConfig, spec: TaskSpec, zero3_config: dict[str, Any] | None = None
) -> tuple[torch.nn.Module, Any]:
    """Base model + tokenizer for the task (bundled name, folder, GGUF, hub id; dtype; 4-bit);
    under ZeRO-3 (``zero3_config``) partitioned while it loads."""
    from ..models import load_base_model

    return load_base_model(
        config.model.name,
        task=spec.name,
        dtype=None if config.model.dtype == "auto" else config.model.dtype,
        gguf_file=config.model.gguf_file,
        quantization=config.model.quantization,
        tokenizer_name_or_path=config.model.tokenizer,
        zero3_config=zero3_config,
        **spec.model_kwargs(),
    )


def build_peft_config(config: RunConfig, spec: TaskSpec, total_steps: int | None = None) -> Any:
    """The adapter config: the ``method`` block's fields on its method table row's class.

    Fields the run knows are filled in: ``task_type`` from the task, ``total_step`` (AdaLoRA's
    budget schedule) from the step plan, ``tokenizer_name_or_path`` (text-initialised prompts)
    from the model.
    """
    fields = {k: v for k, v in config.method.items() if k != "type"}
    cls = METHODS[config.method_type].config
    names = {f.name for f in dataclasses.fields(cls)}
    fields["task_type"] = spec.task_type
    fields["base_model_name_or_path"] = config.model.name
    if "total_step" in names and fields.get("total_step") is None and total_steps is not None:
        fields["total_step"] = total_steps
    if "tokenizer_name_or_path" in names and fields.get("tokenizer_name_or_path") is None:
        fields["tokenizer_name_or_path"] = config.model.tokenizer or config.model.name
    try:
        return cls(**fields)
    except (TypeError, ValueError) as exc:
        raise ConfigError([f"method: {exc}"], source=config.source) from exc


def attach_adapter(
    config: RunConfig, model: torch.nn.Module, spec: TaskSpec, total_steps: int | None = None
) -> Any:
    """Prepare a 4-bit base for training when quantised, then ``get_peft_model``."""
    from .. import get_peft_model

    checkpointing = config.gradient_checkpointing
    if config.model.quantization is not None:
        from ..quant import prepare_model_for_kbit_training

        prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    elif checkpointing:
        from ..quant.model_quant import enable_gradient_checkpointing

        enable_gradient_checkpointing(model)
    peft_config = build_peft_config(config, spec, total_steps)
    heads = getattr(spec.task, "trained_heads", None)  # a head PEFT has no TaskType for
    if heads is not None and not getattr(peft_config, "modules_to_save", True):
        peft_config.modules_to_save = heads(model)
    return get_peft_model(model, peft_config)


def trainable_line(model: Any) -> str:
    trainable, total = model.get_nb_trainable_parameters()
    return (
        f"trainable params: {trainable:,d} || all params: {total:,d} || "
        f"trainable%: {100 * trainable / max(total, 1):.4f}"
    )


__all__ = [
    "attach_adapter",
    "build_peft_config",
    "build_spec",
    "check_data",
    "load_model",
    "trainable_line",
]
