"""LoRA's configuration: every HF PEFT ``LoraConfig`` field, implemented or refused by name.

``LoraConfig`` (also AdaLoRA's base) holds the fields ``adapter_config.json`` carries, under PEFT's
names; ``rank_for`` / ``alpha_for`` apply ``rank_pattern`` / ``alpha_pattern`` per module. PEFT
options peftkit does not implement are accepted at their "off" value and refused otherwise
(``_UNIMPLEMENTED_OPTIONS``): silently ignoring one would load a different model. The layers
that use it are in :mod:`peftkit.methods.lora`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from ..config import Adapts, ModelFamily, PeftConfig, PeftType


@dataclasses.dataclass
class LoraConfig(PeftConfig):
    """LoRA hyper-parameters, with HF PEFT's names and meaning.

    Attributes:
        r: rank of the update ``B A``.
        lora_alpha: scale numerator; the update is multiplied by ``lora_alpha / r``.
        lora_dropout: dropout probability on the adapter's input during training.
        target_modules: module names to adapt: a list (exact name or ``.name`` suffix), a regex string
            (full match of the module path), or ``"all-linear"`` (every linear layer except the output head).
        exclude_modules: names never adapted (same matching rules as ``target_modules``).
        bias: which biases train: ``"none"``, ``"all"`` or ``"lora_only"`` (those of adapted layers).
        modules_to_save: extra modules trained in full and saved with the adapter (e.g. a classifier).
        fan_in_fan_out: the target stores its weight as (in, out), like GPT-2's ``Conv1D``.
        init_lora_weights: ``True`` (Kaiming-uniform A, zero B), ``"gaussian"`` (normal(0, 1/r) A, zero
            B) or ``False`` (random A and B: a non-identity adapter, for tests).
        use_rslora: scale by ``alpha / sqrt(r)`` (rank-stabilised LoRA).
        layers_to_transform: only adapt these layer indices (an int or a list).
        layers_pattern: the name of the layer list (``"layers"``, ``"h"``, ...) used to find the index.
        rank_pattern / alpha_pattern: per-module overrides of ``r`` / ``lora_alpha``; keys are regexes
            matched against the end of the module path.
        use_dora: weight-decomposed LoRA (:mod:`peftkit.methods.dora`): a trainable magnitude
            per output times the normalised adapted weight.
        lora_bias: ``lora_B`` gets a bias (scaled like the update; merged into the base bias).

    Every other PEFT ``LoraConfig`` option is accepted at its "off" value and refused by name
    otherwise (``_UNIMPLEMENTED_OPTIONS``).
    """

    peft_type = PeftType.LORA
    adapts = Adapts.LAYERS
    model_families = frozenset(ModelFamily)  # any model with Linear / Conv / Embedding layers

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    bias: str = "none"
    modules_to_save: list[str] | None = None
    fan_in_fan_out: bool = False
    init_lora_weights: bool | str = True
    use_rslora: bool = False
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)
    use_dora: bool = False
    lora_bias: bool = False
    # PEFT options peftkit does not implement: accepted at their "off" value (PEFT writes them
    # all into adapter_config.json), refused otherwise (see _UNIMPLEMENTED_OPTIONS).
    megatron_config: dict | None = None
    megatron_core: str | None = "megatron.core"
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    loftq_config: dict = dataclasses.field(default_factory=dict)
    eva_config: dict | None = None
    corda_config: dict | None = None
    lora_ga_config: dict | None = None
    velora_config: dict | None = None
    alora_invocation_tokens: list[int] | None = None
    use_qalora: bool = False
    qalora_group_size: int = 16
    monteclora_config: dict | None = None
    layer_replication: list[list[int]] | None = None
    target_parameters: list[str] | None = None
    use_bdlora: dict | None = None
    arrow_config: dict | None = None
    kasa_config: dict | None = None
    ensure_weight_tying: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        refuse_unimplemented_options(self)
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.init_lora_weights not in (True, False, "gaussian"):
            known = isinstance(self.init_lora_weights, str) and (
                self.init_lora_weights in _PEFT_INITS or self.init_lora_weights.startswith("pissa")
            )
            if known:
                raise ValueError(
                    f"init_lora_weights={self.init_lora_weights!r} is a PEFT initialisation peftkit "
                    f"does not implement; peftkit implements True, False and 'gaussian'"
                )
            raise ValueError(
                f"init_lora_weights must be True, False or 'gaussian', got {self.init_lora_weights!r}"
            )

    def rank_for(self, module_name: str) -> int:
        """``r`` for one module, honouring ``rank_pattern``."""
        key = match_pattern_key(self.rank_pattern, module_name)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha_for(self, module_name: str) -> float:
        """``lora_alpha`` for one module, honouring ``alpha_pattern``."""
        key = match_pattern_key(self.alpha_pattern, module_name)
        return self.alpha_pattern[key] if key is not None else self.lora_alpha


# PEFT initialisations of A and B (from data, SVD, quantisation error...) peftkit lacks.
_PEFT_INITS = ("eva", "olora", "pissa", "corda", "loftq", "orthogonal", "mica", "lora_ga")

# PEFT LoraConfig options peftkit does not implement: (the value meaning "off", what it is).
# Anything else changes the maths, so it is refused by name rather than silently ignored.
_UNIMPLEMENTED_OPTIONS: dict[str, tuple[Any, str]] = {
    "loftq_config": ({}, "LoftQ initialisation"),
    "eva_config": (None, "EVA initialisation"),
    "corda_config": (None, "CorDA initialisation"),
    "lora_ga_config": (None, "LoRA-GA initialisation"),
    "velora_config": (None, "VeLoRA"),
    "alora_invocation_tokens": (None, "activated LoRA (aLoRA)"),
    "use_qalora": (False, "QA-LoRA"),
    "monteclora_config": (None, "MonteCLoRA"),
    "layer_replication": (None, "layer replication"),
    "use_bdlora": (None, "BD-LoRA"),
    "arrow_config": (None, "Arrow routing"),
    "kasa_config": (None, "KaSA"),
    "megatron_config": (None, "Megatron tensor-parallel layers"),
    "ensure_weight_tying": (False, "tied modules_to_save / trainable tokens"),
}


def refuse_unimplemented_options(config: LoraConfig) -> None:
    """Raise a ValueError naming the first PEFT option set that peftkit does not implement."""
    for name, (off, what) in _UNIMPLEMENTED_OPTIONS.items():
        value = getattr(config, name)
        if value is not None and value != off:
            raise ValueError(
                f"{type(config).__name__}({name}={value!r}): {what} is a PEFT feature peftkit "
                f"does not implement; remove the option (or use HF PEFT for this adapter)"
            )
    if config.use_dora and config.lora_bias:
        raise ValueError(
            f"{type(config).__name__}(use_dora=True, lora_bias=True): DoRA together with lora_bias "
            f"is not implemented by peftkit; use one of them"
        )
    if config.peft_type is not PeftType.LORA:
        for name in ("target_parameters", "trainable_token_indices"):
            if getattr(config, name):
                raise ValueError(
                    f"{type(config).__name__}({name}=...): {config.peft_type.value} with {name} "
                    f"is not implemented by peftkit (LoRA is)"
                )
        for name in ("use_dora", "lora_bias"):
            if getattr(config, name):
                raise ValueError(
                    f"{type(config).__name__}({name}=True): {config.peft_type.value} with {name} "
                    f"is not implemented by peftkit (nor accepted by PEFT)"
                )


def match_pattern_key(patterns: dict[str, Any], module_name: str) -> str | None:
    """The first pattern key that matches the end of ``module_name`` (PEFT's rank/alpha_pattern rule)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None
