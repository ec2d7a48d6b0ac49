"""peftkit: parameter-efficient fine-tuning for Hugging Face models, in HF PEFT's API and format."""

from .config import PeftConfig, PeftType, TaskType
from .methods.adalora import AdaLoraConfig
from .methods.dropout_mask import set_dropout_mask
from .methods.ia3 import IA3Config
from .methods.loha import LoHaConfig
from .methods.lokr import LoKrConfig
from .methods.lora_config import LoraConfig
from .methods.prompt import (
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptEncoderReparameterizationType,
    PromptTuningConfig,
    PromptTuningInit,
)
from .peft_model import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    get_peft_model,
)
from .quant import (
    Linear4bit,
    dequantize_model,
    prepare_model_for_kbit_training,
    quantize_model,
    save_merged,
)
from .quiet import quiet_dependencies

# Before DeepSpeed / bitsandbytes are first imported (lazily: saving a model, diffusers).
quiet_dependencies()

__version__ = "0.1.0"

__all__ = [
    "set_dropout_mask",
    "AdaLoraConfig",
    "IA3Config",
    "Linear4bit",
    "LoHaConfig",
    "LoKrConfig",
    "LoraConfig",
    "PeftConfig",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PromptTuningConfig",
    "PromptTuningInit",
    "TaskType",
    "dequantize_model",
    "get_peft_model",
    "prepare_model_for_kbit_training",
    "quantize_model",
    "save_merged",
]
