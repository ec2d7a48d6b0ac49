"""What a GGUF file calls a transformers model's parts: architecture, hyper-parameters, tensors.

::

    LlamaForCausalLM  -> general.architecture "llama"; llama.block_count, llama.embedding_length...
    model.layers.3.self_attn.q_proj.weight -> blk.3.attn_q.weight   (gguf's TensorNameMap)
    model.embed_tokens.weight -> token_embd.weight; lm_head -> output (left out when tied)

llama.cpp's Llama graph applies rotary embeddings to interleaved pairs, transformers' to the two
halves of each head, so Llama's ``q_proj`` / ``k_proj`` rows are reordered on the way out
(:func:`permute_rows`; transformers' GGUF loader undoes it on the way in). Qwen2 files keep
transformers' order.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


@dataclasses.dataclass(frozen=True)
class Arch:
    """A transformers architecture as GGUF knows it."""

    name: str  # general.architecture, the prefix of the hyper-parameter keys
    permute_qk: bool  # reorder q/k rows for llama.cpp's rotary layout


# transformers class -> GGUF architecture (both read back by transformers' GGUF loader)
ARCHITECTURES = {
    "LlamaForCausalLM": Arch("llama", permute_qk=True),
    "MistralForCausalLM": Arch("llama", permute_qk=True),
    "Qwen2ForCausalLM": Arch("qwen2", permute_qk=False),
}


def arch_of(config: Any) -> Arch:
    """The GGUF architecture of a model config; ValueError names the supported ones."""
    names = list(getattr(config, "architectures", None) or [])
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    by_type = {
        "llama": "LlamaForCausalLM",
        "mistral": "MistralForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
    }
    if getattr(config, "model_type", None) in by_type:
        return ARCHITECTURES[by_type[config.model_type]]
    raise ValueError(
        f"GGUF export supports {sorted(ARCHITECTURES)}; this model is "
        f"{names or getattr(config, 'model_type', '?')}"
    )


def rope_theta(config: Any) -> float:
    """The rotary base; ValueError for scaled rotary embeddings (not exported yet)."""
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise ValueError(f"GGUF export does not write rope_type {kind!r} yet (only 'default')")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    return float(theta if theta is not None else 10000.0)


def head_dim(config: Any) -> int:
    return int(
        getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    )


def write_hparams(writer: Any, config: Any) -> None:
    """The architecture's hyper-parameters (``<arch>.block_count`` ...) into a GGUFWriter."""
    heads = config.num_attention_heads
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(heads))
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or heads))
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(head_dim(config))
    if head_dim(config) != config.hidden_size // heads:
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
    writer.add_vocab_size(int(config.vocab_size))


def permute_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of each head from halves order (transformers) to interleaved pairs (llama.cpp):
    ``(n_head, 2, d/2, ...) -> (n_head, d/2, 2, ...)``."""
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])  # (H, 2, d/2, ...)
        .transpose(1, 2)  # (H, d/2, 2, ...)
        .reshape(weight.shape)
    )


class TensorNames:
    """transformers parameter names -> GGUF tensor names (and the row order llama.cpp wants)."""

    def __init__(self, config: Any) -> None:
        import gguf

        self.config = config
        self.arch = arch_of(config)
        model_arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[self.arch.name]
        self.map = gguf.get_tensor_name_map(model_arch, int(config.num_hidden_layers))

    def name(self, hf_name: str) -> str:
        """``model.layers.0.self_attn.q_proj.weight`` -> ``blk.0.attn_q.weight``."""
        found = self.map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if found is None:
            raise ValueError(f"no GGUF name for tensor {hf_name!r} ({self.arch.name})")
        return found

    def reorder(self, hf_name: str, rows: torch.Tensor) -> torch.Tensor:
        """``rows`` (a weight, a bias or a LoRA B, indexed by output row) in llama.cpp's order."""
        if not self.arch.permute_qk:
            return rows
        module = hf_name.rsplit(".", 1)[0] if hf_name.endswith((".weight", ".bias")) else hf_name
        if module.endswith("q_proj"):
            return permute_rows(rows, self.config.num_attention_heads)
        if module.endswith("k_proj"):
            kv = (
                getattr(self.config, "num_key_value_heads", None) or self.config.num_attention_heads
            )
            return permute_rows(rows, kv)
        return rows
