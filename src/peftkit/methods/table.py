"""THE method table: one row per ``method.type`` a run can name; everything else asks it.

::

    method.type     config class (adapter_config.json)   adapter model (PeftModel's delegate)   base
    lora            lora.LoraConfig                      tuner.InjectedAdapterModel
    qlora           lora.LoraConfig                      tuner.InjectedAdapterModel             nf4
    adalora         adalora.AdaLoraConfig                adalora.AdaLoraModel
    prompt_tuning   prompt.PromptTuningConfig            prompt.PromptAdapterModel
    p_tuning        prompt.PromptEncoderConfig           prompt.PromptAdapterModel
    prefix_tuning   prompt.PrefixTuningConfig            prompt.PromptAdapterModel
    loha            loha.LoHaConfig                      loha.LoHaModel
    lokr            lokr.LoKrConfig                      lokr.LoKrModel
    ia3             ia3.IA3Config                        ia3.IA3Model

What a method can do is declared by its config class (``adapts``: what it changes in the model;
``model_families``: the kinds of base model it serves) and, for a method that is another one on a
quantised base (QLoRA), by its row. The run config's ``method.type`` choices, the trainer's
config class, ``PeftModel``'s adapter model and the "use one of ..." lists in errors all come from
here, so a new method is its module (a config class setting ``peft_type``, ``adapts`` and
``model_families``; an adapter model) plus one row below.
"""

from __future__ import annotations

import dataclasses

from ..config import ModelFamily, PeftConfig, PeftType
from ..tuner import InjectedAdapterModel
from .adalora import AdaLoraConfig, AdaLoraModel
from .ia3 import IA3Config, IA3Model
from .loha import LoHaConfig, LoHaModel
from .lokr import LoKrConfig, LoKrModel
from .lora_config import LoraConfig
from .prompt import PrefixTuningConfig, PromptAdapterModel, PromptEncoderConfig, PromptTuningConfig


@dataclasses.dataclass(frozen=True)
class Method:
    """One row of the method table.

    Attributes:
        name: ``method.type`` in a run config.
        config: the config class (``adapter_config.json``'s ``peft_type`` and fields, and what
            the method can do: ``adapts``, ``model_families``).
        adapter_model: the class ``PeftModel`` delegates every method-specific call to.
        quantization: the base model's 4-bit format when the run sets none (QLoRA: ``nf4``);
            such a method serves only the families whose models load in 4 bits.
        note: a hint shown beside the name where errors list the methods that apply.
    """

    name: str
    config: type[PeftConfig]
    adapter_model: type
    quantization: str | None = None
    note: str = ""

    @property
    def model_families(self) -> frozenset[ModelFamily]:
        """The kinds of base model this method serves."""
        families = self.config.model_families
        return families & QUANTIZABLE_FAMILIES if self.quantization else families

    def serves(self, family: ModelFamily | str) -> bool:
        return ModelFamily(family) in self.model_families

    def why_not(self, family: ModelFamily | str) -> str:
        """Why this method does not serve ``family`` (for errors)."""
        if ModelFamily(family) in self.config.model_families and self.quantization:
            return "it loads the base model in 4 bits, which peftkit does for transformers models"
        return self.config.adapts.description


# Families whose models load in 4 bits (transformers models, quantised layer by layer: quant.load).
QUANTIZABLE_FAMILIES = frozenset({ModelFamily.TEXT, ModelFamily.VISION})

METHODS: dict[str, Method] = {
    row.name: row
    for row in (
        #      method.type      config class          adapter model
        Method("lora",          LoraConfig,           InjectedAdapterModel,
               note="DoRA: lora with use_dora: true"),
        Method("qlora",         LoraConfig,           InjectedAdapterModel, quantization="nf4",
               note="LoRA on a 4-bit base: transformers models, whose Linear layers it quantises"),
        Method("adalora",       AdaLoraConfig,        AdaLoraModel),
        Method("prompt_tuning", PromptTuningConfig,   PromptAdapterModel),
        Method("p_tuning",      PromptEncoderConfig,  PromptAdapterModel),
        Method("prefix_tuning", PrefixTuningConfig,   PromptAdapterModel),
        Method("loha",          LoHaConfig,           LoHaModel),
        Method("lokr",          LoKrConfig,           LoKrModel),
        Method("ia3",           IA3Config,            IA3Model),
    )
}  # fmt: skip

# peft_type (adapter_config.json) -> the adapter model PeftModel delegates to
ADAPTER_MODELS: dict[PeftType, type] = {}
for _row in METHODS.values():
    ADAPTER_MODELS.setdefault(_row.config.peft_type, _row.adapter_model)


def method(name: str) -> Method:
    """The row of ``method.type`` ``name``; a ValueError lists the choices."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; use one of {', '.join(METHODS)}")
    return METHODS[name]


def choices(rows: list[Method]) -> str:
    """``"lora (DoRA: ...), adalora"``: names with their notes, for "use one of ..." messages."""
    return ", ".join(f"{m.name} ({m.note})" if m.note else m.name for m in rows)


def check_serves(name: str, task: str, family: ModelFamily | str) -> None:
    """ValueError when method ``name`` cannot adapt ``task``'s kind of model (``family``),
    naming why and the methods that can."""
    row = method(name)
    if row.serves(family):
        return
    family = ModelFamily(family)
    fitting = [m for m in METHODS.values() if m.serves(family)]
    raise ValueError(
        f"method {name!r} does not apply to {task} (a {family.value} model): "
        f"{row.why_not(family)}. Use one of {choices(fitting)}"
    )


__all__ = [
    "ADAPTER_MODELS",
    "METHODS",
    "QUANTIZABLE_FAMILIES",
    "Method",
    "check_serves",
    "choices",
    "method",
]
