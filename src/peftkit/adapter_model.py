"""The one interface ``PeftModel`` talks to: an *adapter model* per method family.

::

    PeftModel ──every call──> .adapter_model   (methods.table.ADAPTER_MODELS[peft_type])
                                ├─ tuner.InjectedAdapterModel     LoRA
                                │    ├─ adalora.AdaLoraModel      AdaLoRA
                                │    ├─ loha.LoHaModel, lokr.LoKrModel (lycoris.LycorisModel)
                                │    └─ ia3.IA3Model              IA3
                                └─ prompt.PromptAdapterModel      prompt tuning, P-tuning, prefix tuning

    modules PeftModel registers (HF PEFT's layout; they name every in-memory and on-disk key):
        injected:  base_model     = the adapter model    base_model.model.<path>.lora_A.<name>.weight
        prompt:    base_model     = the transformers model         base_model.<path>.modules_to_save...
                   prompt_encoder = {name: encoder}                prompt_encoder.<name>.embedding.weight

``PeftModel`` keeps the user-facing parts (task heads, parameter counts, folders on disk) and
hands everything method-specific to its adapter model, without asking which family it is.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch
from torch import nn

from .config import PeftConfig

# PeftModel's attribute for the wrapped model: the first part of every adapter tensor's on-disk
# name (``base_model.model.x.lora_A.weight``, ``base_model.classifier.weight``), as in HF PEFT.
BASE_MODEL = "base_model"


class AdapterModel(Protocol):
    """Named adapters of one method family over one transformers model.

    Attributes:
        peft_config: ``{adapter name: config}``; PeftModel exposes this very dict.
        active_adapter: the adapter that runs (and trains) in ``forward``.
    """

    peft_config: dict[str, PeftConfig]
    active_adapter: str

    def peft_modules(self) -> dict[str, nn.Module]:
        """The modules PeftModel registers, by attribute name (they name the state-dict keys)."""

    def get_base_model(self) -> nn.Module:
        """The transformers model (with adapter layers still in place for injected methods)."""

    # adapters by name (unknown names raise ValueError listing the known ones)
    def add_adapter(self, adapter_name: str, config: PeftConfig) -> None: ...
    def set_adapter(self, adapter_name: str) -> None: ...
    def delete_adapter(self, adapter_name: str) -> None: ...

    def mark_trainable(self) -> None:
        """Freeze all but the active adapter's tensors (all of them in inference mode)."""

    def set_disabled(self, disabled: bool) -> None:
        """While True, ``forward``/``generate`` run the plain base model."""

    def mixed_batch(self, adapter_names: list[str] | None) -> AbstractContextManager[None]:
        """Within the block row ``b`` runs ``adapter_names[b]`` (or refuse with a ValueError)."""

    def check_training_step(self) -> None:
        """Called on every training-mode forward (AdaLoRA warns about skipped allocations)."""

    # running: both take ``adapter_names=`` (see mixed_batch)
    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...
    def generate(self, *args: Any, **kwargs: Any) -> Any: ...

    # merging (prompt methods raise ValueError: nothing to merge)
    def merge_adapter(
        self, adapter_names: list[str] | None = None, safe_merge: bool = False
    ) -> None: ...
    def unmerge_adapter(self) -> None: ...
    def merge_and_unload(
        self, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module: ...
    def unload(self) -> nn.Module: ...

    # one adapter's tensors under HF PEFT's on-disk names, both ways
    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]: ...
    def load_adapter_state_dict(self, state: dict[str, torch.Tensor], adapter_name: str) -> None:
        """Copy ``state`` in, refusing missing, unexpected or misshaped tensors."""
