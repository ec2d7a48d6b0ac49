"""The adapter-injecting wrapper shared by LoRA and AdaLoRA (HF PEFT's ``LoraModel``).

::

    PeftModel.base_model = InjectedAdapterModel
        .model = the transformers model, with target layers replaced by LoraLayer wrappers
                 and modules_to_save replaced by ModulesToSaveWrapper

It owns everything that walks the model: adding/removing named adapters, switching the active one,
disabling, merging and unloading. A method plugs in by subclassing and overriding
:meth:`create_layer` (and, for AdaLoRA, the state-dict hooks).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn

from .config import PeftConfig
from .inject import (
    BASE_ADAPTER,
    ModulesToSaveWrapper,
    find_targets,
    replace_module,
    wrap_modules_to_save,
)
from .methods.lora import LoraConfig, LoraLayer, create_lora_layer


class InjectedAdapterModel(nn.Module):
    """Holds ``.model`` and injects one set of adapter layers per adapter name."""

    prefix = "lora_"
    layer_cls: type[nn.Module] = LoraLayer
    # ModuleDict/ParameterDict names whose entries are keyed by adapter name and saved to disk.
    saved_dict_names: tuple[str, ...] = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")

    def __init__(self, model: nn.Module, config: PeftConfig, adapter_name: str) -> None:
        super().__init__()
        self.model = model
        self.peft_config: dict[str, PeftConfig] = {}
        self.active_adapter = adapter_name
        self.add_adapter(adapter_name, config)

    # --- construction ----------------------------------------------------------------------
    def create_layer(self, target: nn.Module, config: PeftConfig) -> nn.Module:
        """Wrap one target module (a method overrides this)."""
        return create_lora_layer(target, config)

    def add_adapter(self, adapter_name: str, config: LoraConfig) -> None:
        """Inject adapter ``adapter_name`` into every module ``config`` targets."""
        if adapter_name in self.peft_config:
            raise ValueError(
                f"an adapter named {adapter_name!r} already exists; pick another name or "
                f"delete_adapter({adapter_name!r}) first"
            )
        for name in find_targets(self.model, config):
            target = self.model.get_submodule(name)
            if isinstance(target, self.layer_cls):
                target.add_adapter(adapter_name, config, name)
                continue
            if isinstance(target, LoraLayer):
                raise ValueError(
                    f"{name} already carries a {type(target).__name__} adapter; one model holds "
                    f"adapters of one method family"
                )
            layer = self.create_layer(target, config)
            layer.add_adapter(adapter_name, config, name)
            replace_module(self.model, name, layer)
        if config.modules_to_save:
            wrap_modules_to_save(self.model, config.modules_to_save, adapter_name)
        self.peft_config[adapter_name] = config
        self.set_adapter(
            self.active_adapter if self.active_adapter in self.peft_config else adapter_name
        )

    # --- walking -----------------------------------------------------------------------------
    def adapter_layers(self) -> Iterator[tuple[str, LoraLayer]]:
        for name, module in self.model.named_modules():
            if isinstance(module, LoraLayer):
                yield name, module

    def save_wrappers(self) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
        for name, module in self.model.named_modules():
            if isinstance(module, ModulesToSaveWrapper):
                yield name, module

    # --- switching ---------------------------------------------------------------------------
    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the one that runs (and trains) in forward."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"no adapter named {adapter_name!r}; have {list(self.peft_config)}")
        self.active_adapter = adapter_name
        for _, layer in self.adapter_layers():
            layer.active_adapters = [adapter_name]
        for _, wrapper in self.save_wrappers():
            wrapper.set_adapter(adapter_name)
        self.mark_trainable()

    def mark_trainable(self) -> None:
        """Freeze everything except the active adapter's factors, copies and chosen biases."""
        config = self.peft_config[self.active_adapter]
        name = self.active_adapter
        for param in self.model.parameters():
            param.requires_grad_(False)
        for _, layer in self.adapter_layers():
            for dict_name in self.saved_dict_names:
                container = getattr(layer, dict_name, None)
                if container is not None and name in container:
                    container[name].requires_grad_(True)
            if config.bias == "lora_only":
                bias = getattr(layer.base_layer, "bias", None)
                if isinstance(bias, nn.Parameter):
                    bias.requires_grad_(True)
        for _, wrapper in self.save_wrappers():
            if name in wrapper.modules_to_save:
                wrapper.modules_to_save[name].requires_grad_(True)
        if config.bias == "all":
            for pname, param in self.model.named_parameters():
                if pname.endswith("bias") and "original_module" not in pname:
                    param.requires_grad_(True)
        if config.inference_mode:
            for param in self.model.parameters():
                param.requires_grad_(False)

    def set_disabled(self, disabled: bool) -> None:
        for _, layer in self.adapter_layers():
            layer.disable_adapters = disabled
        for _, wrapper in self.save_wrappers():
            wrapper.disable_adapters = disabled

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"no adapter named {adapter_name!r}; have {list(self.peft_config)}")
        for _, layer in self.adapter_layers():
            layer.delete_adapter(adapter_name)
        for _, wrapper in self.save_wrappers():
            wrapper.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]
        if self.active_adapter == adapter_name and self.peft_config:
            self.set_adapter(next(iter(self.peft_config)))

    # --- merging -----------------------------------------------------------------------------
    def merge_adapter(
        self, adapter_names: list[str] | None = None, safe_merge: bool = False
    ) -> None:
        for _, layer in self.adapter_layers():
            layer.merge(adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        for _, layer in self.adapter_layers():
            layer.unmerge()

    def unload_layers(
        self, merge: bool, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """Replace every wrapper by its base module (after merging when ``merge``)."""
        for name, layer in list(self.adapter_layers()):
            if merge:
                layer.merge(adapter_names, safe_merge=safe_merge)
            replace_module(self.model, name, layer.base_layer)
        for name, wrapper in list(self.save_wrappers()):
            replace_module(self.model, name, wrapper.active_module())
        return self.model

    def forward(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        with self.mixed_batch(adapter_names):
            return self.model(*args, **kwargs)

    @contextlib.contextmanager
    def mixed_batch(self, adapter_names: list[str] | None) -> Iterator[None]:
        """Within the block, row ``b`` of the batch runs adapter ``adapter_names[b]``
        (``"__base__"``: no adapter). ``None`` leaves the usual single active adapter."""
        if adapter_names is None:
            yield
            return
        unknown = sorted(set(adapter_names) - set(self.peft_config) - {BASE_ADAPTER})
        if unknown:
            raise ValueError(
                f"adapter_names mentions unknown adapters {unknown}; "
                f"have {list(self.peft_config)} (and {BASE_ADAPTER!r} for none)"
            )
        users = [m for _, m in self.adapter_layers()] + [m for _, m in self.save_wrappers()]
        for module in users:
            module.batch_adapters = list(adapter_names)
        try:
            yield
        finally:
            for module in users:
                module.batch_adapters = None

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    # --- state-dict hooks (AdaLoRA slices tensors to its rank pattern) ------------------------
    def state_dict_for_save(self, state: dict, adapter_name: str) -> dict:
        return state

    def state_dict_for_load(self, state: dict, adapter_name: str) -> dict:
        return state
