"""LoRA on bare ``nn.Parameter`` tensors (``LoraConfig.target_parameters``), e.g. MoE experts.

Some layers keep weights that no ``nn.Linear`` owns: a mixture-of-experts block stores every
expert's projection in one 3-d parameter and multiplies by it itself. ``target_parameters``
names such tensors (``"experts.gate_up_proj"``, matched like a list of ``target_modules``: equal,
or ending with ``"." + name``) and the module that owns one is wrapped in :class:`LoraParam`,
which runs the module with the adapted tensor in place of the parameter::

    2-d  W (out, in):      W' = W + s B A                      A (r, in), B (out, r)
    3-d  W (E, d1, d2):    W'[e] = W[e] + s B_e A_e            A (E*r, in), B (out, r*E)
         A_e = A.view(E, r, in)[e]      (rows expert-major)
         B_e = B.view(out, r, E)[:, :, e]  (columns rank-major: PEFT's layout, kept for its files)
         in, out = d2, d1  (W[e] is (out, in));  module.is_transposed = True: in, out = d1, d2

    y = functional_call(module, {name: W'}, x)         nothing is written into the module

As in PEFT (``ParamWrapper``): a second parameter of the same module nests a second wrapper
(the outer one wraps the parameter registered later, so the files' key names agree), every
adapter that uses ``target_parameters`` must target the same parameters, and ``lora_dropout``,
``fan_in_fan_out``, ``lora_bias``, DoRA and mixed-adapter batches are refused (dropout cannot be
applied to an input the adapter never sees on its own). Reading ``module.weight`` directly gives
the frozen base tensor, not ``W'``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..inject import _inside_adapter, replace_module
from .lora import LoraLayer
from .lora_config import LoraConfig


class LoraParam(LoraLayer):
    """LoRA on one parameter (``parameter_name``) of ``base_layer`` (a module or another
    :class:`LoraParam` wrapping a second parameter of the same module)."""

    def __init__(self, base_layer: nn.Module, parameter_name: str) -> None:
        super().__init__(base_layer)
        self.parameter_name = parameter_name
        shape = self.param().shape
        if len(shape) not in (2, 3):
            raise ValueError(
                f"target_parameters: {parameter_name} has {len(shape)} dims; LoRA on a bare "
                f"parameter needs a 2-d (out, in) or 3-d (experts, ., .) tensor (as in PEFT)"
            )
        self.num_experts = shape[0] if len(shape) == 3 else 1
        self.transposed = len(shape) == 3 and getattr(self.owner(), "is_transposed", False)
        if len(shape) == 2:
            self.out_features, self.in_features = shape
        elif self.transposed:  # (E, in, out)
            self.in_features, self.out_features = shape[1], shape[2]
        else:  # (E, out, in)
            self.out_features, self.in_features = shape[1], shape[2]

    def owner(self) -> nn.Module:
        """The module that registers the parameter (below any nested wrappers)."""
        module = self.base_layer
        while isinstance(module, LoraParam):
            module = module.base_layer
        return module

    def param(self) -> torch.Tensor:
        return getattr(self.owner(), self.parameter_name)

    def _param_path(self) -> str:
        """The parameter's name seen from ``base_layer`` (through nested wrappers)."""
        path, module = self.parameter_name, self.base_layer
        while isinstance(module, LoraParam):
            path, module = "base_layer." + path, module.base_layer
        return path

    def _check_options(self, config: LoraConfig) -> None:
        for option, off in (
            ("lora_dropout", 0.0),
            ("fan_in_fan_out", False),
            ("lora_bias", False),
            ("use_dora", False),
        ):
            if getattr(config, option) != off:
                raise ValueError(
                    f"target_parameters ({self.module_name}) with {option}="
                    f"{getattr(config, option)!r} is not supported (nor by PEFT); set "
                    f"{option}={off!r}"
                )

    def _create_factors(self, name: str, r: int) -> None:
        rank = r * self.num_experts
        self.lora_A[name] = nn.Linear(self.in_features, rank, bias=False)
        self.lora_B[name] = nn.Linear(rank, self.out_features, bias=False)

    def delta_weight(self, name: str) -> torch.Tensor:
        """``s B A`` shaped like the parameter."""
        A, B, s = self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]
        if self.num_experts == 1:
            return (B @ A) * s  # (out, in)
        E = self.num_experts
        a = A.view(E, -1, A.shape[-1])  # (E, r, in)
        b = B.view(B.shape[0], -1, E).permute(2, 0, 1)  # (E, out, r)
        delta = torch.bmm(b, a) * s  # (E, out, in)
        return delta.transpose(1, 2) if self.transposed else delta

    def _base_weight(self) -> torch.Tensor:
        return self.param()

    def _add_to_base_weight(self, delta: torch.Tensor) -> None:
        with torch.no_grad():
            self.param().add_(delta)

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        """The module's forward with ``W + Σ_active s B A`` in place of the parameter."""
        self._prepare_forward()
        if self.batch_adapters is not None and not self.disable_adapters:
            raise ValueError(
                f"{self.module_name}: mixed-adapter batches (adapter_names=...) are not supported "
                f"with target_parameters (nor by PEFT); run each adapter in its own batch with "
                f"set_adapter()"
            )
        active = self._active()
        if not active:
            return self.base_layer(x, *args, **kwargs)
        weight = self.param()
        for name in active:
            weight = weight + self.delta_weight(name).to(weight.dtype)
        return torch.func.functional_call(
            self.base_layer, {self._param_path(): weight}, (x, *args), kwargs
        )

    def project(self, name: str, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("a bare parameter has no separate LoRA term")


def _matches(key: str, targets: list[str]) -> bool:
    return any(key == t or key.endswith("." + t) for t in targets)


def inject_parameters(
    model: nn.Module, config: LoraConfig, adapter_name: str, others: dict[str, Any]
) -> list[str]:
    """Wrap every parameter ``config.target_parameters`` names; return their names.

    ``others``: the model's other adapter configs (they must target the same parameters).
    """
    targets = sorted(set(config.target_parameters))
    for other_name, other in others.items():
        theirs = getattr(other, "target_parameters", None)
        if theirs and set(theirs) != set(targets):
            raise ValueError(
                f"adapters using target_parameters must all target the same parameters (as in "
                f"PEFT): got {targets} for {adapter_name!r} and {sorted(theirs)} for "
                f"{other_name!r}"
            )
    found = []
    for path, module in list(model.named_modules()):
        if _inside_adapter(path):
            continue
        owner = module.owner() if isinstance(module, LoraParam) else module
        if isinstance(module, LoraLayer) and not isinstance(module, LoraParam):
            owner = module.base_layer
        for pname, _ in list(owner.named_parameters(recurse=False)):
            key = f"{path}.{pname}" if path else pname
            if not _matches(key, targets):
                continue
            if not path:
                raise ValueError(
                    f"target_parameters: {pname} is registered on the top-level model, which "
                    f"cannot be wrapped (as in PEFT); target a parameter of a submodule"
                )
            if not isinstance(module, LoraParam) and isinstance(module, LoraLayer):
                raise ValueError(
                    f"target_parameters: {key} belongs to {path}, which target_modules already "
                    f"adapts (as a {type(module).__name__}); target it one way only"
                )
            current = model.get_submodule(path)
            existing = current
            while isinstance(existing, LoraParam) and existing.parameter_name != pname:
                existing = existing.base_layer
            if isinstance(existing, LoraParam):  # already wrapped for another adapter
                existing.add_adapter(adapter_name, config, key)
            else:
                layer = LoraParam(current, pname)
                layer.add_adapter(adapter_name, config, key)
                replace_module(model, path, layer)
            found.append(key)
    if not found:
        raise ValueError(
            f"target_parameters={config.target_parameters} matched no parameter of "
            f"{type(model).__name__}"
        )
    return found
