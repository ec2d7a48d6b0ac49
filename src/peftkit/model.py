"""``PeftModel``: a transformers model plus named adapters, with PEFT's API.

::

    get_peft_model(model, config) ──> PeftModelFor<Task>
        .peft_config   {name: config}
        .base_model    InjectedAdapterModel (LoRA, AdaLoRA)      or the model itself (prompt methods)
        .prompt_encoder {name: encoder}                           (prompt methods only)

The task wrappers differ only in what they add to ``modules_to_save`` (the classification head)
and, for prompt-learning methods, in how virtual tokens enter the forward pass
(see :mod:`peftkit.methods.prompting`).
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from . import checkpoint
from .config import PeftConfig, TaskType, read_config


def _tuner_class(config: PeftConfig) -> type:
    from .methods import TUNERS

    try:
        return TUNERS[config.peft_type]
    except KeyError:
        raise ValueError(f"{config.peft_type.value} is not an injected-adapter method") from None


class PeftModel(nn.Module):
    """A base model with one or more named adapters of one method."""

    # Heads that a task trains in full; added to modules_to_save (PEFT does the same).
    task_heads: tuple[str, ...] = ()

    def __init__(
        self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default"
    ) -> None:
        super().__init__()
        self.peft_config: dict[str, PeftConfig] = {}
        self.active_adapter = adapter_name
        self._prompt_learning = peft_config.is_prompt_learning
        self._fill_config(model, peft_config)
        if self._prompt_learning:
            from .methods import prompting

            self.base_model = model
            self.prompt_encoder = nn.ModuleDict()
            self.peft_config[adapter_name] = peft_config
            prompting.attach(self, adapter_name, peft_config)
        else:
            self.base_model = _tuner_class(peft_config)(model, peft_config, adapter_name)
            self.peft_config = self.base_model.peft_config  # one dict, shared
        self._warn_on_train_without_hooks = True

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
    def active_peft_config(self) -> PeftConfig:
        return self.peft_config[self.active_adapter]

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter]

    # --- adapters by name ----------------------------------------------------------------
    def add_adapter(self, adapter_name: str, peft_config: PeftConfig) -> None:
        """Add another adapter (same method family); it becomes trainable only after set_adapter."""
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
        self._fill_config(
            self.base_model if self._prompt_learning else self.base_model.model, peft_config
        )
        if self._prompt_learning:
            from .methods import prompting

            self.peft_config[adapter_name] = peft_config
            prompting.attach(self, adapter_name, peft_config)
        else:
            self.base_model.add_adapter(adapter_name, peft_config)

    def set_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"no adapter named {adapter_name!r}; have {list(self.peft_config)}")
        self.active_adapter = adapter_name
        if self._prompt_learning:
            from .methods import prompting

            prompting.set_active(self, adapter_name)
        else:
            self.base_model.set_adapter(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"no adapter named {adapter_name!r}; have {list(self.peft_config)}")
        if self._prompt_learning:
            from .methods import prompting

            prompting.detach(self, adapter_name)
            del self.peft_config[adapter_name]
            if self.active_adapter == adapter_name and self.peft_config:
                self.set_adapter(next(iter(self.peft_config)))
        else:
            self.base_model.delete_adapter(adapter_name)
            self.active_adapter = self.base_model.active_adapter

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the plain base model inside the ``with`` block (merged adapters are unmerged)."""
        if self._prompt_learning:
            self._adapters_disabled = True
            try:
                yield
            finally:
                self._adapters_disabled = False
            return
        self.base_model.set_disabled(True)
        try:
            yield
        finally:
            self.base_model.set_disabled(False)

    # --- merging -------------------------------------------------------------------------
    def _require_injected(self, what: str) -> None:
        if self._prompt_learning:
            raise ValueError(
                f"{what} applies to LoRA-style adapters; prompt methods have no weights to merge"
            )

    def merge_adapter(
        self, adapter_names: list[str] | None = None, safe_merge: bool = False
    ) -> None:
        self._require_injected("merge_adapter")
        self.base_model.merge_adapter(adapter_names, safe_merge)

    def unmerge_adapter(self) -> None:
        self._require_injected("unmerge_adapter")
        self.base_model.unmerge_adapter()

    def merge_and_unload(
        self,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> nn.Module:
        """Fold the adapter into the weights and return the plain transformers model."""
        self._require_injected("merge_and_unload")
        return self.base_model.unload_layers(
            merge=True, safe_merge=safe_merge, adapter_names=adapter_names
        )

    def unload(self) -> nn.Module:
        """Remove the adapter layers without merging and return the plain model."""
        self._require_injected("unload")
        return self.base_model.unload_layers(merge=False)

    # --- parameters ----------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts; packed 4-bit weights count as their element count."""
        trainable = total = 0
        for param in self.parameters():
            n = param.numel()
            total += n
            if param.requires_grad:
                trainable += n
        for module in self.modules():
            counter = getattr(module, "quantized_param_count", None)
            if callable(counter):
                total += counter()
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} "
            f"|| trainable%: {100 * trainable / total:.4f}"
        )

    # --- forward -------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._prompt_learning:
            from .methods import prompting

            return prompting.forward(self, *args, **kwargs)
        self._check_training_hooks()
        return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        if self._prompt_learning:
            from .methods import prompting

            return prompting.generate(self, *args, **kwargs)
        with self.base_model.mixed_batch(kwargs.pop("adapter_names", None)):
            return self.base_model.model.generate(*args, **kwargs)

    def _check_training_hooks(self) -> None:
        """Let a method check per-step duties (AdaLoRA: was update_and_allocate called?)."""
        check = getattr(self.base_model, "check_training_step", None)
        if check is not None and self.training:
            check()

    def get_base_model(self) -> nn.Module:
        return self.base_model if self._prompt_learning else self.base_model.model

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "prompt_encoder"):
                raise
            return getattr(self.base_model, name)

    # --- saving and loading ----------------------------------------------------------------
    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """The adapter's tensors under HF PEFT's on-disk names."""
        name = adapter_name or self.active_adapter
        if self._prompt_learning:
            from .methods import prompting

            return prompting.state_dict_to_save(self, name)
        return _injected_state_dict(self, name)

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
        if not self._prompt_learning:
            self.base_model.mark_trainable()

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor], adapter_name: str) -> None:
        if self._prompt_learning:
            from .methods import prompting

            prompting.load_state_dict(self, adapter_name, state)
        else:
            _load_injected_state_dict(self, adapter_name, state)

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


def _injected_state_dict(peft_model: PeftModel, adapter_name: str) -> dict[str, torch.Tensor]:
    tuner = peft_model.base_model
    config = peft_model.peft_config[adapter_name]
    out: dict[str, torch.Tensor] = {}
    for key, tensor in peft_model.state_dict(keep_vars=False).items():
        disk = checkpoint.saved_key(key, adapter_name, tuner.saved_dict_names)
        if disk is not None:
            out[disk] = tensor
    out.update(_bias_state(peft_model, config))
    return tuner.state_dict_for_save(out, adapter_name)


def _bias_state(peft_model: PeftModel, config: PeftConfig) -> dict[str, torch.Tensor]:
    """Trained biases (``bias="all"`` / ``"lora_only"``) under their in-memory names, as PEFT saves."""
    bias = getattr(config, "bias", "none")
    if bias == "none":
        return {}
    out = {}
    for key, tensor in peft_model.state_dict().items():
        if not key.endswith("bias") or "original_module" in key or "modules_to_save" in key:
            continue
        if bias == "all" or ".base_layer." in key:
            out[key] = tensor
    return out


def _load_injected_state_dict(
    peft_model: PeftModel, adapter_name: str, state: dict[str, torch.Tensor]
) -> None:
    """Copy saved tensors into adapter ``adapter_name``, refusing missing/unexpected/misshaped keys."""
    tuner = peft_model.base_model
    state = tuner.state_dict_for_load(dict(state), adapter_name)
    own = peft_model.state_dict()
    expected: dict[str, str] = {}
    for key in own:
        disk = checkpoint.saved_key(key, adapter_name, tuner.saved_dict_names)
        if disk is not None:
            expected[disk] = key
    for key in _bias_state(peft_model, peft_model.peft_config[adapter_name]):
        expected[key] = key
    unexpected = [k for k in state if k not in expected and "original_module" not in k]
    missing = [k for k in expected if k not in state and not k.endswith("bias")]
    if unexpected or missing:
        parts = []
        if missing:
            parts.append(f"missing keys: {checkpoint.describe_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {checkpoint.describe_keys(unexpected)}")
        raise ValueError(
            "adapter does not fit this base model (" + "; ".join(parts) + "). Check that the "
            "adapter was trained on this architecture (base_model_name_or_path="
            f"{peft_model.peft_config[adapter_name].base_model_name_or_path!r}) and that "
            "target_modules are the same."
        )
    with torch.no_grad():
        params = dict(peft_model.named_parameters())
        params.update(dict(peft_model.named_buffers()))
        for disk, key in expected.items():
            if disk not in state:
                continue
            target, value = params[key], state[disk]
            if target.shape != value.shape:
                raise ValueError(
                    f"adapter tensor {disk} has shape {tuple(value.shape)} but the model expects "
                    f"{tuple(target.shape)}: the adapter was made for a different base model or rank"
                )
            target.copy_(value.to(target.dtype))


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
    from .methods.lora import LoraLayer  # lazily: the methods import this module

    if any(isinstance(m, LoraLayer) for m in model.modules()):  # AdaLoRA's SVD layers too
        raise ValueError(
            "model already holds LoRA/AdaLoRA layers: merge_and_unload() it first, or add a "
            "second adapter with model.add_adapter(name, config)"
        )
    cls = MODEL_TYPE_TO_PEFT_MODEL.get(peft_config.task_type, PeftModel)
    return cls(model, peft_config, adapter_name)
