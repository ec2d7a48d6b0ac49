"""Prompt tuning (Lester et al., 2021): learn N input embeddings and prepend them to every input.

::

    input_ids (B, T) -> word embeddings (B, T, D)
    prompt table (N, D) -> expand (B, N, D) ──cat──> (B, N + T, D) -> frozen model

The table starts as random vectors, as the embeddings of a text (``prompt_tuning_init="TEXT"``:
the text's token ids repeated or cut to N), or as the embeddings of N tokens sampled from the
vocabulary (``"SAMPLE_VOCAB"``). Only the table is trained: N x D parameters.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any

import torch
from torch import nn

from ..config import PeftType, register_config
from .prompt_base import PromptLearningConfig, VirtualTokenEncoder


class PromptTuningInit(str, enum.Enum):
    """How the prompt table starts (HF PEFT's values)."""

    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    RANDOM = "RANDOM"


@register_config
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


def text_init_ids(config: PromptTuningConfig, rows: int) -> list[int]:
    """Token ids of the init text, repeated or cut to exactly ``rows`` ids."""
    from transformers import AutoTokenizer

    kwargs = dict(config.tokenizer_kwargs or {})
    kwargs.pop("trust_remote_code", None)
    try:
        # peftkit's model names (bundled "smollm2-135m", a .gguf file) resolve to their folder
        from ..models import tokenizer_folder

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
    """The prompt table itself: ``embedding.weight`` is (N, D) and is the output."""

    def __init__(self, config: PromptTuningConfig, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        rows, dim = config.total_virtual_tokens, config.token_dim
        self.embedding = nn.Embedding(rows, dim)  # RANDOM: N(0, 1) rows, as PEFT
        if config.inference_mode:
            return  # the table is about to be loaded; no tokenizer needed
        init = config.prompt_tuning_init
        if init == PromptTuningInit.RANDOM:
            return
        if init == PromptTuningInit.SAMPLE_VOCAB:
            ids = torch.randint(0, word_embeddings.num_embeddings, (rows,))
        else:
            ids = torch.tensor(text_init_ids(config, rows))
        with torch.no_grad():
            rows_init = word_embeddings(ids.to(word_embeddings.weight.device))  # (N, D)
            self.embedding.weight.copy_(rows_init.float())

    def expected_table_shape(self) -> tuple[int, int]:
        return tuple(self.embedding.weight.shape)
