"""The three encoders: each turns its parameters into the table of virtual tokens.

::

    PromptEmbedding (prompt tuning, Lester et al. 2021)
        embedding (N, D) ───────────────────────────────────────────────────> (1, N, D)
    PromptEncoder (P-tuning, Liu et al. 2021)
        embedding (N, D) ─ Linear(D, h) -> ReLU -> Linear(h, h) -> ReLU -> Linear(h, D) ─> (1, N, D)
        embedding (N, D) ─ LSTM(D, h, layers, bidir.) -> Linear(2h, 2h) -> ReLU
                           -> Linear(2h, D) ─────────────────────────────────> (1, N, D)
    PrefixEncoder (prefix tuning, Li & Liang 2021)
        embedding (P, L*2*D) ───────────────────────────────────────────────> (1, P, L*2*D)
        embedding (P, D) ─ Linear(D, h) -> Tanh -> Linear(h, L*2*D) ─────────> (1, P, L*2*D)

``N = num_virtual_tokens * num_transformer_submodules``; the (1, N, D) tables are prepended to
the input embeddings (:mod:`.forward`), the (1, P, L*2*D) table becomes a key/value cache
(:mod:`.prefix_cache`). HF PEFT saves only the *output* table (``prompt_embeddings``). An encoder
rebuilt from that table alone, without its reparameterising network (P-tuning's head, prefix
tuning's projection), runs in *direct* mode: ``embedding`` holds the output rows and ``forward``
returns them unchanged. That is also how PEFT builds these encoders for inference.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from ...config import PeftType
from ...partitioned import gathered
from .config import (
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptEncoderReparameterizationType,
    PromptLearningConfig,
    PromptTuningConfig,
    PromptTuningInit,
)
from .support import word_embeddings


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
        return tuple(self.embedding.weight.shape)


# --- prompt tuning -----------------------------------------------------------------------------
def text_init_ids(config: PromptTuningConfig, rows: int) -> list[int]:
    """Token ids of the init text, repeated or cut to exactly ``rows`` ids."""
    from transformers import AutoTokenizer

    kwargs = dict(config.tokenizer_kwargs or {})
    kwargs.pop("trust_remote_code", None)
    try:
        # peftkit's model names (bundled "smollm2-135m", a .gguf file) resolve to their folder
        from ...model_sources import tokenizer_folder

        folder = tokenizer_folder(config.tokenizer_name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    except Exception as exc:  # hub errors, missing files, bad folders come in many types
        raise ValueError(
            f"prompt_tuning_init='TEXT' could not load the tokenizer "
            f"{config.tokenizer_name_or_path!r} ({exc}); pass a local tokenizer folder, or use "
            f"prompt_tuning_init='RANDOM' / 'SAMPLE_VOCAB'"
        ) from exc
    ids = list(tokenizer(config.prompt_tuning_init_text)["input_ids"])
    if not ids:
        raise ValueError("prompt_tuning_init_text tokenizes to no tokens; give a non-empty text")
    ids = ids * math.ceil(rows / len(ids))
    return ids[:rows]


class PromptEmbedding(VirtualTokenEncoder):
    """The prompt table itself: ``embedding.weight`` is (N, D) and is the output.

    It starts as random N(0, 1) rows (as PEFT), as the embeddings of a text (``TEXT``: the text's
    token ids repeated or cut to N) or of N tokens sampled from the vocabulary (``SAMPLE_VOCAB``).
    """

    def __init__(self, config: PromptTuningConfig, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        rows, dim = config.total_virtual_tokens, config.token_dim
        self.embedding = nn.Embedding(rows, dim)
        if config.inference_mode:
            return  # the table is about to be loaded; no tokenizer needed
        init = config.prompt_tuning_init
        if init == PromptTuningInit.RANDOM:
            return
        if init == PromptTuningInit.SAMPLE_VOCAB:
            ids = torch.randint(0, word_embeddings.num_embeddings, (rows,))
        else:
            ids = torch.tensor(text_init_ids(config, rows))
        # under ZeRO-3 the table is an empty partition: read it gathered (peft #206, #1633)
        with torch.no_grad(), gathered([word_embeddings.weight]):
            rows_init = word_embeddings(ids.to(word_embeddings.weight.device))  # (N, D)
            self.embedding.weight.copy_(rows_init.float())


# --- P-tuning ----------------------------------------------------------------------------------
class PromptEncoder(VirtualTokenEncoder):
    """Embedding plus MLP head, or embedding plus LSTM and MLP head (PEFT's module names).

    The network only helps optimisation; after training the output table alone defines the
    adapter (what HF PEFT saves). peftkit saves the network too, so training can resume.
    """

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


# --- prefix tuning -----------------------------------------------------------------------------
class PrefixEncoder(VirtualTokenEncoder):
    """The flat prefix table, optionally produced by an MLP (PEFT's module names).

    ``D = token_dim = num_key_value_heads * head_dim``, ``L = num_layers``: each query also attends
    to P extra positions whose keys and values are trained directly.
    """

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


def build_encoder(model: nn.Module, config: PromptLearningConfig) -> VirtualTokenEncoder:
    """The encoder for ``config``'s method, for the (already checked) base ``model``."""
    if config.peft_type == PeftType.PROMPT_TUNING:
        return PromptEmbedding(config, word_embeddings(model))
    if config.peft_type == PeftType.P_TUNING:
        return PromptEncoder(config)
    if config.peft_type == PeftType.PREFIX_TUNING:
        return PrefixEncoder(config)
    raise ValueError(f"{config.peft_type.value} is not a prompt-learning method")
