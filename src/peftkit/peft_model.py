"""``PeftModel``: a transformers model plus named adapters, with PEFT's API.

::

    get_peft_model(model, config) ──> PeftModelFor<Task>
        .adapter_model   methods.table.ADAPTER_MODELS[config.peft_type]: every adapter operation,
                         forward, generate and the adapter's tensors go here (adapter_model.py)
        .base_model      injected methods: the adapter model itself (InjectedAdapterModel)
                         prompt methods:   the transformers model, and .prompt_encoder {name: encoder}
        .peft_config     {name: config}  (the adapter model's dict)

PeftModel itself adds only what is the same for every method: the task heads trained in full
(``modules_to_save``), parameter counts and the adapter folders (save_pretrained/from_pretrained).
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from . import checkpoint, head_input, partitioned
from .adapter_model import AdapterModel
from .config import PeftConfig, TaskType, read_config
from .methods.adapter_layer import AdapterLayer
from .methods.table import ADAPTER_MODELS


class PeftModel(nn.Module):
    """A base model with one or more named adapters of one method."""

    # Heads that a task trains in full; added to modules_to_save (PEFT does the same).
    task_heads: tuple[str, ...] = ()
    adapter_model: AdapterModel

    def __init__(
        self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default"
    ) -> None:
        super().__init__()
        self._fill_config(model, peft_config)
        adapter_model = ADAPTER_MODELS[peft_config.peft_type](model, peft_config, adapter_name)
        for name, module in adapter_model.peft_modules().items():
            self.add_module(name, module)
        # Kept out of nn.Module's registry: its modules are registered just above, under PEFT's
        # names (registering it too would list every tensor twice in state_dict()).
        self.__dict__["adapter_model"] = adapter_model
        head_input.install(model)  # batched prefill: a 10x slower head product otherwise

    # --- config --------------------------------------------------------------------------
    def _fill_config(self, model: nn.Module, config: PeftConfig) -> None:
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = (
                getattr(getattr(model, "config", None), "_name_or_path", None) or None
            )
        if self.task_heads:  # prompt methods train the head too, as in PEFT
            present = [
                h
                for h in self.task_heads
                if any(n == h or n.endswith("." + h) for n, _ in model.named_modules())
            ]
            if present:
                extra = list(config.modules_to_save or [])
                config.modules_to_save = extra + [h for h in self.task_heads if h not in extra]

    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        return self.adapter_model.peft_config

    @property
    def active_adapter(self) -> str:
        return self.adapter_model.active_adapter

    @property
    def active_peft_config(self) -> PeftConfig:
        return self.peft_config[self.active_adapter]

    @property
    def active_adapters(self) -> list[str]:
        """Every active adapter (several after ``set_adapter([...])``; injected methods)."""
        return list(getattr(self.adapter_model, "active_adapters", [self.active_adapter]))

    # --- adapters by name ----------------------------------------------------------------
    def add_adapter(self, adapter_name: str, peft_config: PeftConfig) -> None:
        """Add another adapter (same method); it becomes trainable only after set_adapter."""
        if adapter_name in self.peft_config:
            raise ValueError(
                f"an adapter named {adapter_name!r} already exists; pick another name or "
                f"delete_adapter({adapter_name!r}) first"
            )
        if peft_config.peft_type != self.active_peft_config.peft_type:
            raise ValueError(
                f"cannot add a {peft_config.peft_type.value} adapter to a model holding "
                f"{self.active_peft_config.peft_type.value} adapters"
            )
        self._fill_config(self.get_base_model(), peft_config)
        self.adapter_model.add_adapter(adapter_name, peft_config)

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Activate one adapter, or (LoRA/AdaLoRA) several: their updates add up in forward."""
        if not isinstance(adapter_name, str) and not hasattr(self.adapter_model, "active_adapters"):
            if len(adapter_name) != 1:
                raise ValueError(
                    f"{self.active_peft_config.peft_type.value} runs one adapter at a time; "
                    f"set_adapter([...]) with several names is for LoRA-family adapters"
                )
            adapter_name = adapter_name[0]
        self.adapter_model.set_adapter(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        self.adapter_model.delete_adapter(adapter_name)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the plain base model inside the ``with`` block (merged adapters are unmerged)."""
        self.adapter_model.set_disabled(True)
        try:
            yield
        finally:
            self.adapter_model.set_disabled(False)

    def add_weighted_adapter(
        self, adapters: list[str], weights: list[float], adapter_name: str, **kwargs: Any
    ) -> None:
        """A new adapter combined from existing ones (PEFT's adapter arithmetic: LoRA with
        ``combination_type`` and its options, IA3 as a weighted sum of vectors)."""
        combine = getattr(self.adapter_model, "add_weighted_adapter", None)
        if combine is None:
            method = self.active_peft_config.peft_type.value
            raise ValueError(
                f"add_weighted_adapter combines LoRA and IA3 adapters; {method} adapters have "
                f"no weight arithmetic (nor in PEFT)"
            )
        combine(adapters, weights, adapter_name, **kwargs)

    # --- merging -------------------------------------------------------------------------
    def merge_adapter(
        self, adapter_names: list[str] | None = None, safe_merge: bool = False
    ) -> None:
        self.adapter_model.merge_adapter(adapter_names, safe_merge)

    def unmerge_adapter(self) -> None:
        self.adapter_model.unmerge_adapter()

    def merge_and_unload(
        self,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> nn.Module:
        """Fold the adapter into the weights and return the plain transformers model."""
        return self.adapter_model.merge_and_unload(safe_merge, adapter_names)

    def unload(self) -> nn.Module:
        """Remove the adapter layers without merging and return the plain model."""
        return self.adapter_model.unload()

    # --- parameters ----------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts; packed 4-bit weights count as their element count,
        ZeRO-3 partitioned ones and vocabulary-parallel slices as their whole size."""
        trainable = total = 0
        for param in self.parameters():
            n = partitioned.numel(param)
            total += n
            if param.requires_grad:
                trainable += n
        for module in self.modules():
            # weights a module keeps outside its parameters: packed 4-bit bytes, the whole
            # matrix a vocabulary-parallel layer holds a slice of. Looked up on the class: a
            # LoRA layer forwards unknown attributes to its base layer, and would count the
            # 4-bit weight a second time
            for hook in ("quantized_param_count", "represented_param_count"):
                counter = getattr(type(module), hook, None)
                if callable(counter):
                    total += counter(module)
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} "
            f"|| trainable%: {100 * trainable / total:.4f}"
        )

    # --- forward -------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.training:
            self.adapter_model.check_training_step()
        return self.adapter_model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.adapter_model.generate(*args, **kwargs)

    def get_base_model(self) -> nn.Module:
        return self.adapter_model.get_base_model()

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "prompt_encoder", "adapter_model"):
                raise
            return getattr(self.base_model, name)

    # --- saving and loading ----------------------------------------------------------------
    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """The adapter's tensors under HF PEFT's on-disk names."""
        return self.adapter_model.adapter_state_dict(adapter_name or self.active_adapter)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        selected_adapters: list[str] | None = None,
        **_: Any,
    ) -> None:
        """Write each adapter as ``adapter_config.json`` + ``adapter_model.safetensors`` + README.

        "default" goes in ``save_directory``, any other adapter in ``save_directory/<name>``.
        """
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise ValueError(f"{save_directory!r} is a file; save_pretrained needs a folder")
        for name in selected_adapters or list(self.peft_config):
            folder = save_directory if name == "default" else os.path.join(save_directory, name)
            os.makedirs(folder, exist_ok=True)
            config = copy.deepcopy(self.peft_config[name])
            config.inference_mode = True
            tensors = self.adapter_state_dict(name)
            checkpoint.save_tensors(os.path.join(folder, checkpoint.WEIGHTS_NAME), tensors)
            config.save_pretrained(folder)
            trainable = sum(t.numel() for t in tensors.values())
            card = checkpoint.MODEL_CARD.format(
                base=config.base_model_name_or_path or "unknown",
                method=config.peft_type.value,
                task=config.task_type.value if config.task_type else "none",
                trainable=trainable,
            )
            readme = os.path.join(folder, "README.md")
            if not os.path.exists(readme):
                checkpoint.atomic_write_text(readme, card)

    def load_adapter(
        self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False
    ) -> None:
        """Load a saved adapter (ours or HF PEFT's) under ``adapter_name``."""
        config = read_config(model_id)
        config.inference_mode = not is_trainable
        self.add_adapter(adapter_name, config)
        state = checkpoint.load_adapter_tensors(os.fspath(model_id))
        self.load_adapter_state_dict(state, adapter_name)
        self.adapter_model.mark_trainable()

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor], adapter_name: str) -> None:
        self.adapter_model.load_adapter_state_dict(state, adapter_name)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        **_: Any,
    ) -> PeftModel:
        """Wrap ``model`` with the adapter saved in ``model_id`` (a folder)."""
        model_id = os.fspath(model_id)
        config = config or read_config(model_id)
        config.inference_mode = not is_trainable
        wrapper = (
            MODEL_TYPE_TO_PEFT_MODEL.get(config.task_type, PeftModel) if cls is PeftModel else cls
        )
        peft_model = wrapper(model, config, adapter_name)
        state = checkpoint.load_adapter_tensors(model_id)
        peft_model.load_adapter_state_dict(state, adapter_name)
        if not is_trainable:
            for param in peft_model.parameters():
                param.requires_grad_(False)
            peft_model.eval()
        return peft_model


class PeftModelForCausalLM(PeftModel):
    pass


class PeftModelForSeq2SeqLM(PeftModel):
    pass


class PeftModelForSequenceClassification(PeftModel):
    task_heads = ("classifier", "score")


class PeftModelForTokenClassification(PeftModel):
    task_heads = ("classifier", "score")


class PeftModelForQuestionAnswering(PeftModel):
    task_heads = ("qa_outputs",)


class PeftModelForFeatureExtraction(PeftModel):
    pass


MODEL_TYPE_TO_PEFT_MODEL: dict[TaskType | None, type[PeftModel]] = {
    TaskType.CAUSAL_LM: PeftModelForCausalLM,
    TaskType.SEQ_2_SEQ_LM: PeftModelForSeq2SeqLM,
    TaskType.SEQ_CLS: PeftModelForSequenceClassification,
    TaskType.TOKEN_CLS: PeftModelForTokenClassification,
    TaskType.QUESTION_ANS: PeftModelForQuestionAnswering,
    TaskType.FEATURE_EXTRACTION: PeftModelForFeatureExtraction,
    None: PeftModel,
}


def get_peft_model(
    model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", **_: Any
) -> PeftModel:
    """Wrap ``model`` with a fresh adapter; only the adapter (and saved modules) stay trainable."""
    if isinstance(model, PeftModel):
        raise ValueError("model is already a PeftModel: use model.add_adapter(name, config)")
    if any(isinstance(m, AdapterLayer) for m in model.modules()):  # any injected method's
        raise ValueError(
            "model already holds adapter layers (LoRA, AdaLoRA, LoHa, LoKr or IA3): "
            "merge_and_unload() it first, or add a second adapter with "
            "model.add_adapter(name, config)"
        )
    cls = MODEL_TYPE_TO_PEFT_MODEL.get(peft_config.task_type, PeftModel)
    return cls(model, peft_config, adapter_name)
