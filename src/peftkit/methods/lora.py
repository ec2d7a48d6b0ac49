"""LoRA: low-rank adapters added beside frozen layers.

For a frozen weight ``W`` (out x in) LoRA learns ``A`` (r x in) and ``B`` (out x r)::

    y = W x + (alpha / r) * B (A dropout(x))        (alpha / sqrt(r) with use_rslora)

``B`` starts at zero, so a fresh adapter leaves the model unchanged. Merging folds the update into
the weight, ``W += (alpha / r) B A``; unmerging subtracts it again.

Layer layout mirrors HF PEFT's so state dicts map one-to-one: the wrapper keeps the original module
as ``base_layer`` and each named adapter's factors in ``lora_A[name]`` / ``lora_B[name]``
(``lora_embedding_A/B`` for embeddings).

Mixed-adapter batches (``model(..., adapter_names=[...])``): row ``b`` adds only adapter
``adapter_names[b]``'s update. Every layer type shares one mechanism (:meth:`LoraLayer.mixed_update`)::

    factors(name) -> down (r, ...), up (out, r)        each adapter, scale folded into ``up``
    stack, zero-padded to the largest rank             (n + 1, r_max, ...), (n + 1, out, r_max)
    row -> slot                                        "__base__" / absent adapters: the zero slot
    rowwise_update(x, down[slot], up[slot])            one batched projection per layer type

so there is no Python loop over sub-batches; only the down-projection differs per type (a matmul,
an embedding lookup, a grouped convolution).

Dropout: PEFT materialises ``dropout(x)`` per adapted layer and autograd keeps it (4 bytes per
element in fp32) for backward. We keep the layer input, which is saved anyway, plus the dropout
mask packed to one bit per element (:class:`_DropoutThenProject`): 1/32 of that copy, with the
random numbers drawn once (regenerating them in backward would cost more time than the copy).
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Adapts, ModelFamily, PeftConfig, PeftType
from ..inject import check_mixed_batch
from . import dora, lora_fused
from .dropout_mask import keep_mask


@dataclasses.dataclass
class LoraConfig(PeftConfig):
    """LoRA hyper-parameters, with HF PEFT's names and meaning.

    Attributes:
        r: rank of the update ``B A``.
        lora_alpha: scale numerator; the update is multiplied by ``lora_alpha / r``.
        lora_dropout: dropout probability on the adapter's input during training.
        target_modules: module names to adapt: a list (exact name or ``.name`` suffix), a regex string
            (full match of the module path), or ``"all-linear"`` (every linear layer except the output head).
        exclude_modules: names never adapted (same matching rules as ``target_modules``).
        bias: which biases train: ``"none"``, ``"all"`` or ``"lora_only"`` (those of adapted layers).
        modules_to_save: extra modules trained in full and saved with the adapter (e.g. a classifier).
        fan_in_fan_out: the target stores its weight as (in, out), like GPT-2's ``Conv1D``.
        init_lora_weights: ``True`` (Kaiming-uniform A, zero B), ``"gaussian"`` (normal(0, 1/r) A, zero
            B) or ``False`` (random A and B: a non-identity adapter, for tests).
        use_rslora: scale by ``alpha / sqrt(r)`` (rank-stabilised LoRA).
        layers_to_transform: only adapt these layer indices (an int or a list).
        layers_pattern: the name of the layer list (``"layers"``, ``"h"``, ...) used to find the index.
        rank_pattern / alpha_pattern: per-module overrides of ``r`` / ``lora_alpha``; keys are regexes
            matched against the end of the module path.
        use_dora: weight-decomposed LoRA (:mod:`peftkit.methods.dora`): a trainable magnitude
            per output times the normalised adapted weight.
        lora_bias: ``lora_B`` gets a bias (scaled like the update; merged into the base bias).

    Every other PEFT ``LoraConfig`` option is accepted at its "off" value and refused by name
    otherwise (``_UNIMPLEMENTED_OPTIONS``).
    """

    peft_type = PeftType.LORA
    adapts = Adapts.LAYERS
    model_families = frozenset(ModelFamily)  # any model with Linear / Conv / Embedding layers

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    bias: str = "none"
    modules_to_save: list[str] | None = None
    fan_in_fan_out: bool = False
    init_lora_weights: bool | str = True
    use_rslora: bool = False
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)
    use_dora: bool = False
    lora_bias: bool = False
    # PEFT options peftkit does not implement: accepted at their "off" value (PEFT writes them
    # all into adapter_config.json), refused otherwise (see _UNIMPLEMENTED_OPTIONS).
    megatron_config: dict | None = None
    megatron_core: str | None = "megatron.core"
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    loftq_config: dict = dataclasses.field(default_factory=dict)
    eva_config: dict | None = None
    corda_config: dict | None = None
    lora_ga_config: dict | None = None
    velora_config: dict | None = None
    alora_invocation_tokens: list[int] | None = None
    use_qalora: bool = False
    qalora_group_size: int = 16
    monteclora_config: dict | None = None
    layer_replication: list[list[int]] | None = None
    target_parameters: list[str] | None = None
    use_bdlora: dict | None = None
    arrow_config: dict | None = None
    kasa_config: dict | None = None
    ensure_weight_tying: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        refuse_unimplemented_options(self)
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.init_lora_weights not in (True, False, "gaussian"):
            known = isinstance(self.init_lora_weights, str) and (
                self.init_lora_weights in _PEFT_INITS or self.init_lora_weights.startswith("pissa")
            )
            if known:
                raise ValueError(
                    f"init_lora_weights={self.init_lora_weights!r} is a PEFT initialisation peftkit "
                    f"does not implement; peftkit implements True, False and 'gaussian'"
                )
            raise ValueError(
                f"init_lora_weights must be True, False or 'gaussian', got {self.init_lora_weights!r}"
            )

    def rank_for(self, module_name: str) -> int:
        """``r`` for one module, honouring ``rank_pattern``."""
        key = match_pattern_key(self.rank_pattern, module_name)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha_for(self, module_name: str) -> float:
        """``lora_alpha`` for one module, honouring ``alpha_pattern``."""
        key = match_pattern_key(self.alpha_pattern, module_name)
        return self.alpha_pattern[key] if key is not None else self.lora_alpha


# PEFT initialisations of A and B (from data, SVD, quantisation error...) peftkit lacks.
_PEFT_INITS = ("eva", "olora", "pissa", "corda", "loftq", "orthogonal", "mica", "lora_ga")

# PEFT LoraConfig options peftkit does not implement: (the value meaning "off", what it is).
# Anything else changes the maths, so it is refused by name rather than silently ignored.
_UNIMPLEMENTED_OPTIONS: dict[str, tuple[Any, str]] = {
    "loftq_config": ({}, "LoftQ initialisation"),
    "eva_config": (None, "EVA initialisation"),
    "corda_config": (None, "CorDA initialisation"),
    "lora_ga_config": (None, "LoRA-GA initialisation"),
    "velora_config": (None, "VeLoRA"),
    "alora_invocation_tokens": (None, "activated LoRA (aLoRA)"),
    "use_qalora": (False, "QA-LoRA"),
    "monteclora_config": (None, "MonteCLoRA"),
    "layer_replication": (None, "layer replication"),
    "use_bdlora": (None, "BD-LoRA"),
    "arrow_config": (None, "Arrow routing"),
    "kasa_config": (None, "KaSA"),
    "megatron_config": (None, "Megatron tensor-parallel layers"),
    "ensure_weight_tying": (False, "tied modules_to_save / trainable tokens"),
}


def refuse_unimplemented_options(config: LoraConfig) -> None:
    """Raise a ValueError naming the first PEFT option set that peftkit does not implement."""
    for name, (off, what) in _UNIMPLEMENTED_OPTIONS.items():
        value = getattr(config, name)
        if value is not None and value != off:
            raise ValueError(
                f"{type(config).__name__}({name}={value!r}): {what} is a PEFT feature peftkit "
                f"does not implement; remove the option (or use HF PEFT for this adapter)"
            )
    if config.use_dora and config.lora_bias:
        raise ValueError(
            f"{type(config).__name__}(use_dora=True, lora_bias=True): DoRA together with lora_bias "
            f"is not implemented by peftkit; use one of them"
        )
    if config.peft_type is not PeftType.LORA:
        for name in ("target_parameters", "trainable_token_indices"):
            if getattr(config, name):
                raise ValueError(
                    f"{type(config).__name__}({name}=...): {config.peft_type.value} with {name} "
                    f"is not implemented by peftkit (LoRA is)"
                )
        for name in ("use_dora", "lora_bias"):
            if getattr(config, name):
                raise ValueError(
                    f"{type(config).__name__}({name}=True): {config.peft_type.value} with {name} "
                    f"is not implemented by peftkit (nor accepted by PEFT)"
                )


def match_pattern_key(patterns: dict[str, Any], module_name: str) -> str | None:
    """The first pattern key that matches the end of ``module_name`` (PEFT's rank/alpha_pattern rule)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


class _DropoutThenProject(torch.autograd.Function):
    """``dropout(x) @ A.T`` that saves the layer input and a 1-bit mask, not ``dropout(x)``.

    ``keep`` is the boolean keep-mask (same shape as ``x``); kept elements are scaled by
    ``1 / (1 - p)`` (inverted dropout, as ``nn.Dropout``).
    """

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, weight: torch.Tensor, p: float, keep: torch.Tensor
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight, pack_bits(keep))
        ctx.p, ctx.width = p, x.shape[-1]
        return F.linear(x * keep * (1.0 / (1.0 - p)), weight)  # (..., r)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, packed = ctx.saved_tensors
        keep = unpack_bits(packed, ctx.width)  # (..., in) uint8 0/1
        scale = 1.0 / (1.0 - ctx.p)
        grad_x = grad_w = None
        # Under autocast the forward ran in bf16/fp16: grad_out has that dtype, x and weight
        # keep theirs; compute in grad_out's dtype and hand back each input's own dtype.
        if ctx.needs_input_grad[0]:
            grad_x = ((grad_out @ weight.to(grad_out.dtype)) * keep * scale).to(x.dtype)
        if ctx.needs_input_grad[1]:
            xd = (x * keep * scale).reshape(-1, x.shape[-1]).to(grad_out.dtype)  # (N, in)
            grad_w = (grad_out.reshape(-1, grad_out.shape[-1]).T @ xd).to(weight.dtype)  # (r, in)
        return grad_x, grad_w, None, None


_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8)  # (8,)
_BIT_VALUES = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)  # (8,) 1, 2, ..., 128


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Boolean (..., n) -> uint8 (..., ceil(n / 8)), eight mask elements per byte."""
    bits = mask.to(torch.uint8)
    if mask.shape[-1] % 8:
        bits = F.pad(bits, (0, -mask.shape[-1] % 8))
    bits = bits.reshape(*bits.shape[:-1], -1, 8)  # (..., n/8, 8)
    return (bits * _BIT_VALUES.to(bits.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 (..., ceil(n / 8)) -> uint8 0/1 (..., n)."""
    bits = (packed.unsqueeze(-1) >> _BIT_SHIFTS.to(packed.device)) & 1  # (..., n/8, 8)
    return bits.reshape(*packed.shape[:-1], -1)[..., :n]


def dropout_then_project(x: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:
    """``dropout(x, p) @ weight.T`` in training, drawing the mask from torch's global RNG."""
    return _DropoutThenProject.apply(x, weight, p, keep_mask(x.shape, p, x.device))


class LoraLayer(nn.Module):
    """Common state of every LoRA wrapper: the frozen ``base_layer`` and per-adapter factors.

    A layer type supplies :meth:`update` (one adapter's term), :meth:`factors` and, when its
    down-projection is not a matmul over the last dim, :meth:`rowwise_update`.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA's m, per adapter
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout_p: dict[str, float] = {}
        self.lora_bias: dict[str, bool] = {}
        self._dora_merge_scale: dict[str, torch.Tensor] = {}  # m / n at merge time, to unmerge
        self.merged_adapters: list[str] = []
        self.active_adapters: list[str] = []
        self.disable_adapters = False
        # Per-row adapter names for a mixed batch (set by the tuner for one forward call).
        self.batch_adapters: list[str] | None = None
        self.module_name = type(base_layer).__name__  # the module path, once an adapter is added

    def __getattr__(self, name: str) -> Any:
        # Model code reads e.g. ``self.wo.weight.dtype``: answer from the wrapped layer.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    # --- adapter bookkeeping -------------------------------------------------------------
    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def adapter_names(self) -> list[str]:
        return list(self.r)

    def add_adapter(self, name: str, config: LoraConfig, module_name: str) -> None:
        """Create adapter ``name``'s factors for this layer, initialised as ``config`` says."""
        r, alpha = config.rank_for(module_name), config.alpha_for(module_name)
        self.module_name = module_name
        self.r[name] = r
        self.lora_alpha[name] = alpha
        self.scaling[name] = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        self.lora_dropout_p[name] = config.lora_dropout
        self.lora_bias[name] = config.lora_bias
        self._check_options(config)
        self._create_factors(name, r)
        self._init_factors(name, config.init_lora_weights)
        self._match_base_device_dtype(name)
        if config.use_dora:
            self.lora_magnitude_vector[name] = nn.Parameter(dora.init_magnitude(self, name))
        self.active_adapters = [name] if not self.active_adapters else self.active_adapters

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged into the weights; unmerge it first")
        containers = (self.lora_A, self.lora_B, self.lora_embedding_A, self.lora_embedding_B)
        for container in (*containers, self.lora_magnitude_vector):
            if name in container:
                del container[name]
        for table in (self.r, self.lora_alpha, self.scaling, self.lora_dropout_p, self.lora_bias):
            table.pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def _check_options(self, config: LoraConfig) -> None:
        """Refuse config options this layer kind cannot honour (a layer type extends this)."""

    def _create_factors(self, name: str, r: int) -> None:
        raise NotImplementedError

    def _init_factors(self, name: str, init: bool | str) -> None:
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        with torch.no_grad():
            if self.lora_bias.get(name) and init is not False:
                nn.init.zeros_(self.lora_B[name].bias)
            if init == "gaussian":
                nn.init.normal_(A, std=1.0 / self.r[name])
            else:
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            if init is False:
                nn.init.kaiming_uniform_(B, a=math.sqrt(5))
            else:
                nn.init.zeros_(B)

    def _match_base_device_dtype(self, name: str) -> None:
        """Put factors on the base weight's device; keep them fp32 when the base is half precision
        (adapters train in full precision, as PEFT's ``autocast_adapter_dtype`` default does)."""
        ref = _reference_tensor(self.base_layer)
        dtype = ref.dtype if ref.dtype in (torch.float32, torch.float64) else torch.float32
        for container in (self.lora_A, self.lora_B):
            if name not in container:
                continue
            weight = container[name].weight
            if weight.device != ref.device or weight.dtype != dtype:  # Module.to walks and
                container[name].to(device=ref.device, dtype=dtype)  # rebuilds even for no move
        for container in (self.lora_embedding_A, self.lora_embedding_B):
            if name in container:
                container[name].data = container[name].data.to(device=ref.device, dtype=dtype)

    # --- merging -------------------------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        """``scaling * B A`` laid out like ``base_layer.weight``."""
        raise NotImplementedError

    def dora_norm_delta(self, name: str) -> torch.Tensor:
        """The update DoRA's column norm is taken of (``delta_weight``; grouped convs differ)."""
        return self.delta_weight(name)

    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold the adapters into the base weight: ``W += scaling * B A``.

        ``safe_merge`` checks the merged weight for NaN/Inf before committing it.
        """
        for name in adapter_names or self.active_adapters:
            if name not in self.r or name in self.merged_adapters:
                continue
            weight = self._base_weight()
            delta = self.delta_weight(name).to(weight.dtype)
            if name in self.lora_magnitude_vector:  # DoRA: W' = (m / ||W + dW||) (W + dW)
                scale = dora.merge_factor(self, name, weight + delta)
                delta = scale * (weight + delta) - weight
            if safe_merge:
                merged = weight + delta
                if not torch.isfinite(merged).all():
                    raise ValueError(
                        f"merging adapter {name!r} produces NaN/Inf weights; not merged"
                    )
            self._add_to_base_weight(delta)
            self._add_to_base_bias(name, +1.0)
            if name in self.lora_magnitude_vector:
                self._dora_merge_scale[name] = scale
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract every merged adapter again, newest first."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            weight = self._base_weight()
            delta = self.delta_weight(name).to(weight.dtype)
            if name in self._dora_merge_scale:  # DoRA: W = W' / (m / n) - dW
                delta = weight - weight / self._dora_merge_scale.pop(name) + delta
            self._add_to_base_weight(-delta)
            self._add_to_base_bias(name, -1.0)

    def _add_to_base_bias(self, name: str, sign: float) -> None:
        """``lora_bias``: the base bias takes ``± s b`` (PEFT's merge of lora_B's bias)."""
        if not self.lora_bias.get(name):
            return
        bias = getattr(self.base_layer, "bias", None)
        if bias is None:
            raise ValueError(
                f"{self.module_name}: cannot merge adapter {name!r} with lora_bias=True into a "
                f"layer without a bias (as in PEFT)"
            )
        with torch.no_grad():
            bias.add_(sign * self.scaling[name] * self.lora_B[name].bias.to(bias.dtype))

    def _base_weight(self) -> torch.Tensor:
        base = self.base_layer
        return base.dequantize() if hasattr(base, "requantize_") else base.weight

    def _add_to_base_weight(self, delta: torch.Tensor) -> None:
        base = self.base_layer
        if hasattr(base, "requantize_"):
            warnings.warn(
                "merging LoRA into a 4-bit layer re-quantizes the merged weight: outputs change "
                "slightly. Call peftkit.quant.dequantize_model(model) first for an exact merge.",
                stacklevel=3,
            )
            base.requantize_(base.dequantize() + delta)
        else:
            with torch.no_grad():
                base.weight.add_(delta)

    def _active(self) -> list[str]:
        """Adapters whose output must be added in forward (active, present, not merged)."""
        if self.disable_adapters:
            return []
        return [a for a in self.active_adapters if a in self.r and a not in self.merged_adapters]

    def _prepare_forward(self) -> None:
        """Disabled adapters must see the original weights, so un-merge them first."""
        if self.disable_adapters and self.merged:
            self.unmerge()

    # --- forward -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``base_layer(x) + Σ_active update(name, x)``; in a mixed batch, row ``b`` adds only
        adapter ``batch_adapters[b]``'s update (none for ``"__base__"``)."""
        self._prepare_forward()
        result = self.base_layer(x, *args, **kwargs)
        if self.batch_adapters is not None and not self.disable_adapters:
            delta = self.mixed_update(x)
            return result if delta is None else result + delta.to(result.dtype)
        for name in self._active():
            if name in self.lora_magnitude_vector:
                result = dora.forward(self, name, x, result)
            else:
                result = result + self.update(name, x).to(result.dtype)
        return result

    def update(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Adapter ``name``'s term ``scaling * B A dropout(x)``, shaped like the base output."""
        raise NotImplementedError

    def project(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``scaling * (B A x + b)`` without dropout (DoRA applies its own)."""
        raise NotImplementedError

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(down (r, ...), up (out, r))`` of adapter ``name``, the scaling folded into ``up``."""
        raise NotImplementedError

    def rowwise_update(
        self, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, slots: torch.Tensor
    ) -> torch.Tensor:
        """Row ``b`` of ``x`` through the stacked factors of slot ``slots[b]``.

        ``down`` (n, r, in) and ``up`` (n, out, r) stack the adapters; ``slots`` is (B,).
        """
        h = torch.einsum("b...i,bri->b...r", x.to(down.dtype), down[slots])  # (B, ..., r)
        return torch.einsum("b...r,bor->b...o", h, up[slots])  # (B, ..., out)

    def mixed_update(self, x: torch.Tensor) -> torch.Tensor | None:
        """Per-row updates of a mixed batch in one batched pass (no loop over sub-batches).

        The factors of the adapters named in the batch are zero-padded to the largest rank and
        stacked; row ``b`` then gathers its adapter's slot; ``"__base__"`` rows and adapters
        this layer does not carry get the all-zero slot. ``None`` when no row has an update here.
        """
        names = self.batch_adapters
        check_mixed_batch(self, names, x.shape[0], self.module_name)
        if self.merged_adapters:
            raise ValueError(
                f"{self.module_name}: cannot run a mixed-adapter batch while adapters "
                f"{self.merged_adapters} are merged into its weights (as in PEFT); call "
                f"model.unmerge_adapter() first"
            )
        present = [n for n in dict.fromkeys(names) if n in self.r]
        if not present:
            return None
        dora_names = [n for n in present if n in self.lora_magnitude_vector]
        if dora_names:
            raise ValueError(
                f"{self.module_name}: mixed-adapter batches do not support DoRA adapters "
                f"{dora_names} (PEFT refuses them too); run each in its own batch with set_adapter()"
            )
        downs, ups = zip(*(self.factors(n) for n in present))  # (r_i, ...), (out, r_i)
        r_max = max(d.shape[0] for d in downs)
        down = downs[0].new_zeros(len(present) + 1, r_max, *downs[0].shape[1:])  # (n+1, r, ...)
        up = ups[0].new_zeros(len(present) + 1, ups[0].shape[0], r_max)  # (n+1, out, r)
        for i, (d, u) in enumerate(zip(downs, ups)):
            down[i, : d.shape[0]] = d
            up[i, :, : u.shape[1]] = u
        index = {n: i for i, n in enumerate(present)}
        slots = torch.tensor([index.get(n, len(present)) for n in names], device=x.device)  # (B,)
        out = self.rowwise_update(x, down, up, slots)
        if any(self.lora_bias.get(n) for n in present):  # lora_bias: row b adds its adapter's s * b
            bias = out.new_zeros(len(present) + 1, out.shape[self.dora_out_axis])  # (n+1, out)
            for i, n in enumerate(present):
                if self.lora_bias.get(n):
                    bias[i] = self.lora_B[n].bias * self.scaling[n]
            shape = [1] * out.dim()
            shape[0], shape[self.dora_out_axis] = len(names), -1
            out = out + bias[slots].reshape(shape)
        return out

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: r={self.r[n]}, scaling={self.scaling[n]:g}" for n in self.r)


def _reference_tensor(module: nn.Module) -> torch.Tensor:
    for p in module.parameters():
        if p.is_floating_point():
            return p
    for b in module.buffers():
        return b
    return torch.empty(0)


class LoraLinear(LoraLayer):
    """LoRA on ``nn.Linear``, GPT-2's ``Conv1D`` (``fan_in_fan_out``) or a 4-bit linear layer."""

    dora_out_axis = -1  # DoRA's magnitude: one per output feature
    dora_scales_output = False

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = fan_in_fan_out
        self.in_features, self.out_features = _linear_features(base_layer)
        self.dora_axis = 1 if fan_in_fan_out else 0  # the output axis of the stored weight

    def _create_factors(self, name: str, r: int) -> None:
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=self.lora_bias[name])

    def delta_weight(self, name: str) -> torch.Tensor:
        delta = (self.lora_B[name].weight @ self.lora_A[name].weight) * self.scaling[
            name
        ]  # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """One active plain adapter on an ``nn.Linear`` or a 4-bit layer: the fused node of
        :mod:`peftkit.methods.lora_fused` (same maths, fewer passes); otherwise the plain path."""
        if not args and not kwargs and self.batch_adapters is None:
            self._prepare_forward()
            active = self._active()
            if len(active) == 1 and active[0] not in self.lora_magnitude_vector:
                name = active[0]
                operands = lora_fused.fast_path_operands(self, name, x)
                if operands is not None:
                    weight, weight_fn, A, B = operands
                    return lora_fused.lora_linear(
                        x,
                        weight,
                        self._modules["base_layer"].bias,
                        A,
                        B,
                        self.scaling[name],
                        self.lora_dropout_p[name] if self.training else 0.0,
                        weight_fn,
                    )
        return super().forward(x, *args, **kwargs)

    def update(self, name: str, x: torch.Tensor) -> torch.Tensor:
        A, B = self.lora_A[name].weight, self.lora_B[name].weight  # (r, in), (out, r)
        xa = x.to(A.dtype)
        p = self.lora_dropout_p[name]
        if self.training and p > 0:
            h = dropout_then_project(xa, A, p)  # (..., r)
        else:
            h = F.linear(xa, A)  # (..., r)
        return F.linear(h, B, self.lora_B[name].bias) * self.scaling[name]  # (..., out)

    def project(self, name: str, x: torch.Tensor) -> torch.Tensor:
        A, B, b = self.lora_A[name].weight, self.lora_B[name].weight, self.lora_B[name].bias
        s = self.scaling[name]  # folded into B (out, r): no pass over the output for it
        return F.linear(F.linear(x.to(A.dtype), A), B * s, None if b is None else b * s)

    def base_op(self, x: torch.Tensor) -> torch.Tensor:
        weight = self._base_weight()
        weight = weight.T if self.fan_in_fan_out else weight  # (out, in)
        return F.linear(x.to(weight.dtype), weight)  # (..., out)

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A[name].weight, self.lora_B[name].weight * self.scaling[name]


def _linear_features(layer: nn.Module) -> tuple[int, int]:
    if hasattr(layer, "in_features") and hasattr(layer, "out_features"):
        return layer.in_features, layer.out_features
    if hasattr(layer, "nf") and hasattr(layer, "weight"):  # transformers Conv1D: weight (in, out)
        in_f, out_f = layer.weight.shape
        return in_f, out_f
    raise TypeError(f"cannot read in/out features of {type(layer).__name__}")


class LoraEmbedding(LoraLayer):
    """LoRA on ``nn.Embedding``: ``E[ids] + scaling * (A.T[ids]) B.T``; A starts at zero, B normal."""

    dora_axis = 1  # DoRA's magnitude: one per embedding dimension (weight is (num, dim))
    dora_out_axis = -1
    dora_scales_output = True

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)

    def _check_options(self, config: LoraConfig) -> None:
        if config.lora_bias:
            raise ValueError(
                f"{self.module_name}: lora_bias=True is not supported on embeddings (nor by PEFT); "
                f"leave embeddings out of target_modules or set lora_bias=False"
            )

    def _create_factors(self, name: str, r: int) -> None:
        num, dim = self.base_layer.num_embeddings, self.base_layer.embedding_dim
        self.lora_embedding_A[name] = nn.Parameter(torch.empty(r, num))
        self.lora_embedding_B[name] = nn.Parameter(torch.empty(dim, r))

    def _init_factors(self, name: str, init: bool | str) -> None:
        A, B = self.lora_embedding_A[name], self.lora_embedding_B[name]
        with torch.no_grad():
            if init is False:
                nn.init.normal_(A)
            else:
                nn.init.zeros_(A)
            nn.init.normal_(B)

    def delta_weight(self, name: str) -> torch.Tensor:
        B, A = self.lora_embedding_B[name], self.lora_embedding_A[name]
        return (B @ A).T * self.scaling[name]  # (num, dim)

    def update(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        A, B = self.lora_embedding_A[name], self.lora_embedding_B[name]  # (r, num), (dim, r)
        emb = self.base_layer
        h = F.embedding(
            ids,
            A.T,
            emb.padding_idx,
            emb.max_norm,
            emb.norm_type,
            emb.scale_grad_by_freq,
            emb.sparse,
        )  # (..., r)
        return (h @ B.T) * self.scaling[name]  # (..., dim)

    def project(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        return self.update(name, ids)  # embeddings have no LoRA dropout

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_embedding_A[name], self.lora_embedding_B[name] * self.scaling[name]

    def rowwise_update(
        self, ids: torch.Tensor, down: torch.Tensor, up: torch.Tensor, slots: torch.Tensor
    ) -> torch.Tensor:
        """Row ``b`` looks its ids up in slot ``slots[b]``'s ``A.T``: ``down`` (n, r, num)."""
        if self.base_layer.max_norm is not None:
            raise ValueError(
                f"{self.module_name}: mixed-adapter batches do not support embeddings with "
                f"max_norm (the lookup renormalises each adapter's table in place); run each "
                f"adapter in its own batch with set_adapter()"
            )
        at_row = slots.view(-1, *([1] * (ids.dim() - 1)))  # (B, 1, ...)
        h = down.transpose(1, 2)[at_row, ids]  # (B, ..., r)
        return torch.einsum("b...r,bor->b...o", h, up[slots])  # (B, ..., dim)


class LoraConv(LoraLayer):
    """LoRA on ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``: A is a conv like the base with ``r``
    output channels, B a 1x1 conv back to the base's output channels.

    Grouped base convolutions (``groups = g``): A still sees every input channel, B is grouped
    (``g`` blocks of ``r / g`` -> ``out / g``), as in PEFT. Such an update does not fit the base's
    grouped weight, so it cannot be merged (PEFT refuses too).
    """

    dora_axis = 0  # DoRA's magnitude: one per output channel
    dora_out_axis = 1  # (B, out, *S)
    dora_scales_output = False

    def __init__(self, base_layer: nn.Conv1d | nn.Conv2d | nn.Conv3d) -> None:
        super().__init__(base_layer)
        self._conv_cls = type(base_layer)
        self._conv_fn = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}[
            type(base_layer)
        ]

    def _check_options(self, config: LoraConfig) -> None:
        groups, r = self.base_layer.groups, config.rank_for(self.module_name)
        if groups > 1 and r % groups:
            raise ValueError(
                f"{self.module_name}: a convolution with groups={groups} needs a rank divisible "
                f"by {groups} (got r={r}), as in PEFT; change r or leave this layer out"
            )

    def _create_factors(self, name: str, r: int) -> None:
        base = self.base_layer
        ones = (1,) * len(base.kernel_size)
        self.lora_A[name] = self._conv_cls(
            base.in_channels,
            r,
            base.kernel_size,
            base.stride,
            base.padding,
            base.dilation,
            bias=False,
        )
        self.lora_B[name] = self._conv_cls(
            r, base.out_channels, ones, ones, groups=base.groups, bias=self.lora_bias[name]
        )

    def delta_weight(self, name: str) -> torch.Tensor:
        if self.base_layer.groups > 1:
            raise ValueError(
                f"{self.module_name}: LoRA on a grouped convolution (groups="
                f"{self.base_layer.groups}) cannot be merged (as in PEFT): A mixes every input "
                f"channel, the base weight only its group's. Keep the adapter unmerged"
            )
        A, B = self.lora_A[name].weight, self.lora_B[name].weight  # (r, in, *k), (out, r, *1)
        delta = torch.einsum("or,ri...->oi...", B.flatten(1), A)  # (out, in, *k)
        return delta * self.scaling[name]

    def dora_norm_delta(self, name: str) -> torch.Tensor:
        """The ``s B A`` that DoRA's norm ``||W + s B A||`` uses, laid out like the base weight.

        Grouped convolutions (``groups = g``): the update has no (out, in/g, *k) weight, and
        PEFT 0.21 (``_DoraConvNdLayer.get_lora_weight``) takes ``B.view(-1, r) @ A.view(r, -1)``:
        B's ``out * r/g`` values re-read as ``out/g`` rows of ``r`` (row j = output channels
        ``j*g .. j*g+g-1`` side by side), times A (r, in*k) -> (out/g, in*k), re-read as
        (out, in/g, *k). That is not the update's weight, so this "norm" is not the DoRA norm,
        but it is what PEFT's magnitude is initialised from and divided by; we compute the same
        so PEFT's adapters give the same outputs. The forward term itself is the true grouped
        update ``B(A(x))``. With ``groups = 1`` the two readings coincide (the plain delta).
        """
        groups = self.base_layer.groups
        if groups == 1:
            return self.delta_weight(name)
        A, B = self.lora_A[name].weight, self.lora_B[name].weight  # (r, in, *k), (out, r/g, *1)
        r = A.shape[0]
        product = B.reshape(-1, r) @ A.reshape(r, -1)  # (out/g, in * prod(k))
        return product.reshape(self.base_layer.weight.shape) * self.scaling[name]  # (out, in/g, *k)

    def update(self, name: str, x: torch.Tensor) -> torch.Tensor:
        A, B = self.lora_A[name], self.lora_B[name]
        xa = x.to(A.weight.dtype)
        p = self.lora_dropout_p[name]
        if self.training and p > 0:
            xa = F.dropout(xa, p)
        return B(A(xa)) * self.scaling[name]  # (B, out, *S')

    def project(self, name: str, x: torch.Tensor) -> torch.Tensor:
        A, B = self.lora_A[name], self.lora_B[name]
        return B(A(x.to(A.weight.dtype))) * self.scaling[name]  # (B, out, *S')

    def base_op(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return self._conv_fn(
            x, base.weight, None, base.stride, base.padding, base.dilation, base.groups
        )  # (B, out, *S')

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        B = self.lora_B[name].weight.flatten(1)  # (out, r / groups)
        if self.base_layer.groups > 1:  # grouped B as one block-diagonal (out, r) matrix
            B = torch.block_diag(*B.chunk(self.base_layer.groups, dim=0))
        return self.lora_A[name].weight, B * self.scaling[name]

    def rowwise_update(
        self, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, slots: torch.Tensor
    ) -> torch.Tensor:
        """Each row convolved with its own ``A`` in one grouped convolution (groups = rows)."""
        n_rows, r, base = x.shape[0], down.shape[1], self.base_layer  # A convolves like the base
        weight = down[slots].flatten(0, 1)  # (B*r, in, *k)
        x_all = x.to(down.dtype).flatten(0, 1).unsqueeze(0)  # (1, B*in, *S)
        conv = self._conv_fn
        h = conv(x_all, weight, None, base.stride, base.padding, base.dilation, groups=n_rows)
        # h: (1, B*r, *S')
        h = h.view(n_rows, r, *h.shape[2:])  # (B, r, *S')
        return torch.einsum("br...,bor->bo...", h, up[slots])  # (B, out, *S')
