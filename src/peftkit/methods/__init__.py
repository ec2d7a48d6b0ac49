"""The built-in methods, in the two tables that everything else looks methods up in.

::

    peft_type       CONFIGS[...] (adapter_config.json)   ADAPTER_MODELS[...] (PeftModel's delegate)
    LORA            lora.LoraConfig                      tuner.InjectedAdapterModel
    ADALORA         adalora.AdaLoraConfig                adalora.AdaLoraModel
    PROMPT_TUNING   prompt.PromptTuningConfig            prompt.PromptAdapterModel
    P_TUNING        prompt.PromptEncoderConfig           prompt.PromptAdapterModel
    PREFIX_TUNING   prompt.PrefixTuningConfig            prompt.PromptAdapterModel
    LOHA            loha.LoHaConfig                      loha.LoHaModel
    LOKR            lokr.LoKrConfig                      lokr.LoKrModel
    IA3             ia3.IA3Config                        ia3.IA3Model

A new method adds one row to each table. ``config.config_class`` reads ``CONFIGS``;
``model.PeftModel`` reads ``ADAPTER_MODELS``.
"""

from ..config import PeftConfig, PeftType
from ..tuner import InjectedAdapterModel
from .adalora import AdaLoraConfig, AdaLoraModel
from .ia3 import IA3Config, IA3Model
from .loha import LoHaConfig, LoHaModel
from .lokr import LoKrConfig, LoKrModel
from .lora import LoraConfig
from .prompt import (
    PrefixTuningConfig,
    PromptAdapterModel,
    PromptEncoderConfig,
    PromptTuningConfig,
)

CONFIGS: dict[PeftType, type[PeftConfig]] = {
    PeftType.LORA: LoraConfig,
    PeftType.ADALORA: AdaLoraConfig,
    PeftType.PROMPT_TUNING: PromptTuningConfig,
    PeftType.P_TUNING: PromptEncoderConfig,
    PeftType.PREFIX_TUNING: PrefixTuningConfig,
    PeftType.LOHA: LoHaConfig,
    PeftType.LOKR: LoKrConfig,
    PeftType.IA3: IA3Config,
}

ADAPTER_MODELS: dict[PeftType, type] = {
    PeftType.LORA: InjectedAdapterModel,
    PeftType.ADALORA: AdaLoraModel,
    PeftType.PROMPT_TUNING: PromptAdapterModel,
    PeftType.P_TUNING: PromptAdapterModel,
    PeftType.PREFIX_TUNING: PromptAdapterModel,
    PeftType.LOHA: LoHaModel,
    PeftType.LOKR: LoKrModel,
    PeftType.IA3: IA3Model,
}

__all__ = [
    "ADAPTER_MODELS",
    "CONFIGS",
    "AdaLoraConfig",
    "IA3Config",
    "LoHaConfig",
    "LoKrConfig",
    "LoraConfig",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptTuningConfig",
]
