"""Load a trained adapter back for ``peftkit eval / generate / merge / inspect``.

A *target* can be::

    runs/x/                 a run folder: config.yaml + adapter/ (+ best/, checkpoints/)
    runs/x/adapter/         an adapter folder (adapter_config.json); its run folder, if it is
    runs/x/checkpoints/...  inside one, supplies the task and model
    examples/x.yaml         a config: the model + a fresh, untrained adapter (inspect), or the
                            base model alone (eval --no-adapter)

The base model is the one the run used (``config.yaml``), else the adapter's
``base_model_name_or_path``, unless ``--model`` names another.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..config import CONFIG_NAME, TaskType, read_config
from ..tasks import Task
from .config import ConfigError, RunConfig, load_config
from .run_folder import TASK_STATE
from .setup import build_task

# adapter_config.json task_type -> the model kind load_base_model takes
_KIND_OF_TASK_TYPE = {
    TaskType.CAUSAL_LM: "causal_lm",
    TaskType.SEQ_2_SEQ_LM: "seq2seq",
    TaskType.SEQ_CLS: "seq_cls",
    TaskType.TOKEN_CLS: "token_cls",
    TaskType.QUESTION_ANS: "qa",
    TaskType.FEATURE_EXTRACTION: "feature_extraction",
}


@dataclasses.dataclass
class Target:
    """What a command-line target points at."""

    run_dir: Path | None = None
    adapter_dir: Path | None = None
    config_path: Path | None = None


def find_target(target: str | Path) -> Target:
    """Classify ``target`` (see the module docstring); errors say what was expected."""
    p = Path(target)
    if p.is_file():
        if p.suffix.lower() in (".yaml", ".yml"):
            return Target(config_path=p)
        if p.name == CONFIG_NAME:
            p = p.parent
        else:
            raise ConfigError([f"{p}: expected a run folder, an adapter folder or a .yaml config"])
    if not p.exists():
        raise ConfigError(
            [f"{p}: not found (expected a run folder, an adapter folder or a .yaml config)"]
        )
    if (p / CONFIG_NAME).exists():
        run = next(
            (
                d
                for d in (p.parent, p.parent.parent, p.parent.parent.parent)
                if (d / "config.yaml").exists()
            ),
            None,
        )
        return Target(run_dir=run, adapter_dir=p, config_path=run / "config.yaml" if run else None)
    if (p / "config.yaml").exists():
        adapter = next((p / n for n in ("adapter", "best") if (p / n / CONFIG_NAME).exists()), None)
        return Target(run_dir=p, adapter_dir=adapter, config_path=p / "config.yaml")
    raise ConfigError(
        [
            f"{p}: holds neither {CONFIG_NAME} (an adapter) nor config.yaml (a run folder); point at "
            "the folder `peftkit train` wrote or at its adapter/ subfolder"
        ]
    )


@dataclasses.dataclass
class Loaded:
    """A model ready to run, with what is known about how it was trained."""

    model: torch.nn.Module
    tokenizer: Any
    config: RunConfig | None
    task: Task | None
    target: Target
    has_adapter: bool


def run_config(target: Target, overrides: Sequence[str] = ()) -> RunConfig | None:
    """The run's config (with overrides), or None for a bare adapter folder."""
    if target.config_path is None:
        if overrides:
            raise ConfigError(["KEY=VALUE overrides need a run folder or a config file"])
        return None
    return load_config(target.config_path, overrides, check_files=False, require_train=False)


def restore_task_state(task: Task, target: Target) -> bool:
    """Give the task the label set its run learnt (``task_state.json``); False if unknown."""
    if target.run_dir is None or not (target.run_dir / TASK_STATE).exists():
        return False
    state = json.loads((target.run_dir / TASK_STATE).read_text(encoding="utf-8"))
    labels = state.get("labels")
    if labels and hasattr(task, "labels"):
        task.labels = list(labels)
        return True
    return False


def load_for_inference(
    target: Target,
    config: RunConfig | None,
    task: Task | None,
    model_name: str | None = None,
    use_adapter: bool = True,
    dtype: str | None = None,
    quantization: bool = True,
    trainable: bool = False,
) -> Loaded:
    """Base model (+ the target's adapter, in eval mode; frozen unless ``trainable``) and tokenizer."""
    from .. import PeftModel
    from ..models import load_base_model

    adapter_config = read_config(target.adapter_dir) if target.adapter_dir else None
    name = (
        model_name
        or (config.model.name if config else None)
        or (adapter_config.base_model_name_or_path if adapter_config else None)
    )
    if not name:
        raise ConfigError(["no base model known for this adapter: pass --model NAME_OR_PATH"])
    if task is not None:
        kind = task.model_kind
    elif adapter_config is not None and adapter_config.task_type in _KIND_OF_TASK_TYPE:
        kind = _KIND_OF_TASK_TYPE[adapter_config.task_type]
    else:
        kind = "causal_lm"
    kwargs: dict[str, Any] = task.model_kwargs() if task is not None else {}
    if kind == "seq_cls" and not kwargs.get("num_labels"):
        raise ConfigError(
            [
                "the classifier's label set is unknown: point at the run folder "
                "(it keeps task_state.json) or give the config with its data"
            ]
        )
    model_section = config.model if config else None
    model, tokenizer = load_base_model(
        name,
        task=kind,
        dtype=dtype
        or (
            None if model_section is None or model_section.dtype == "auto" else model_section.dtype
        ),
        gguf_file=model_section.gguf_file if model_section and not model_name else None,
        quantization=model_section.quantization if model_section and quantization else None,
        tokenizer_name_or_path=model_section.tokenizer if model_section else None,
        **kwargs,
    )
    if task is not None:
        task.bind(tokenizer)
        task.configure_model(model)
    has_adapter = bool(use_adapter and target.adapter_dir is not None)
    if has_adapter:
        model = PeftModel.from_pretrained(model, target.adapter_dir, is_trainable=trainable)
    if task is not None:
        task.use_model(model)
    model.eval()
    return Loaded(model, tokenizer, config, task, target, has_adapter)


def task_for(config: RunConfig | None) -> Task | None:
    return build_task(config) if config is not None else None
