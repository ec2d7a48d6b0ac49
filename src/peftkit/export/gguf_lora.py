"""A LoRA adapter in llama.cpp's adapter layout: ``peftkit export RUN --gguf-lora OUT.gguf``.

::

    general.architecture = the base's ("llama")    general.type = "adapter"
    adapter.type = "lora"                          adapter.lora.alpha = lora_alpha
    blk.N.attn_q.weight.lora_a   A (r, in)   ->  ggml ne [in, r]
    blk.N.attn_q.weight.lora_b   B (out, r)  ->  ggml ne [r, out]   (q/k rows reordered as the base)

llama.cpp adds ``scale * (alpha / r) * B A x`` with ``r`` read from each tensor's shape, so a
layer whose peftkit scale is not ``alpha / r`` (rsLoRA's ``alpha / sqrt(r)``, ``alpha_pattern``)
has the ratio folded into its B. Only plain LoRA on Linear layers is written: DoRA, LoRA bias,
embedding LoRA, saved heads (``modules_to_save``) and non-LoRA methods are refused by name
(``peftkit merge RUN --gguf`` exports any of them merged).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .gguf_model import file_type, finish, numpy_of
from .gguf_names import TensorNames, arch_of


def lora_layers(model: torch.nn.Module, adapter: str) -> list[tuple[str, Any]]:
    """``(module path inside the transformers model, layer)`` of every LoRA layer of ``adapter``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    found = []
    for path, module in base.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "lora_embedding_A"):
            if adapter in module.lora_embedding_A:
                raise ValueError(f"{path}: LoRA on an embedding is not written to GGUF adapters")
            if adapter in module.lora_A:
                if not isinstance(module.lora_A[adapter], torch.nn.Linear):
                    raise ValueError(f"{path}: only LoRA on Linear layers goes into a GGUF adapter")
                found.append((path, module))
    return found


def write_lora_gguf(
    model: torch.nn.Module,
    path: str | Path,
    dtype: str = "f32",
    adapter: str | None = None,
) -> Path:
    """Write the LoRA adapter of a PeftModel as a llama.cpp LoRA-adapter GGUF file.

    Args:
        model: a peftkit PeftModel with a LoRA adapter.
        path: the ``.gguf`` file to write.
        dtype: ``"f32"`` or ``"f16"`` for A and B.
        adapter: which adapter (default: the active one).
    """
    import gguf

    adapter = adapter or getattr(model, "active_adapter", None) or "default"
    config = model.peft_config[adapter]
    kind = str(getattr(config.peft_type, "value", config.peft_type))
    if kind != "LORA":
        raise ValueError(
            f"a GGUF LoRA adapter holds plain LoRA; this adapter is {kind}: export it merged "
            "with `peftkit merge RUN --gguf OUT.gguf`"
        )
    for option in ("use_dora", "lora_bias", "modules_to_save"):
        if getattr(config, option, None):
            raise ValueError(
                f"{option} is set: llama.cpp's LoRA adapters cannot hold it; export the model "
                "merged with `peftkit merge RUN --gguf OUT.gguf`"
            )
    base = model.get_base_model()
    arch = arch_of(base.config)
    names = TensorNames(base.config)
    alpha = float(config.lora_alpha)
    layers = lora_layers(model, adapter)
    if not layers:
        raise ValueError(f"adapter {adapter!r} has no LoRA layers")
    out = Path(path)
    writer = gguf.GGUFWriter(None, arch.name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_file_type(file_type(dtype))
    for module_path, layer in layers:
        if getattr(layer, "merged_adapters", None):
            raise ValueError(f"{module_path}: the adapter is merged; unmerge it before export")
        A = layer.lora_A[adapter].weight.detach()  # (r, in)
        B = layer.lora_B[adapter].weight.detach()  # (out, r)
        r = A.shape[0]
        # llama.cpp scales by alpha / r; peftkit's own scale may differ (rsLoRA, patterns)
        B = B * (layer.scaling[adapter] / (alpha / r))
        name = names.name(module_path + ".weight")
        writer.add_tensor(name + ".lora_a", numpy_of(A, dtype))
        writer.add_tensor(
            name + ".lora_b", numpy_of(names.reorder(module_path + ".weight", B), dtype)
        )
    return finish(writer, out)
