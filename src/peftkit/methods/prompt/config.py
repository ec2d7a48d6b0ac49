"""The prompt-learning configs: shared fields, then one dataclass per method (HF PEFT's names).

::

    PeftConfig
      └─ PromptLearningConfig   num_virtual_tokens, token_dim, layers, heads, modules_to_save
           ├─ PromptTuningConfig    (PROMPT_TUNING)  how the table starts: RANDOM | TEXT | SAMPLE_VOCAB
           ├─ PromptEncoderConfig   (P_TUNING)       MLP | LSTM encoder, hidden size, layers, dropout
           └─ PrefixTuningConfig    (PREFIX_TUNING)  optional projection MLP, zero init

The model-shape fields (``token_dim``, ``num_layers``, ``num_attention_heads``,
``num_transformer_submodules``) are filled from the base model at ``get_peft_model``
(:func:`peftkit.methods.prompt.support.fill_config`) when left ``None``, and checked when given.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, ClassVar

from ...config import Adapts, ModelFamily, PeftConfig, PeftType


@dataclasses.dataclass
class PromptLearningConfig(PeftConfig):
    """Fields shared by prompt tuning, P-tuning and prefix tuning (HF PEFT's names).

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
    adapts: ClassVar[Adapts] = Adapts.INPUT_EMBEDDINGS
    model_families: ClassVar[frozenset[ModelFamily]] = frozenset({ModelFamily.TEXT})

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


# --- prompt tuning -----------------------------------------------------------------------------
class PromptTuningInit(str, enum.Enum):
    """How the prompt table starts (HF PEFT's values)."""

    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    RANDOM = "RANDOM"


@dataclasses.dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning: ``num_virtual_tokens`` trainable input embeddings.

    Attributes:
        prompt_tuning_init: ``RANDOM`` (N(0, 1) rows), ``TEXT`` (embeddings of
            ``prompt_tuning_init_text``) or ``SAMPLE_VOCAB`` (embeddings of random vocabulary tokens).
        prompt_tuning_init_text: the text for ``TEXT`` initialisation.
        tokenizer_name_or_path: tokenizer that turns the text into ids (``TEXT`` only).
        tokenizer_kwargs: extra ``AutoTokenizer.from_pretrained`` arguments (``TEXT`` only;
            ``trust_remote_code`` is always dropped: loading an adapter must not run code).
    """

    peft_type = PeftType.PROMPT_TUNING

    prompt_tuning_init: PromptTuningInit | str = PromptTuningInit.RANDOM
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            self.prompt_tuning_init = PromptTuningInit(self.prompt_tuning_init)
        except ValueError:
            valid = ", ".join(i.value for i in PromptTuningInit)
            raise ValueError(
                f"unknown prompt_tuning_init {self.prompt_tuning_init!r}; use one of: {valid}"
            ) from None
        if self.prompt_tuning_init == PromptTuningInit.TEXT:
            if not self.tokenizer_name_or_path:
                raise ValueError(
                    "prompt_tuning_init='TEXT' needs tokenizer_name_or_path (the tokenizer that "
                    "turns prompt_tuning_init_text into token ids)"
                )
            if self.prompt_tuning_init_text is None:
                raise ValueError(
                    "prompt_tuning_init='TEXT' needs prompt_tuning_init_text (the text whose "
                    "embeddings start the prompt)"
                )
        elif self.tokenizer_kwargs:
            raise ValueError(
                "tokenizer_kwargs only apply to prompt_tuning_init='TEXT'; remove them or set "
                "prompt_tuning_init='TEXT'"
            )


# --- P-tuning ----------------------------------------------------------------------------------
class PromptEncoderReparameterizationType(str, enum.Enum):
    """Which network produces the virtual tokens."""

    MLP = "MLP"
    LSTM = "LSTM"


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


# --- prefix tuning -----------------------------------------------------------------------------
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
    adapts = Adapts.KV_PREFIX

    encoder_hidden_size: int | None = None
    prefix_projection: bool = False
    init_weights: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"init_weights must be None or 'zero', got {self.init_weights!r}")
