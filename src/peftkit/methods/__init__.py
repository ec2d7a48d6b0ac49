"""Built-in adapter methods; importing this package registers them.

``TUNERS`` maps each injected-adapter method to the wrapper class that injects its layers.
"""

from ..config import PeftType
from .adalora import AdaLoraConfig
from .lora import LoraConfig
from .p_tuning import PromptEncoderConfig
from .prefix_tuning import PrefixTuningConfig
from .prompt_tuning import PromptTuningConfig

TUNERS: dict = {}


def _register_builtin() -> None:
    from ..tuner import InjectedAdapterModel

    TUNERS[PeftType.LORA] = InjectedAdapterModel

    from .adalora import AdaLoraModel

    TUNERS[PeftType.ADALORA] = AdaLoraModel


_register_builtin()

__all__ = [
    "AdaLoraConfig",
    "LoraConfig",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptTuningConfig",
    "TUNERS",
]
