"""What the three prompt-learning methods share: the config fields and the encoder interface.

Every prompt method learns a small table of *virtual tokens*. An encoder turns its parameters into
that table; :mod:`peftkit.methods.prompting` decides where the table enters the base model::

    PromptEmbedding  (prompt tuning)   embedding                       -> (1, N, D)  prepended to inputs
    PromptEncoder    (P-tuning)        embedding -> MLP | LSTM + MLP   -> (1, N, D)  prepended to inputs
    PrefixEncoder    (prefix tuning)   embedding [-> MLP]              -> (1, P, L*2*D)  key/value cache

``N = num_virtual_tokens * num_transformer_submodules``. HF PEFT saves only the *output* table
(``prompt_embeddings``). An encoder that is rebuilt from that table alone, without the
reparameterising network (P-tuning's head, prefix tuning's projection), runs in *direct* mode:
its ``embedding`` holds the output rows and ``forward`` returns them unchanged. That is also how
PEFT builds these encoders for inference.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from ..config import PeftConfig


@dataclasses.dataclass
class PromptLearningConfig(PeftConfig):
    """Fields shared by prompt tuning, P-tuning and prefix tuning (HF PEFT's names).

    The model-shape fields are filled from the base model at ``get_peft_model`` when left ``None``
    and checked against it when given.

    Attributes:
        num_virtual_tokens: how many virtual tokens (prefix positions) to learn.
        token_dim: width of one virtual token: the input-embedding width for prompt tuning and
            P-tuning; ``num_key_value_heads * head_dim`` for prefix tuning.
        num_transformer_submodules: 2 for encoder-decoder (seq2seq) models, else 1.
        num_attention_heads: attention heads (key/value heads for prefix tuning).
        num_layers: transformer layers (the layers that receive a prefix, for prefix tuning).
        modules_to_save: extra modules trained in full and saved (the task wrappers add the
            classification head, as PEFT does).
    """

    is_prompt_learning: ClassVar[bool] = True

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_virtual_tokens is None:
            raise ValueError(
                f"{type(self).__name__} needs num_virtual_tokens (how many virtual tokens to "
                f"learn), e.g. num_virtual_tokens=20"
            )
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens < 1:
            raise ValueError(
                f"num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}"
            )
        if self.num_transformer_submodules not in (None, 1, 2):
            raise ValueError(
                f"num_transformer_submodules must be 1 (decoder-only / encoder models) or 2 "
                f"(encoder-decoder models), got {self.num_transformer_submodules!r}"
            )
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)

    @property
    def total_virtual_tokens(self) -> int:
        """Rows of the prompt table: one block of virtual tokens per transformer submodule."""
        return self.num_virtual_tokens * (self.num_transformer_submodules or 1)


class VirtualTokenEncoder(nn.Module):
    """Base of the three encoders: ``forward()`` returns the virtual-token table ``(1, rows, width)``.

    Subclasses set ``self.embedding`` and, when they reparameterise it, the extra modules named in
    ``head_names``. ``direct`` is True once the table is stored as-is (no head).
    """

    head_names: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self.direct = False
        self.embedding: nn.Embedding

    @property
    def reparameterized(self) -> bool:
        """True when parameters other than the output table exist (they are saved too)."""
        return not self.direct and any(hasattr(self, name) for name in self.head_names)

    def forward(self) -> torch.Tensor:
        """The virtual-token table, ``(1, rows, width)``; subclasses add their head."""
        return self.embedding.weight.unsqueeze(0)  # (1, N, width)

    @torch.no_grad()
    def output_table(self) -> torch.Tensor:
        """The table as saved in ``prompt_embeddings``: computed in eval mode (no dropout)."""
        was_training = self.training
        self.eval()
        try:
            return self.forward()[0].detach().float()  # (N, width)
        finally:
            self.train(was_training)

    def use_direct_table(self, table: torch.Tensor) -> None:
        """Drop the head and hold ``table`` (rows, width) as the trainable output rows."""
        for name in self.head_names:
            if hasattr(self, name):
                delattr(self, name)
        weight = self.embedding.weight
        embedding = nn.Embedding(
            table.shape[0], table.shape[1], device=weight.device, dtype=weight.dtype
        )
        with torch.no_grad():
            embedding.weight.copy_(table.to(weight.dtype))
        embedding.weight.requires_grad_(weight.requires_grad)
        self.embedding = embedding
        self.direct = True

    def expected_table_shape(self) -> tuple[int, int]:
        """Shape of ``prompt_embeddings`` for this encoder (rows, width)."""
        raise NotImplementedError
