"""Find the modules an adapter targets and swap in wrappers.

Matching follows HF PEFT so a config means the same thing in both libraries:

* ``target_modules`` as a list: a module matches when its path equals an entry or ends with
  ``"." + entry``; as a string: a regex that must match the whole path; ``"all-linear"``: every
  linear layer except the output head.
* ``exclude_modules``: same rules, applied after the targets.
* ``layers_to_transform``: keep only modules inside the listed layer indices, the index read from
  ``<layers_pattern>.<i>.`` in the path.

``modules_to_save`` modules are wrapped in :class:`ModulesToSaveWrapper`, which trains a copy per
adapter and leaves the original in place for ``disable_adapter()``.

Mixed-adapter batches (row ``b`` runs adapter ``adapter_names[b]``) are checked by
:func:`check_mixed_batch` in every module that reads ``batch_adapters``.

Embedding weights travel with the adapter as in PEFT 0.21 (``save_embedding_layers="auto"``):
when ``target_modules`` names ``embed_tokens``/``lm_head`` the adapted input/output embeddings'
base weights are saved too (``<path>.base_layer.weight``); when the vocabulary was resized (the
base model's ``config.json`` at ``base_model_name_or_path`` has another ``vocab_size``) the whole
input and output embeddings are (``<path>.weight``). :func:`load_embedding_weights` reads both.
"""

from __future__ import annotations

import copy
import os
import re
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .methods.adapter_layer import AdapterLayer
from .partitioned import gathered
from .quant.linear4bit import QuantizedLinear

ALL_LINEAR = "all-linear"
BASE_ADAPTER = "__base__"  # in a mixed batch: this row runs the base model
_DEFAULT_LAYER_PATTERNS = ("layers", "h", "block", "blocks", "layer")


def check_mixed_batch(module: nn.Module, names: list[str], rows: int, where: str) -> None:
    """Refuse a mixed-adapter batch that ``module`` (at path ``where``) cannot run as asked.

    As in PEFT: inference only, and one adapter name per row of the batch.
    """
    if module.training:
        raise ValueError(
            f"{where}: mixed-adapter batches (adapter_names=...) run in inference only and the "
            f"model is in training mode (as in PEFT); call model.eval() first, or train one "
            f"adapter at a time with set_adapter()"
        )
    if len(names) != rows:
        raise ValueError(
            f"adapter_names has {len(names)} entries but the batch has {rows} rows (at {where}); "
            f"pass one adapter name (or {BASE_ADAPTER!r}) per row"
        )


def is_quantized_linear(module: nn.Module) -> bool:
    """A linear layer with a quantised weight (peftkit's 4-bit layer): see
    :class:`peftkit.quant.linear4bit.QuantizedLinear` for what adapters ask of it."""
    return isinstance(module, QuantizedLinear)


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear, GPT-2 Conv1D, or a peftkit 4-bit linear layer."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D)) or is_quantized_linear(module)


def linear_fan_in_fan_out(target: nn.Module, config: Any) -> bool | None:
    """How a linear-like ``target`` stores its weight: True for GPT-2's Conv1D (in x out),
    False for nn.Linear and peftkit's 4-bit layer; None for anything else. A config whose
    ``fan_in_fan_out`` says otherwise is corrected, with PEFT's warning, as PEFT does."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(target, Conv1D):
        if not config.fan_in_fan_out:
            warnings.warn(
                "target is a Conv1D (weight stored as in x out): setting fan_in_fan_out=True",
                stacklevel=4,
            )
            config.fan_in_fan_out = True
        return True
    if isinstance(target, nn.Linear) or is_quantized_linear(target):
        if config.fan_in_fan_out:
            warnings.warn(
                "fan_in_fan_out=True but the target is nn.Linear: setting it to False", stacklevel=4
            )
            config.fan_in_fan_out = False
        return False
    return None


def matches_names(name: str, spec: list[str] | str | None) -> bool:
    """PEFT's name rule: regex full match for a string, exact-or-suffix match for a list."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def layer_index(name: str, layers_pattern: list[str] | str | None) -> int | None:
    """The layer number in a module path like ``model.layers.3.self_attn.q_proj`` (or None)."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
    for pattern in patterns or _DEFAULT_LAYER_PATTERNS:
        found = re.match(rf"(?:.*\.)?{pattern}\.(\d+)\.", name)
        if found:
            return int(found.group(1))
    return None


def output_head_names(model: nn.Module) -> set[str]:
    """Paths of the output projection(s), which ``all-linear`` must not touch."""
    names: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    for path, module in model.named_modules():
        if head is not None and module is head:
            names.add(path)
    if not names and hasattr(model, "lm_head"):
        names.add("lm_head")
    return names


def find_targets(model: nn.Module, config: Any) -> list[str]:
    """Module paths the config targets, or a ValueError that lists what exists."""
    target = config.target_modules
    if target is None:
        raise ValueError(
            "target_modules is not set: name the layers to adapt, e.g. "
            f"target_modules={_example_targets(model)} or 'all-linear'"
        )
    heads = output_head_names(model) if target == ALL_LINEAR else set()
    layers = getattr(config, "layers_to_transform", None)  # IA3's config has no such field
    if isinstance(layers, int):
        layers = [layers]
    found = []
    inside: tuple[str, ...] = ()  # paths of adapter layers: nothing within one is a target
    for name, module in model.named_modules():
        if not name or _inside_adapter(name) or name.startswith(inside):
            continue
        if isinstance(module, AdapterLayer):
            inside += (name + ".",)
        if target == ALL_LINEAR:
            hit = is_linear_like(module) and name not in heads
        else:
            hit = matches_names(name, target)
        if not hit or matches_names(name, config.exclude_modules):
            continue
        if (
            layers is not None
            and layer_index(name, getattr(config, "layers_pattern", None)) not in layers
        ):
            continue
        if _inside_multihead_attention(model, name):
            if target == ALL_LINEAR:  # PEFT would adapt it with no effect; say so and skip it
                warnings.warn(
                    f"all-linear: {name} is the out_proj of an nn.MultiheadAttention, which reads "
                    f"its weight directly, so a LoRA layer there would have no effect; skipped. "
                    f"Name the attention module itself in target_modules to adapt it",
                    stacklevel=3,
                )
                continue
            raise ValueError(
                f"target_modules={target!r} names {name}, a layer inside an "
                f"nn.MultiheadAttention: the attention reads its weight directly, so LoRA on it "
                f"alone is not supported (in PEFT it silently has no effect). Target the "
                f"attention module itself ({name.rpartition('.')[0]}): both its in- and "
                f"out-projection get LoRA"
            )
        found.append(name)
    if not found:
        raise ValueError(
            f"target_modules={target!r} matched no module of {type(model).__name__}. "
            f"Adaptable layer names in this model: {_example_targets(model, limit=20)}"
        )
    return found


def _inside_multihead_attention(model: nn.Module, name: str) -> bool:
    parent = name.rpartition(".")[0]
    return bool(parent) and isinstance(model.get_submodule(parent), nn.MultiheadAttention)


def _inside_adapter(name: str) -> bool:
    parts = name.split(".")
    return any(
        p in ("base_layer", "lora_A", "lora_B", "lora_E", "original_module", "modules_to_save")
        for p in parts
    )


def _example_targets(model: nn.Module, limit: int = 8) -> list[str]:
    """Distinct leaf names of adaptable layers (what users put in target_modules)."""
    seen: list[str] = []
    for name, module in model.named_modules():
        if not name or _inside_adapter(name):
            continue
        if is_linear_like(module) or isinstance(
            module, (nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)
        ):
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in seen:
                seen.append(leaf)
    return seen[:limit]


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """``(parent, attribute)`` such that ``getattr(parent, attribute)`` is the module ``name``."""
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, child = get_submodule_parent(model, name)
    setattr(parent, child, new)


# modules_to_save types whose rows run independently (output row b depends on input row b only).
_ROW_WISE_MODULES = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class ModulesToSaveWrapper(nn.Module):
    """Keeps the original module and a trainable copy per adapter; forwards through the active copy.

    Saved under the module's plain path (``classifier.weight``), as HF PEFT does.
    """

    def __init__(self, module: nn.Module, adapter_name: str) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disable_adapters = False
        self.batch_adapters: list[str] | None = None
        self.add_adapter(adapter_name)

    def add_adapter(self, adapter_name: str) -> None:
        # under ZeRO-3 the weights are empty partitions: copy the gathered whole (peft #1450)
        with gathered(self.original_module.parameters()):
            copy_ = copy.deepcopy(self.original_module)
        copy_.requires_grad_(True)
        self.modules_to_save[adapter_name] = copy_
        self.original_module.requires_grad_(False)
        if self.active_adapter is None:
            self.active_adapter = adapter_name

    def set_adapter(self, adapter_name: str) -> None:
        self.active_adapter = adapter_name if adapter_name in self.modules_to_save else None

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = next(iter(self.modules_to_save), None)

    def active_module(self) -> nn.Module:
        if self.disable_adapters or self.active_adapter is None:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        if self.batch_adapters is None or self.disable_adapters:
            return self.active_module()(x, *args, **kwargs)
        # Mixed batch: each distinct module runs on its own rows (few distinct adapters per batch).
        where = f"modules_to_save {type(self.original_module).__name__}"
        if not isinstance(self.original_module, _ROW_WISE_MODULES):
            # A GRU/LSTM returns a tuple and may hold the batch in dim 1: rows cannot be split.
            raise ValueError(
                f"{where}: mixed-adapter batches (adapter_names=...) through a modules_to_save "
                f"{type(self.original_module).__name__} are not supported (PEFT refuses them too); "
                f"only {', '.join(c.__name__ for c in _ROW_WISE_MODULES)} split by rows. Run each "
                f"adapter in its own batch with set_adapter()"
            )
        check_mixed_batch(self, self.batch_adapters, len(x), where)
        out = None
        for name in dict.fromkeys(self.batch_adapters):
            rows = torch.tensor(
                [i for i, n in enumerate(self.batch_adapters) if n == name], device=x.device
            )
            module = (
                self.modules_to_save[name] if name in self.modules_to_save else self.original_module
            )
            part = module(x[rows], *args, **kwargs)
            if out is None:
                out = part.new_empty((x.shape[0], *part.shape[1:]))
            out[rows] = part
        return out

    def __getattr__(self, name: str) -> Any:
        # Let code that reads e.g. ``model.score.weight`` or ``out_features`` see the active module.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.active_module(), name)


def wrap_modules_to_save(model: nn.Module, names: Iterable[str], adapter_name: str) -> list[str]:
    """Wrap (or extend) every module whose path matches one of ``names``; return the paths wrapped."""
    names = list(names)
    wrapped = []
    for path, module in list(model.named_modules()):
        if not path or _inside_adapter(path) or not matches_names(path, names):
            continue
        if isinstance(module, ModulesToSaveWrapper):
            module.add_adapter(adapter_name)
        else:
            replace_module(model, path, ModulesToSaveWrapper(module, adapter_name))
        wrapped.append(path)
    return wrapped


EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")  # PEFT's names for "the embeddings"


def embedding_is_targeted(model: nn.Module, config: Any) -> bool:
    """PEFT's rule: a list naming ``embed_tokens``/``lm_head`` exactly, or a regex matching a
    module whose path ends with one of them (never ``"all-linear"``)."""
    target = getattr(config, "target_modules", None)
    if isinstance(target, str):
        if target == ALL_LINEAR:
            return False
        return any(
            re.fullmatch(target, path) is not None
            for path, _ in model.named_modules()
            if any(re.match(rf"(.*\.)?{e}$", path) for e in EMBEDDING_LAYER_NAMES)
        )
    return bool(target) and any(e in target for e in EMBEDDING_LAYER_NAMES)


def vocabulary_was_resized(model: nn.Module, config: Any) -> bool:
    """``vocab_size`` differs from the one in ``<base_model_name_or_path>/config.json``."""
    model_config = getattr(model, "config", None)
    vocab = getattr(model_config, "vocab_size", None)
    path = getattr(config, "base_model_name_or_path", None)
    if not vocab or not path or not os.path.isfile(os.path.join(path, "config.json")):
        return False
    return type(model_config).from_pretrained(path).vocab_size != vocab


def _embedding_layers(model: nn.Module) -> list[nn.Module]:
    layers = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        get = getattr(model, getter, None)
        try:
            layer = get() if callable(get) else None
        except NotImplementedError:  # no embeddings (ConvNeXt, ResNet: transformers raises)
            layer = None
        if layer is not None:
            layers.append(layer)
    return layers


def embedding_weights_to_save(
    model: nn.Module, config: Any, state: dict[str, torch.Tensor], prefix: str
) -> dict[str, torch.Tensor]:
    """The embedding tensors PEFT stores beside the adapter (see the module docstring).

    ``state`` is the wrapper's state dict whose keys are ``prefix + <path in model>...``.
    """
    # PEFT leaves the embeddings out when trainable tokens train some of their rows
    tokens = getattr(config, "trainable_token_indices", None) is not None
    targeted = embedding_is_targeted(model, config) and not tokens
    if not targeted and not vocabulary_was_resized(model, config):
        return {}
    paths = {id(m): p for p, m in model.named_modules()}
    out = {}
    for layer in _embedding_layers(model):
        if targeted:  # only adapted embeddings, and only their frozen base weights
            base = getattr(layer, "base_layer", None)
            if not isinstance(base, (nn.Linear, nn.Embedding)):
                continue
            layer = base
        if id(layer) in paths:
            start = prefix + paths[id(layer)] + "."
            out.update({k: v for k, v in state.items() if k.startswith(start)})
    return out


def load_embedding_weights(
    model: nn.Module, state: dict[str, torch.Tensor], prefix: str
) -> dict[str, torch.Tensor]:
    """Copy saved embedding weights (see :func:`embedding_weights_to_save`) into ``model`` and
    return ``state`` without them."""
    layers = {id(m) for m in _embedding_layers(model)}
    layers |= {id(getattr(m, "base_layer", None)) for m in _embedding_layers(model)}
    own = {}
    for path, module in model.named_modules():
        named = id(module) in layers or any(
            re.match(rf"(.*\.)?{e}(\.base_layer)?$", path) for e in EMBEDDING_LAYER_NAMES
        )
        if named and not _inside_adapter(path.removesuffix(".base_layer")):
            for pname, param in module.named_parameters(recurse=False):
                own[f"{prefix}{path}.{pname}"] = param
    rest = {}
    with torch.no_grad():
        for key, value in state.items():
            if key not in own:
                rest[key] = value
                continue
            if own[key].shape != value.shape:
                raise ValueError(
                    f"the adapter stores embedding weight {key} of shape {tuple(value.shape)} but "
                    f"the model's is {tuple(own[key].shape)}: the vocabulary was resized while "
                    f"training; call model.resize_token_embeddings({value.shape[0]}) on the base "
                    f"model before loading the adapter"
                )
            own[key].copy_(value.to(own[key].dtype))
    return rest
