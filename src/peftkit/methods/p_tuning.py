"""P-tuning (Liu et al., 2021): virtual-token embeddings produced by a small trainable network.

::

    embedding (N, D) ─MLP──────────────────────────────────────────────> (N, D)
                     Linear(D, h) -> ReLU -> Linear(h, h) -> ReLU -> Linear(h, D)

    embedding (N, D) ─LSTM──────────────────────────────────────────────> (N, D)
                     LSTM(D, h, layers, bidirectional) -> Linear(2h, 2h) -> ReLU -> Linear(2h, D)

The output rows are prepended to the input embeddings exactly as in prompt tuning. The network
only helps optimisation; after training, the output table alone defines the adapter, which is
what HF PEFT saves. peftkit saves the network too, so training can resume.
"""

from __future__ import annotations

import dataclasses
import enum
import warnings

import torch
from torch import nn

from ..config import PeftType, register_config
from .prompt_base import PromptLearningConfig, VirtualTokenEncoder


class PromptEncoderReparameterizationType(str, enum.Enum):
    """Which network produces the virtual tokens."""

    MLP = "MLP"
    LSTM = "LSTM"


@register_config
@dataclasses.dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning: an MLP or LSTM+MLP encoder over ``num_virtual_tokens`` embeddings.

    Attributes:
        encoder_reparameterization_type: ``MLP`` (three linear layers) or ``LSTM``.
        encoder_hidden_size: hidden width ``h`` of the encoder (default: ``token_dim``).
        encoder_num_layers: LSTM layers (the MLP always has three linear layers, as in PEFT).
        encoder_dropout: dropout between LSTM layers.
    """

    peft_type = PeftType.P_TUNING

    encoder_reparameterization_type: PromptEncoderReparameterizationType | str = (
        PromptEncoderReparameterizationType.MLP
    )
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            self.encoder_reparameterization_type = PromptEncoderReparameterizationType(
                self.encoder_reparameterization_type
            )
        except ValueError:
            raise ValueError(
                f"unknown encoder_reparameterization_type "
                f"{self.encoder_reparameterization_type!r}; use 'MLP' (recommended) or 'LSTM'"
            ) from None
        if self.encoder_num_layers < 1:
            raise ValueError(f"encoder_num_layers must be >= 1, got {self.encoder_num_layers}")
        if not 0.0 <= self.encoder_dropout < 1.0:
            raise ValueError(f"encoder_dropout must be in [0, 1), got {self.encoder_dropout}")


class PromptEncoder(VirtualTokenEncoder):
    """Embedding plus MLP head, or embedding plus LSTM and MLP head (PEFT's module names)."""

    head_names = ("lstm_head", "mlp_head")

    def __init__(self, config: PromptEncoderConfig) -> None:
        super().__init__()
        rows, dim, hidden = (
            config.total_virtual_tokens,
            config.token_dim,
            config.encoder_hidden_size,
        )
        self.encoder_type = config.encoder_reparameterization_type
        self.embedding = nn.Embedding(rows, dim)
        if config.inference_mode:
            self.direct = True  # PEFT's inference layout: the embedding holds the output table
            return
        if self.encoder_type == PromptEncoderReparameterizationType.LSTM:
            self.lstm_head = nn.LSTM(
                input_size=dim,
                hidden_size=hidden,
                num_layers=config.encoder_num_layers,
                dropout=config.encoder_dropout,
                bidirectional=True,
                batch_first=True,
            )
            self.mlp_head = nn.Sequential(
                nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim)
            )
        else:
            if config.encoder_num_layers != 2:
                warnings.warn(
                    f"encoder_num_layers={config.encoder_num_layers} is ignored for the MLP "
                    f"encoder: it always has 3 linear layers (as in PEFT)",
                    stacklevel=3,
                )
            self.mlp_head = nn.Sequential(
                nn.Linear(dim, hidden),
                nn.ReLU(),
                nn.Linear(hidden, hidden),
                nn.ReLU(),
                nn.Linear(hidden, dim),
            )

    def forward(self) -> torch.Tensor:
        x = self.embedding.weight.unsqueeze(0)  # (1, N, D)
        if self.direct:
            return x
        if self.encoder_type == PromptEncoderReparameterizationType.LSTM:
            x = self.lstm_head(x)[0]  # (1, N, 2h)
        return self.mlp_head(x)  # (1, N, D)

    def expected_table_shape(self) -> tuple[int, int]:
        return tuple(self.embedding.weight.shape)
