"""A whole (merged) causal LM as one GGUF file: ``peftkit merge RUN --gguf OUT.gguf``.

::

    merge_and_unload() ──> state_dict ──TensorNames──> blk.N.attn_q.weight ... (q/k rows reordered)
      2-D weights in f16 or f32, norms (1-D) in f32 as llama.cpp's converter keeps them
    + <arch>.* hyper-parameters + tokenizer.* (+ chat template) ──GGUFWriter──> OUT.gguf

The file is written next to its destination and renamed into place, so a failed export never
leaves half a file behind. Read back by transformers (``from_pretrained(folder, gguf_file=)``)
and llama.cpp.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..checkpoint import atomic_file
from .gguf_names import TensorNames, arch_of, write_hparams
from .gguf_vocab import copy_tokenizer_fields, write_chat_template, write_tokenizer_fields

DTYPES = ("f16", "f32")


def numpy_of(tensor: torch.Tensor, dtype: str) -> Any:
    """A tensor as the numpy array the writer stores: f32 for 1-D tensors, else ``dtype``."""
    t = tensor.detach().to("cpu", torch.float32)
    if dtype == "f16" and t.dim() > 1:
        t = t.to(torch.float16)
    return t.contiguous().numpy()


def file_type(dtype: str) -> int:
    import gguf

    if dtype not in DTYPES:
        raise ValueError(f"GGUF dtype must be one of {DTYPES}, got {dtype!r}")
    return gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32


def finish(writer: Any, out: Path) -> Path:
    """Write what ``writer`` (made with no path) holds to ``out``, atomically."""
    with atomic_file(out) as tmp:
        writer.write_header_to_file(Path(tmp))
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out


def write_model_gguf(
    model: torch.nn.Module,
    tokenizer: Any,
    path: str | Path,
    dtype: str = "f16",
    source_gguf: str | Path | None = None,
    chat_template: str | None = None,
    name: str | None = None,
) -> Path:
    """Write a plain (merged) causal LM as a GGUF model file.

    Args:
        model: a transformers causal LM (Llama / Mistral / Qwen2), adapters already merged.
        tokenizer: its tokenizer (vocabulary and special ids, unless ``source_gguf`` has them).
        path: the ``.gguf`` file to write.
        dtype: ``"f16"`` or ``"f32"`` for the 2-D weights (norms stay f32).
        source_gguf: the GGUF file the base model came from: its tokenizer fields are copied.
        chat_template: the template to store (default: the tokenizer's).
        name: ``general.name``.
    """
    import gguf

    config = model.config
    arch = arch_of(config)
    names = TensorNames(config)
    out = Path(path)
    writer = gguf.GGUFWriter(None, arch.name)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or str(getattr(config, "_name_or_path", "") or arch.name))
    write_hparams(writer, config)
    writer.add_file_type(file_type(dtype))
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if source_gguf is not None:
        copy_tokenizer_fields(source_gguf, writer, skip_template=bool(template))
    else:
        write_tokenizer_fields(tokenizer, writer)
    write_chat_template(writer, template if isinstance(template, str) else None)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for key, tensor in model.state_dict().items():
        if tied and key.startswith("lm_head."):
            continue  # llama.cpp reads the output projection from token_embd when absent
        writer.add_tensor(names.name(key), numpy_of(names.reorder(key, tensor), dtype))
    return finish(writer, out)
