"""Prefix tuning (Li & Liang, 2021): learned keys and values prepended in every attention layer.

::

    embedding (P, L*2*D)                                  prefix_projection=False
    embedding (P, D) -> Linear(D, h) -> Tanh -> Linear(h, L*2*D)   prefix_projection=True
                 │
                 └─> (P, L*2*D) --view--> per layer l: key (1, H, P, D/H), value (1, H, P, D/H)

``D = token_dim = num_key_value_heads * head_dim``, ``L = num_layers``. The keys and values enter
the model as a pre-filled key/value cache (:mod:`peftkit.methods.prefix_cache`), so each query
also attends to P extra positions whose keys and values are trained directly.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..config import PeftType, register_config
from .prompt_base import PromptLearningConfig, VirtualTokenEncoder


@register_config
@dataclasses.dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning: ``num_virtual_tokens`` key/value positions in each layer.

    Attributes:
        encoder_hidden_size: hidden width of the projection MLP (default: ``token_dim``).
        prefix_projection: learn the prefix through a two-layer MLP (more stable training;
            the MLP is saved too, so training can resume).
        init_weights: ``None`` (random) or ``"zero"`` (the prefix starts as all-zero keys/values).
    """

    peft_type = PeftType.PREFIX_TUNING

    encoder_hidden_size: int | None = None
    prefix_projection: bool = False
    init_weights: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"init_weights must be None or 'zero', got {self.init_weights!r}")


class PrefixEncoder(VirtualTokenEncoder):
    """The flat prefix table, optionally produced by an MLP (PEFT's module names)."""

    head_names = ("transform",)

    def __init__(self, config: PrefixTuningConfig) -> None:
        super().__init__()
        rows, dim = config.num_virtual_tokens, config.token_dim
        flat = config.num_layers * 2 * dim  # keys and values of every layer
        if config.prefix_projection and not config.inference_mode:
            self.embedding = nn.Embedding(rows, dim)
            self.transform = nn.Sequential(
                nn.Linear(dim, config.encoder_hidden_size),
                nn.Tanh(),
                nn.Linear(config.encoder_hidden_size, flat),
            )
            if config.init_weights == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(rows, flat)
            self.direct = config.prefix_projection  # PEFT's inference layout for projections
            if config.init_weights == "zero":
                nn.init.zeros_(self.embedding.weight)

    def forward(self) -> torch.Tensor:
        x = self.embedding.weight.unsqueeze(0)  # (1, P, D) or (1, P, L*2*D)
        if hasattr(self, "transform") and not self.direct:
            x = self.transform(x)  # (1, P, L*2*D)
        return x

    def expected_table_shape(self) -> tuple[int, int]:
        if hasattr(self, "transform") and not self.direct:
            return (self.embedding.num_embeddings, self.transform[-1].out_features)
        return tuple(self.embedding.weight.shape)
