"""``peftkit merge RUN1 RUN2 ... --weights W1 W2 ...``: adapter arithmetic over trained runs.

::

    RUN1/ RUN2/ ...   one base model, one method (checked: same base, same peft_type, same labels)
      ─> base model once (RUN1's config) + each run's adapter as src0, src1, ...
      ─> add_weighted_adapter([src0, src1, ...], weights, "default", combination_type, density, ...)
         (peftkit.methods.add_weighted: PEFT's combinations; the seed fixes dare's random masks)
      ─> OUT/adapter/            the combined adapter, PEFT's format
         OUT/config.yaml         RUN1's, so `peftkit eval / generate OUT` work as on a trained run
         OUT/task_state.json     RUN1's label set
         OUT/combination.json    sources, weights and options: how OUT was made

The folder is written through ``checkpoint.atomic_folder`` (a temporary folder swapped in), so
a failure leaves no half-written run behind, and its names come from ``RunFolder``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import atomic_folder, atomic_write_text
from ..config import read_config
from ..peft_model import PeftModel
from .config import ConfigError
from .inference import (
    Target,
    find_target,
    load_for_inference,
    restore_task_state,
    run_config,
    spec_for,
)
from .run_folder import RunFolder

COMBINATION_FILE = "combination.json"


@dataclasses.dataclass
class Combination:
    """How the adapters combine (``add_weighted_adapter``'s arguments; None: not given)."""

    weights: list[float]
    combination_type: str | None = None
    density: float | None = None
    svd_rank: int | None = None
    svd_clamp: float | None = None
    majority_sign_method: str | None = None
    seed: int = 0

    def options(self) -> dict[str, Any]:
        """The keyword arguments given (IA3 refuses LoRA's options by name)."""
        names = ("combination_type", "density", "svd_rank", "svd_clamp", "majority_sign_method")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


def combine_runs(
    targets: list[str],
    combination: Combination,
    output: str | Path,
    overwrite: bool = False,
    model_name: str | None = None,
) -> Path:
    """Combine the adapters of ``targets`` (run or adapter folders) into the run folder ``output``."""
    found = [find_target(t) for t in targets]
    _check_sources(targets, found, combination)
    out = Path(output)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(
            [f"--output {out} exists and is not empty; pass --overwrite or another folder"]
        )
    first = found[0]
    config = run_config(first)
    spec = spec_for(config)
    if spec is not None:
        spec = restore_task_state(spec, first) or spec
    loaded = load_for_inference(first, config, spec, model_name=model_name, use_adapter=False)
    names = [f"src{i}" for i in range(len(found))]
    model = PeftModel.from_pretrained(loaded.model, found[0].adapter_dir, adapter_name=names[0])
    for name, target in zip(names[1:], found[1:]):
        model.load_adapter(target.adapter_dir, adapter_name=name)
    torch.manual_seed(combination.seed)  # dare's random pruning
    model.add_weighted_adapter(names, combination.weights, "default", **combination.options())

    record = {
        "sources": [str(t.adapter_dir) for t in found],
        "weights": combination.weights,
        "peft_type": read_config(first.adapter_dir).peft_type.value,
        **combination.options(),
        "seed": combination.seed,
        "rank": getattr(model.peft_config["default"], "r", None),
    }
    with atomic_folder(out) as tmp:
        run = RunFolder(tmp)
        model.save_pretrained(run.adapter, selected_adapters=["default"])
        if first.run_dir is not None:
            source = RunFolder(first.run_dir)
            note = (
                f"# combined by `peftkit merge` from {', '.join(targets)} "
                f"(see {COMBINATION_FILE});\n"
                "# the adapter's own settings are in adapter/adapter_config.json\n"
            )
            text = first.config_path.read_text(encoding="utf-8")
            atomic_write_text(run.config, note + text)
            if source.task_state.exists():
                atomic_write_text(run.task_state, source.task_state.read_text(encoding="utf-8"))
        atomic_write_text(tmp / COMBINATION_FILE, json.dumps(record, indent=2) + "\n")
    print(f"combined {len(found)} adapters -> {out / 'adapter'}", file=sys.stderr)
    return out


def _check_sources(targets: list[str], found: list[Target], combination: Combination) -> None:
    """Every source holds an adapter of one method on one base model, with one label set."""
    problems = []
    if len(combination.weights) != len(found):
        problems.append(
            f"--weights: {len(combination.weights)} weights for {len(found)} adapters; give one "
            f"weight per run"
        )
    missing = [t for t, f in zip(targets, found) if f.adapter_dir is None]
    problems += [f"{t}: holds no adapter (train it first)" for t in missing]
    if problems:
        raise ConfigError(problems)
    configs = [read_config(f.adapter_dir) for f in found]
    kinds = {c.peft_type.value for c in configs}
    if len(kinds) > 1:
        problems.append(
            f"the runs hold different methods ({', '.join(sorted(kinds))}); combine one method"
        )
    bases = {_base_of(f, c) for f, c in zip(found, configs)}
    if len(bases) > 1:
        problems.append(
            f"the runs were trained on different base models ({', '.join(sorted(map(str, bases)))}); "
            f"adapters combine only on one base"
        )
    labels = {_labels_of(f) for f in found} - {None}
    if len(labels) > 1:
        problems.append("the runs' classifiers have different label sets (task_state.json)")
    if problems:
        raise ConfigError(problems)


def _base_of(target: Target, adapter_config: Any) -> str | None:
    if target.config_path is not None:
        import yaml

        config = yaml.safe_load(target.config_path.read_text(encoding="utf-8")) or {}
        name = (config.get("model") or {}).get("name")
        if name:
            return str(name)
    return adapter_config.base_model_name_or_path


def _labels_of(target: Target) -> str | None:
    if target.run_dir is None or not RunFolder(target.run_dir).task_state.exists():
        return None
    state = json.loads(RunFolder(target.run_dir).task_state.read_text(encoding="utf-8"))
    return json.dumps(state.get("labels"))
