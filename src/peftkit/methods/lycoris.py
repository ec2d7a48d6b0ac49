"""What LoHa and LoKr share (the LyCORIS family): a weight update built from small factors.

Both methods build, per adapter, a full-size update ``ΔW`` laid out like the base weight (LoHa:
a Hadamard product of two low-rank matrices, LoKr: a Kronecker product) and add it::

    y = op(x, W + Σ_active s · ΔW_name) + b       op: F.linear, or the base's own convolution

One product with the summed weight, not ``op(x, W) + op(x, ΔW)`` as PEFT runs it: the same
output (the convolution/matmul is linear in the weight) for one matmul instead of two forward and
two instead of three backward; autograd keeps ``W + ΔW`` for backward where PEFT keeps ``ΔW``.
:meth:`LycorisLayer.plain_forward` is the two-product form (tested equal), taken where the base
weight cannot be read directly (a base with hooks, e.g. ZeRO-3's gathering; a DTensor) or the
base is called with extra arguments.

Training-time regularisers, as PEFT draws them (same generator, same order, so one seed gives
both libraries one run):

* ``module_dropout`` p: per adapter and forward, ``torch.rand(1) > p`` keeps the whole update;
* ``rank_dropout`` p: ``torch.rand(out) > p`` keeps each output row of ``ΔW`` (LoHa always, LoKr
  with ``rank_dropout_scale``, divides the kept rows by the fraction kept).

Merging adds ``s · ΔW`` to the weight (grouped convolutions too: ``ΔW`` has the grouped weight's
shape); mixed-adapter batches are refused, as PEFT has no such path for these methods.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn.modules import module as _module_hooks

from ..config import Adapts, ModelFamily, PeftConfig
from ..tuner import InjectedAdapterModel
from .adapter_layer import AdapterLayer
from .lora import _reference_tensor
from .lora_config import match_pattern_key

# Layer kinds PEFT's LoHa/LoKr adapt (GPT-2's Conv1D, embeddings and 3-d convolutions are not).
SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d)


@dataclasses.dataclass
class LycorisConfig(PeftConfig):
    """Fields LoHa and LoKr share, with HF PEFT's names and meaning.

    Attributes:
        r: rank of each low-rank factor.
        alpha: scale numerator; the update is multiplied by ``alpha / r``.
        rank_dropout: training-time dropout of output rows of the update (see module docstring).
        module_dropout: training-time probability of skipping the whole update of a layer.
        use_effective_conv2d: convolutions with a kernel larger than 1 keep the kernel as a small
            core tensor (CP decomposition, FedPara's "Proposition 3") instead of flattening it
            into the input dimension.
        target_modules / exclude_modules / layers_to_transform / layers_pattern /
            modules_to_save: as in :class:`peftkit.LoraConfig`.
        init_weights: ``True`` starts at a zero update, ``False`` random factors (tests).
        rank_pattern / alpha_pattern: per-module overrides of ``r`` / ``alpha`` (regex keys
            matched against the end of the module path).
    """

    adapts: ClassVar[Adapts] = Adapts.LAYERS
    # any model with Linear / Conv1d / Conv2d layers: text, vision, a diffusion UNet
    model_families: ClassVar[frozenset[ModelFamily]] = frozenset(ModelFamily)

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    init_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)
    modules_to_save: list[str] | None = None

    _INITS: ClassVar[tuple] = (True, False)  # the init_weights values (LoKr adds "lycoris")

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        for field in ("target_modules", "exclude_modules"):
            value = getattr(self, field)
            if isinstance(value, (set, tuple)):
                setattr(self, field, sorted(value))
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"{name}: r must be a positive integer, got {self.r!r}")
        for field in ("rank_dropout", "module_dropout"):
            value = getattr(self, field)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name}: {field} must be in [0, 1), got {value!r}")
        if self.init_weights not in self._INITS:
            allowed = ", ".join(repr(v) for v in self._INITS)
            raise ValueError(
                f"{name}: init_weights must be one of {allowed}, got {self.init_weights!r}"
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(
                f"{name}: layers_pattern={self.layers_pattern!r} needs layers_to_transform "
                f"(the layer indices to adapt), as in PEFT"
            )

    def rank_for(self, module_name: str) -> int:
        key = match_pattern_key(self.rank_pattern, module_name)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha_for(self, module_name: str) -> float:
        key = match_pattern_key(self.alpha_pattern, module_name)
        return self.alpha_pattern[key] if key is not None else self.alpha


def kaiming_(tensor: torch.Tensor) -> None:
    """PEFT's (and nn.Linear's) default draw: Kaiming-uniform with ``a = sqrt(5)``."""
    nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))


class LycorisLayer(AdapterLayer):
    """A base ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` plus per-adapter factor tensors.

    A method supplies ``containers`` (its ``nn.ParameterDict`` names, PEFT's), :meth:`create`
    (make and initialise one adapter's factors) and :meth:`raw_delta` (the unscaled update).
    """

    containers: tuple[str, ...] = ()
    rank_dropout_rescales = True  # divide kept rows by the fraction kept (LoKr: a config option)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        for name in self.containers:
            setattr(self, name, nn.ParameterDict())
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.rank_dropout: dict[str, float] = {}
        self.module_dropout: dict[str, float] = {}
        self.rank_dropout_scale: dict[str, bool] = {}

    # --- adapters ------------------------------------------------------------------------
    def adapter_names(self) -> list[str]:
        return list(self.r)

    def add_adapter(self, name: str, config: LycorisConfig, module_name: str) -> None:
        self.module_name = module_name
        r, alpha = config.rank_for(module_name), config.alpha_for(module_name)
        if r <= 0:
            raise ValueError(f"{module_name}: rank_pattern gives r={r}; it must be positive")
        self.r[name], self.alpha[name], self.scaling[name] = r, alpha, alpha / r
        self.rank_dropout[name] = config.rank_dropout
        self.module_dropout[name] = config.module_dropout
        self.rank_dropout_scale[name] = getattr(config, "rank_dropout_scale", True)
        self.create(name, r, config)
        self._match_base_device_dtype(name)
        self.active_adapters = self.active_adapters or [name]

    def create(self, name: str, r: int, config: LycorisConfig) -> None:
        """Make adapter ``name``'s factors in ``self.<container>[name]`` and draw their values."""
        raise NotImplementedError

    def put(self, container: str, name: str, *shape: int) -> torch.Tensor:
        """A new uninitialised factor ``container[name]`` of ``shape``."""
        param = nn.Parameter(torch.empty(*shape))
        getattr(self, container)[name] = param
        return param

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged into the weights; unmerge it first")
        for container in self.containers:
            table = getattr(self, container)
            if name in table:
                del table[name]
        for table in (
            self.r,
            self.alpha,
            self.scaling,
            self.rank_dropout,
            self.module_dropout,
            self.rank_dropout_scale,
        ):
            table.pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def _match_base_device_dtype(self, name: str) -> None:
        """Factors on the base weight's device; fp32 when the base is half precision (adapters
        train in full precision, as PEFT's ``autocast_adapter_dtype`` default does)."""
        ref = _reference_tensor(self.base_layer)
        dtype = ref.dtype if ref.dtype in (torch.float32, torch.float64) else torch.float32
        for container in self.containers:
            table = getattr(self, container)
            if name in table and (table[name].device != ref.device or table[name].dtype != dtype):
                table[name].data = table[name].data.to(device=ref.device, dtype=dtype)

    # --- the update ----------------------------------------------------------------------
    def raw_delta(self, name: str) -> torch.Tensor:
        """Adapter ``name``'s update times its scaling, in the method's own layout (any shape
        with ``base.weight.numel()`` elements, read in the weight's order)."""
        raise NotImplementedError

    def delta_weight(self, name: str, rank_dropout: bool = False) -> torch.Tensor:
        """``s · ΔW`` laid out like the base weight; ``rank_dropout``: drop output rows."""
        weight = self.raw_delta(name).reshape(self.base_layer.weight.shape)  # (out, in[/g], *k)
        if rank_dropout:
            # drawn on the CPU generator, as PEFT does, then moved
            keep = (torch.rand(weight.shape[0]) > self.rank_dropout[name]).to(weight.dtype)
            if self.rank_dropout_scale[name]:
                keep = keep / keep.mean().clamp_min(torch.finfo(keep.dtype).tiny)  # all dropped: 0
            weight = weight * keep.view(-1, *[1] * (weight.dim() - 1)).to(weight.device)
        return weight

    def summed_delta(self) -> torch.Tensor | None:
        """The active adapters' updates summed, after this forward's dropout draws (None: none)."""
        total = None
        for name in self._active():
            if self.training and not torch.rand(1) > self.module_dropout[name]:
                continue  # module dropout: this adapter skips this forward
            drop = self.training and self.rank_dropout[name] > 0
            delta = self.delta_weight(name, rank_dropout=drop)
            total = delta if total is None else total + delta
        return total

    # --- forward -------------------------------------------------------------------------
    def op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The base layer's product with another weight: a matmul or its own convolution."""
        base = self.base_layer
        if isinstance(base, nn.Linear):
            return nn.functional.linear(x, weight, bias)  # (..., out)
        return base._conv_forward(x, weight, bias)  # (B, out, *S'), padding_mode honoured

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``op(x, W + Σ s ΔW) + b``: one product for the base and every active update."""
        self._prepare_forward()
        if args or kwargs or self.batch_adapters is not None or not _plain_base(self.base_layer):
            return self.plain_forward(x, *args, **kwargs)
        delta = self.summed_delta()
        base = self.base_layer
        if delta is None:
            return base(x)
        weight = base.weight.to(delta.dtype) + delta  # (out, in[/g], *k)
        bias = None if base.bias is None else base.bias.to(delta.dtype)
        return self.op(x.to(delta.dtype), weight, bias).to(x.dtype)

    def plain_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``base(x) + op(x, Σ s ΔW)``: PEFT's two-product form."""
        self._prepare_forward()
        result = self.base_layer(x, *args, **kwargs)
        delta = self.summed_delta()
        if delta is None:
            return result
        return result + self.op(x.to(delta.dtype), delta, None).to(result.dtype)

    # --- merging -------------------------------------------------------------------------
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """``W += s ΔW`` for each adapter (the active ones by default)."""
        for name in adapter_names or self.active_adapters:
            if name not in self.r or name in self.merged_adapters:
                continue
            weight = self.base_layer.weight
            delta = self.delta_weight(name).to(weight.dtype)
            if safe_merge and not torch.isfinite(weight + delta).all():
                raise ValueError(f"merging adapter {name!r} produces NaN/Inf weights; not merged")
            with torch.no_grad():
                weight.add_(delta)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract every merged adapter again, newest first."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            weight = self.base_layer.weight
            with torch.no_grad():
                weight.sub_(self.delta_weight(name).to(weight.dtype))

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: r={self.r[n]}, scaling={self.scaling[n]:g}" for n in self.r)


_PLAIN = (torch.Tensor, nn.Parameter)


def _plain_base(base: nn.Module) -> bool:
    """The base weight may be read directly: no hooks that prepare it when the base runs (ZeRO-3
    gathers partitioned weights in a pre-forward hook) and a plain tensor (not a DTensor)."""
    hooks = (
        base._forward_hooks
        or base._forward_pre_hooks
        or base._backward_hooks
        or base._backward_pre_hooks
        or _module_hooks._global_forward_hooks
        or _module_hooks._global_forward_pre_hooks
    )
    bias = base.bias
    return not hooks and type(base.weight) in _PLAIN and (bias is None or type(bias) in _PLAIN)


def check_supported(target: nn.Module, method: str) -> None:
    """Refuse a target PEFT's LoHa/LoKr cannot adapt, naming what they can."""
    if not isinstance(target, SUPPORTED):
        raise ValueError(
            f"{method} cannot adapt a {type(target).__name__}; supported (as in PEFT): nn.Linear, "
            f"nn.Conv1d, nn.Conv2d. Leave this module out of target_modules, or use LoRA"
        )


class LycorisModel(InjectedAdapterModel):
    """The adapter model of LoHa / LoKr: the LoRA walker with the method's layers.

    A subclass sets ``layer_cls``, ``saved_dict_names`` (= the layer's containers, PEFT's
    on-disk names) and ``method``.
    """

    mixed_batches = False
    method = "LyCORIS"

    def create_layer(self, target: nn.Module, config: PeftConfig) -> nn.Module:
        check_supported(target, self.method)
        return self.layer_cls(target)

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise ValueError(
            f"add_weighted_adapter is not available for {self.method} adapters (PEFT has none "
            f"either); it combines LoRA and IA3 adapters"
        )
