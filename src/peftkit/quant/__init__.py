"""QLoRA quantisation implemented in PyTorch: NF4/FP4 blockwise 4-bit weights, double
quantisation, the ``Linear4bit`` layer and whole-model helpers.

Bit-compatible with bitsandbytes 0.50 (same packed bytes and statistics), which is an optional
fast path on CUDA (:mod:`peftkit.quant.bnb_compat`), never a requirement.
"""

from .bnb_compat import (
    from_bnb_quant_state,
    get_dequant_backend,
    set_dequant_backend,
    to_bnb_quant_state,
)
from .codebooks import code_4bit, dynamic_code_8bit
from .linear4bit import Linear4bit, QuantizedLinear
from .model_quant import (
    dequantize_model,
    is_quantized,
    prepare_model_for_kbit_training,
    quantize_model,
    quantized_param_count,
    save_merged,
)
from .nf4 import QuantState4bit, dequantize_4bit, quantization_error, quantize_4bit

__all__ = [
    "Linear4bit",
    "QuantizedLinear",
    "QuantState4bit",
    "code_4bit",
    "dequantize_4bit",
    "dequantize_model",
    "dynamic_code_8bit",
    "from_bnb_quant_state",
    "get_dequant_backend",
    "is_quantized",
    "prepare_model_for_kbit_training",
    "quantization_error",
    "quantize_4bit",
    "quantize_model",
    "quantized_param_count",
    "save_merged",
    "set_dequant_backend",
    "to_bnb_quant_state",
]
