"""Which LoRA layer class wraps a target module: one function over the layer kinds.

::

    nn.Linear / transformers Conv1D / peftkit Linear4bit  -> lora.LoraLinear (fan_in_fan_out fixed)
    nn.Embedding                                          -> lora.LoraEmbedding
    nn.Conv1d / 2d / 3d (grouped too)                     -> lora.LoraConv
    nn.MultiheadAttention                                 -> lora_mha.LoraMultiheadAttention

It sits above ``lora.py`` and ``lora_mha.py`` (which builds on ``lora.py``), so the layer
modules import one way; ``tuner.InjectedAdapterModel.create_layer`` calls it.
"""

from __future__ import annotations

from torch import nn

from ..inject import linear_fan_in_fan_out
from .lora import LoraConv, LoraEmbedding, LoraLayer, LoraLinear
from .lora_config import LoraConfig
from .lora_mha import LoraMultiheadAttention


def create_lora_layer(target: nn.Module, config: LoraConfig) -> LoraLayer:
    """Wrap ``target`` in the LoRA layer class for its type, or raise naming what is supported."""
    if isinstance(target, nn.Embedding):
        return LoraEmbedding(target)
    if isinstance(target, nn.MultiheadAttention):
        return LoraMultiheadAttention(target)
    if isinstance(target, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return LoraConv(target)
    fan_in_fan_out = linear_fan_in_fan_out(target, config)
    if fan_in_fan_out is not None:
        return LoraLinear(target, fan_in_fan_out=fan_in_fan_out)
    raise ValueError(
        f"LoRA cannot adapt a {type(target).__name__}; supported: nn.Linear, nn.Embedding, "
        f"nn.Conv1d/2d/3d, nn.MultiheadAttention, transformers Conv1D and peftkit Linear4bit"
    )
