"""Load a trained adapter back for ``peftkit eval / generate / merge / inspect``.

A *target* can be::

    runs/x/                 a run folder: config.yaml + adapter/ (+ best/, checkpoints/)
    runs/x/adapter/         an adapter folder (adapter_config.json); its run folder, if it is
    runs/x/checkpoints/...  inside one, supplies the task and model
    examples/x.yaml         a config: the model + a fresh, untrained adapter (inspect), or the
                            base model alone (eval --no-adapter)

The base model is the one the run used (``config.yaml``), else the adapter's
``base_model_name_or_path``, unless ``--model`` names another. The task comes back in the same
two steps as in training::

    config.yaml ─> spec_for ─> restore_task_state (task_state.json: the label set) ─> TaskSpec
    load_for_inference: load_base_model (head sized by the labels; its missing weights are
        not reported when the adapter restores them) ─> PeftModel.from_pretrained
        ─> spec.build(tokenizer, model) ─> Loaded(model, tokenizer, task, ...)
        and one line on stderr saying what was loaded
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..config import CONFIG_NAME, read_config
from ..tasks import Task, TaskSpec, task_kind
from .config import ConfigError, RunConfig, load_config
from .run_folder import RunFolder
from .setup import build_spec


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
    if (p / CONFIG_NAME).exists():  # an adapter: adapter/, best/, checkpoints/step-N/adapter/
        run = next(
            (
                RunFolder(d)
                for d in (p.parent, p.parent.parent, p.parent.parent.parent)
                if RunFolder(d).config.exists()
            ),
            None,
        )
        return Target(
            run_dir=run.root if run else None,
            adapter_dir=p,
            config_path=run.config if run else None,
        )
    run = RunFolder(p)
    if run.config.exists():
        adapter = next((a for a in (run.adapter, run.best) if (a / CONFIG_NAME).exists()), None)
        return Target(run_dir=p, adapter_dir=adapter, config_path=run.config)
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


def spec_for(config: RunConfig | None) -> TaskSpec | None:
    """The run's task spec (no labels yet), or None without a config (a bare adapter folder)."""
    return build_spec(config) if config is not None else None


def restore_task_state(spec: TaskSpec, target: Target) -> TaskSpec | None:
    """``spec`` with the label set its run learnt (``task_state.json``); None if unknown."""
    if target.run_dir is None or not RunFolder(target.run_dir).task_state.exists():
        return None
    state = json.loads(RunFolder(target.run_dir).task_state.read_text(encoding="utf-8"))
    return spec.restore(state) if state.get("labels") else None


def load_for_inference(
    target: Target,
    config: RunConfig | None,
    spec: TaskSpec | None,
    model_name: str | None = None,
    use_adapter: bool = True,
    dtype: str | None = None,
    quantization: bool = True,
    trainable: bool = False,
) -> Loaded:
    """Base model (+ the target's adapter, in eval mode; frozen unless ``trainable``), tokenizer
    and the task built on them; prints one line on stderr saying what was loaded."""
    from .. import PeftModel
    from ..models import load_base_model

    if config is not None and config.num_threads:  # eval/generate run as the training run did
        torch.set_num_threads(config.num_threads)
    adapter_config = read_config(target.adapter_dir) if target.adapter_dir else None
    name = (
        model_name
        or (config.model.name if config else None)
        or (adapter_config.base_model_name_or_path if adapter_config else None)
    )
    if not name:
        raise ConfigError(["no base model known for this adapter: pass --model NAME_OR_PATH"])
    if spec is not None and spec.needs_labels:
        raise ConfigError(
            [
                "the classifier's label set is unknown: point at the run folder "
                "(it keeps task_state.json) or give the config with its data"
            ]
        )
    if spec is not None:
        kind = spec.name
    elif adapter_config is not None and adapter_config.task_type is not None:
        kind = task_kind(adapter_config.task_type).name
    else:
        kind = "causal_lm"
    has_adapter = bool(use_adapter and adapter_config is not None)
    restored = list(getattr(adapter_config, "modules_to_save", None) or []) if has_adapter else []
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
        restored_modules=restored,
        **(spec.model_kwargs() if spec is not None else {}),
    )
    heads = [m for m in restored if _has_module(model, m)]
    base_name = type(model).__name__
    if has_adapter:
        model = PeftModel.from_pretrained(model, target.adapter_dir, is_trainable=trainable)
    model.eval()
    task = spec.build(tokenizer, model) if spec is not None else None
    print(
        _loaded_line(name, base_name, target if has_adapter else None, heads, spec), file=sys.stderr
    )
    return Loaded(model, tokenizer, config, task, target, has_adapter)


def attach_lora_file(model: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """``model`` with the LoRA at ``path``: a PEFT adapter folder (adapter_config.json) or a
    diffusers LoRA file (``pytorch_lora_weights.safetensors``, or a folder holding one)."""
    from .. import PeftModel

    p = Path(path).expanduser()
    if (p / CONFIG_NAME).is_file():
        return PeftModel.from_pretrained(model, p)
    from ..diffusion import load_diffusers_lora

    return load_diffusers_lora(model, p)


def load_image_base(
    folder: str | Path, lora: str | Path | None = None, dtype: str | None = None
) -> Loaded:
    """A text-to-image base folder (Stable Diffusion or pixel layout) for ``peftkit generate
    BASE --lora FILE``: the model (+ the LoRA), its tokenizer and a default text_to_image task;
    prints one line on stderr saying what was loaded."""
    from ..models import load_base_model
    from ..tasks import task_spec

    spec = task_spec({"type": "text_to_image"})
    model, tokenizer = load_base_model(str(folder), task="text_to_image", dtype=dtype)
    base_name = type(model).__name__
    if lora is not None:
        model = attach_lora_file(model, lora)
    model.eval()
    task = spec.build(tokenizer, model)
    line = f"loaded: base model {folder} ({base_name})"
    print(line + (f" + LoRA {lora}" if lora else ", no adapter"), file=sys.stderr)
    return Loaded(model, tokenizer, None, task, Target(), lora is not None)


def _has_module(model: torch.nn.Module, name: str) -> bool:
    return any(n == name or n.endswith("." + name) for n, _ in model.named_modules())


def _loaded_line(
    name: str, base_name: str, target: Target | None, heads: list[str], spec: TaskSpec | None
) -> str:
    """``base model X (Cls) + adapter A; head `classifier` (2 labels) restored from the adapter``."""
    line = f"loaded: base model {name} ({base_name})"
    if target is None:
        return line + ", no adapter"
    line += f" + adapter {target.adapter_dir}"
    if heads:
        n_labels = spec.model_kwargs().get("num_labels") if spec is not None else None
        size = f" ({n_labels} labels)" if n_labels else ""
        names = ", ".join(f"`{h}`" for h in heads)
        line += f"; head {names}{size} restored from the adapter"
    return line
