"""IA3 ((IA)³, Liu et al., the T-Few paper): learned vectors that rescale activations.

Each adapted layer learns one vector ``l``, initialised to ones, and multiplies it in::

    y = W (l ⊙ x) + b          feed-forward layers (``feedforward_modules``): l (in,)
    y = l ⊙ (W x + b)          every other target (keys, values, ...):        l (out,)

so an adapter costs one value per channel. Merging folds the vector into the weight, and for an
output vector into the bias too::

    input vector    W[:, j] *= l[j]                (grouped conv: each group's input channels)
    output vector   W[i, :] *= l[i],  b[i] *= l[i]

Unmerging divides exactly (PEFT divides by ``l + 1e-8``, so its unmerged weights drift); a
vector holding a zero cannot be divided out, and unmerging it is refused before anything changes.
Several active adapters multiply their vectors. ``is_feedforward`` is decided per adapter (PEFT
decides it once per layer, by the first adapter) so adapters disagreeing about a layer each keep
their own meaning.

Layer kinds, as in PEFT: ``nn.Linear``, GPT-2's ``Conv1D`` (``fan_in_fan_out``: weight (in, out)),
``nn.Conv2d`` and ``nn.Conv3d`` (vector ``(1, C, 1, 1[, 1])``), and peftkit's 4-bit linear layer
(forward only; PEFT too refuses to merge into 4-bit weights).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch
from torch import nn

from ..config import Adapts, ModelFamily, PeftConfig, PeftType
from ..inject import is_quantized_linear, linear_fan_in_fan_out
from ..tuner import InjectedAdapterModel
from .adapter_layer import AdapterLayer
from .lora import _linear_features, _reference_tensor


@dataclasses.dataclass
class IA3Config(PeftConfig):
    """IA3 hyper-parameters, with HF PEFT's names and meaning.

    Attributes:
        target_modules: layers that get a vector (list: exact name or ``.name`` suffix; string:
            regex full match; ``"all-linear"``).
        exclude_modules: names never adapted (same rules).
        feedforward_modules: which targets scale their input instead of their output. A list
            names them by suffix (PEFT's rule: the module path ends with the entry), a string is
            a regex that must match the whole path; a list must be a subset of a list
            ``target_modules``. ``[]``: none.
        fan_in_fan_out: the target stores its weight as (in, out), like GPT-2's ``Conv1D``.
        modules_to_save: extra modules trained in full and saved with the adapter.
        init_ia3_weights: ``True`` starts every vector at ones (the identity); ``False`` leaves
            PEFT's random normal draw (a non-identity adapter, for tests).
    """

    peft_type = PeftType.IA3
    adapts = Adapts.LAYERS
    model_families = frozenset(ModelFamily)  # any model with Linear / Conv1D / Conv layers

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for field in ("target_modules", "exclude_modules", "feedforward_modules"):
            value = getattr(self, field)
            if isinstance(value, (set, tuple)):
                setattr(self, field, sorted(value))
        ff, targets = self.feedforward_modules, self.target_modules
        if isinstance(ff, list) and isinstance(targets, list) and not set(ff) <= set(targets):
            extra = sorted(set(ff) - set(targets))
            raise ValueError(
                f"IA3Config: feedforward_modules must be a subset of target_modules (as in "
                f"PEFT); {extra} are not targets. Add them to target_modules or drop them"
            )

    def is_feedforward(self, module_name: str) -> bool:
        """PEFT's rule: a regex string must match the whole path; a list entry must end it."""
        ff = self.feedforward_modules
        if ff is None:
            raise ValueError(
                "IA3Config.feedforward_modules is not set: name the targets whose input is scaled "
                "(T-Few scales the input of the feed-forward block's second projection, e.g. "
                "['down_proj'], ['wo'], ['fc2']), or pass [] to scale every target's output"
            )
        if isinstance(ff, str):
            return re.fullmatch(ff, module_name) is not None
        return any(module_name.endswith(entry) for entry in ff)


class IA3Layer(AdapterLayer):
    """One vector per adapter in ``ia3_l[name]``; a layer kind supplies the shapes."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.ia3_l = nn.ParameterDict()
        self.is_feedforward: dict[str, bool] = {}

    def adapter_names(self) -> list[str]:
        return list(self.ia3_l)

    def vector_shape(self, feedforward: bool) -> tuple[int, ...]:
        raise NotImplementedError

    def add_adapter(self, name: str, config: IA3Config, module_name: str) -> None:
        self.module_name = module_name
        feedforward = config.is_feedforward(module_name)
        # PEFT draws a normal vector first, then overwrites it with ones: draw it either way,
        # so one seed leaves both libraries' generators in one state
        vector = torch.randn(self.vector_shape(feedforward))
        if config.init_ia3_weights:
            vector.fill_(1.0)
        ref = _reference_tensor(self.base_layer)
        dtype = ref.dtype if ref.dtype in (torch.float32, torch.float64) else torch.float32
        self.ia3_l[name] = nn.Parameter(vector.to(device=ref.device, dtype=dtype))
        self.is_feedforward[name] = feedforward
        self.active_adapters = self.active_adapters or [name]

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged into the weights; unmerge it first")
        if name in self.ia3_l:
            del self.ia3_l[name]
        self.is_feedforward.pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    # --- forward -------------------------------------------------------------------------
    def activation_scale(self, name: str) -> torch.Tensor:
        """Adapter ``name``'s vector shaped to broadcast over the layer's input/output."""
        raise NotImplementedError

    def _product(self, names: list[str]) -> torch.Tensor | None:
        scale = None
        for name in names:
            v = self.activation_scale(name)
            scale = v if scale is None else scale * v
        return scale

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``l_out ⊙ base(l_in ⊙ x)``, each ``l`` the product of the active adapters' vectors."""
        self._prepare_forward()
        active = self._active()
        scale_in = self._product([n for n in active if self.is_feedforward[n]])
        scale_out = self._product([n for n in active if not self.is_feedforward[n]])
        if scale_in is not None:
            x = (x.to(scale_in.dtype) * scale_in).to(x.dtype)
        result = self.base_layer(x, *args, **kwargs)
        if scale_out is not None:
            result = (result.to(scale_out.dtype) * scale_out).to(result.dtype)
        return result

    # --- merging -------------------------------------------------------------------------
    def weight_scale(self, name: str) -> torch.Tensor:
        """Adapter ``name``'s vector shaped to broadcast over the base weight."""
        raise NotImplementedError

    def _check_mergeable(self) -> None:
        if is_quantized_linear(self.base_layer):
            raise ValueError(
                f"{self.module_name}: IA3 cannot be merged into a 4-bit layer (nor in PEFT); "
                f"call peftkit.quant.dequantize_model(model) first, or keep the adapter unmerged"
            )

    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold each vector into the weight (and, for an output vector, the bias)."""
        self._check_mergeable()
        base = self.base_layer
        for name in adapter_names or self.active_adapters:
            if name not in self.ia3_l or name in self.merged_adapters:
                continue
            weight = base.weight * self.weight_scale(name).to(base.weight.dtype)
            bias = None
            if not self.is_feedforward[name] and base.bias is not None:
                bias = base.bias * self.ia3_l[name].reshape(base.bias.shape).to(base.bias.dtype)
            if safe_merge and not (
                torch.isfinite(weight).all() and (bias is None or torch.isfinite(bias).all())
            ):
                raise ValueError(f"merging adapter {name!r} produces NaN/Inf weights; not merged")
            with torch.no_grad():
                base.weight.copy_(weight)
                if bias is not None:
                    base.bias.copy_(bias)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Divide every merged vector out again, newest first."""
        zero = [n for n in self.merged_adapters if (self.ia3_l[n] == 0).any()]
        if zero:
            raise ValueError(
                f"{self.module_name}: adapters {zero} have zeros in their IA3 vector, so their "
                f"merge cannot be divided out; reload the base weights instead"
            )
        base = self.base_layer
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            with torch.no_grad():
                base.weight.div_(self.weight_scale(name).to(base.weight.dtype))
                if not self.is_feedforward[name] and base.bias is not None:
                    base.bias.div_(self.ia3_l[name].reshape(base.bias.shape).to(base.bias.dtype))

    def extra_repr(self) -> str:
        kinds = {True: "input", False: "output"}
        return ", ".join(f"{n}: {kinds[self.is_feedforward[n]]}" for n in self.ia3_l)


class IA3Linear(IA3Layer):
    """IA3 on ``nn.Linear``, GPT-2's ``Conv1D`` (``fan_in_fan_out``) or a 4-bit linear layer."""

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = fan_in_fan_out
        self.in_features, self.out_features = _linear_features(base_layer)

    def vector_shape(self, feedforward: bool) -> tuple[int, ...]:
        return (1, self.in_features) if feedforward else (self.out_features, 1)

    def activation_scale(self, name: str) -> torch.Tensor:
        return self.ia3_l[name].flatten()  # (in,) or (out,): the last dim of x / y

    def weight_scale(self, name: str) -> torch.Tensor:
        v = self.ia3_l[name]  # (1, in) or (out, 1) against the (out, in) weight
        return v.T if self.fan_in_fan_out else v  # Conv1D stores (in, out)


class IA3Conv(IA3Layer):
    """IA3 on ``nn.Conv2d`` / ``nn.Conv3d``: vector ``(1, C, 1, ...)`` over the channels."""

    def __init__(self, base_layer: nn.Conv2d | nn.Conv3d) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels

    def vector_shape(self, feedforward: bool) -> tuple[int, ...]:
        channels = self.in_features if feedforward else self.out_features
        return (1, channels) + (1,) * (self.base_layer.weight.dim() - 2)  # (1, C, 1, 1[, 1])

    def activation_scale(self, name: str) -> torch.Tensor:
        return self.ia3_l[name]  # (1, C, 1, ...) against (B, C, *S)

    def weight_scale(self, name: str) -> torch.Tensor:
        v = self.ia3_l[name]  # (1, C, *1)
        base = self.base_layer
        if not self.is_feedforward[name]:
            return v.transpose(0, 1)  # (out, 1, *1): one factor per output channel
        if base.groups == 1:
            return v  # (1, in, *1)
        # weight (out, in/g, *k): output channel o of group o // (out/g) reads that group's inputs
        per_group = v.reshape(base.groups, base.in_channels // base.groups, *v.shape[2:])
        return per_group.repeat_interleave(
            base.out_channels // base.groups, dim=0
        )  # (out, in/g, *1)


def create_ia3_layer(target: nn.Module, config: IA3Config) -> IA3Layer:
    """Wrap ``target`` in the IA3 layer for its kind, or refuse naming what is supported."""

    if isinstance(target, (nn.Conv2d, nn.Conv3d)):
        return IA3Conv(target)
    fan_in_fan_out = linear_fan_in_fan_out(target, config)
    if fan_in_fan_out is not None:
        return IA3Linear(target, fan_in_fan_out=fan_in_fan_out)
    raise ValueError(
        f"IA3 cannot adapt a {type(target).__name__}; supported (as in PEFT): nn.Linear, "
        f"transformers Conv1D, nn.Conv2d, nn.Conv3d and peftkit Linear4bit. Leave this module "
        f"out of target_modules"
    )


class IA3Model(InjectedAdapterModel):
    """PEFT's ``IA3Model``: injects IA3 vectors; ``add_weighted_adapter`` sums them."""

    prefix = "ia3_"
    layer_cls = IA3Layer
    saved_dict_names = ("ia3_l",)
    mixed_batches = False

    def create_layer(self, target: nn.Module, config: PeftConfig) -> nn.Module:
        return create_ia3_layer(target, config)

    def add_weighted_adapter(
        self, adapters: list[str], weights: list[float], adapter_name: str, **options: Any
    ) -> None:
        """A new adapter whose vectors are ``Σ_i weights[i] · l_i`` (PEFT's IA3 arithmetic);
        LoRA's options (``combination_type``, ``density``, ...) do not apply and are refused."""
        from .add_weighted import add_weighted_ia3

        given = sorted(k for k, v in options.items() if v is not None)
        if given:
            raise ValueError(
                f"IA3 adapters combine as a weighted sum of their vectors; {', '.join(given)} "
                f"(LoRA's combination options) do not apply"
            )
        add_weighted_ia3(self, adapters, weights, adapter_name)
