"""Prompt learning: prompt tuning, P-tuning and prefix tuning, one module per job.

::

    config.py        PromptLearningConfig and the three method configs (HF PEFT's fields)
    support.py       which models / task types each method serves; shape fields read from the model
    encoders.py      PromptEmbedding | PromptEncoder (MLP, LSTM) | PrefixEncoder -> virtual-token table
    forward.py       the table into the input embeddings (prompt tuning, P-tuning) or, through
    prefix_cache.py      a pre-filled key/value cache, into every attention layer (prefix tuning)
    generate.py      generate() with the virtual tokens processed once
    model.py         PromptAdapterModel: named adapters, forward/generate, save/load (PeftModel's
                     delegate for these methods)
"""

from .config import (
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptEncoderReparameterizationType,
    PromptLearningConfig,
    PromptTuningConfig,
    PromptTuningInit,
)
from .model import PromptAdapterModel

__all__ = [
    "PrefixTuningConfig",
    "PromptAdapterModel",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PromptLearningConfig",
    "PromptTuningConfig",
    "PromptTuningInit",
]
