"""The tokenizer inside a GGUF file (``tokenizer.ggml.*`` and ``tokenizer.chat_template``).

Two sources, best first:

* the base model's own GGUF file (the bundled SmolLM2): its ``tokenizer.*`` fields are copied
  as they are, so llama.cpp tokenizes exactly as with the original file;
* a transformers fast tokenizer: a byte-level BPE (``tokenizer.json`` model ``BPE``) becomes
  ``tokenizer.ggml.model = "gpt2"`` with its tokens, token types and merges, plus the special
  token ids. Other tokenizer models are written as a token list only (enough for transformers'
  GGUF loader to read the model; llama.cpp would not tokenize text with them).

The chat template (the run's ``task.chat_template``, else the tokenizer's) is written either way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# llama.cpp token types (gguf.TokenType): NORMAL 1, CONTROL 3, USER_DEFINED 4
NORMAL, CONTROL, USER_DEFINED = 1, 3, 4


def copy_tokenizer_fields(source: str | Path, writer: Any, skip_template: bool = False) -> int:
    """Copy every ``tokenizer.*`` field of the GGUF file ``source``; returns how many."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    copied = 0
    for field in reader.fields.values():
        if not field.name.startswith("tokenizer."):
            continue
        if skip_template and field.name == gguf.Keys.Tokenizer.CHAT_TEMPLATE:
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
        copied += 1
    return copied


def write_tokenizer_fields(tokenizer: Any, writer: Any) -> None:
    """A transformers tokenizer's vocabulary, merges and special ids (see the module docstring)."""
    size = len(tokenizer)
    vocab = tokenizer.get_vocab()
    tokens = [f"[PAD{i}]" for i in range(size)]
    for token, i in vocab.items():
        if i < size:
            tokens[i] = token
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    added = {i for i in getattr(tokenizer, "added_tokens_decoder", {})}
    types = [
        CONTROL if i in special else USER_DEFINED if i in added else NORMAL for i in range(size)
    ]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = json.loads(backend.to_str())["model"] if backend is not None else {}
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if model.get("type") == "BPE":
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        writer.add_token_merges(merges)
    for what, value in (
        ("bos", tokenizer.bos_token_id),
        ("eos", tokenizer.eos_token_id),
        ("pad", tokenizer.pad_token_id),
        ("unk", tokenizer.unk_token_id),
    ):
        if value is not None:
            getattr(writer, f"add_{what}_token_id")(int(value))


def write_chat_template(writer: Any, template: str | None) -> None:
    if template:
        writer.add_chat_template(template)
