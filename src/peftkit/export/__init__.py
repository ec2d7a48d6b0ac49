"""Export for local inference: GGUF files that llama.cpp (and transformers' GGUF loader) read.

::

    merged model (W + s B A) ──write_model_gguf──> OUT.gguf        one file: weights (f32 / f16),
                                                                    hyper-parameters, tokenizer,
                                                                    chat template
    adapter (A, B, alpha)   ──write_lora_gguf───> ADAPTER.gguf    llama.cpp's LoRA-adapter layout:
                                                                    blk.N.attn_q.weight.lora_a/_b,
                                                                    general.type "adapter"

Both are written with the ``gguf`` package's writer (``pip install gguf``). Supported
architectures are the ones listed in :data:`peftkit.export.gguf_names.ARCHITECTURES`.
"""

from .gguf_lora import write_lora_gguf
from .gguf_model import write_model_gguf

__all__ = ["write_lora_gguf", "write_model_gguf"]
