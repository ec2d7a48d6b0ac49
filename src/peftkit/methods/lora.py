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

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..inject import check_mixed_batch
from ..quant.linear4bit import QuantizedLinear
from . import dora, lora_fused
from .adapter_layer import AdapterLayer
from .dropout_mask import keep_mask, pack_mask, unpack_mask
from .lora_config import LoraConfig


class _DropoutThenProject(torch.autograd.Function):
    """``dropout(x) @ A.T`` that saves the layer input and a 1-bit mask, not ``dropout(x)``.

    ``keep`` is the boolean keep-mask (same shape as ``x``); kept elements are scaled by
    ``1 / (1 - p)`` (inverted dropout, as ``nn.Dropout``).
    """

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, weight: torch.Tensor, p: float, keep: torch.Tensor
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight, pack_mask(keep))
        ctx.p, ctx.width = p, x.shape[-1]
        return F.linear(x * keep * (1.0 / (1.0 - p)), weight)  # (..., r)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, packed = ctx.saved_tensors
        keep = unpack_mask(packed, ctx.width)  # (..., in) bool
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


def dropout_then_project(x: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:
    """``dropout(x, p) @ weight.T`` in training, drawing the mask from torch's global RNG."""
    return _DropoutThenProject.apply(x, weight, p, keep_mask(x.shape, p, x.device))


class LoraLayer(AdapterLayer):
    """Common state of every LoRA wrapper: the frozen ``base_layer`` and per-adapter factors.

    A layer type supplies :meth:`update` (one adapter's term), :meth:`factors` and, when its
    down-projection is not a matmul over the last dim, :meth:`rowwise_update`.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
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

    # --- adapter bookkeeping -------------------------------------------------------------
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
        """``init=False`` keeps the factor layers' own Kaiming-uniform draws (as PEFT does: one
        seed, one random adapter in both libraries); otherwise A is redrawn and B zeroed."""
        if init is False:
            return
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        with torch.no_grad():
            if self.lora_bias.get(name):
                nn.init.zeros_(self.lora_B[name].bias)
            if init == "gaussian":
                nn.init.normal_(A, std=1.0 / self.r[name])
            else:
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))
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
        return base.dequantize() if isinstance(base, QuantizedLinear) else base.weight

    def _add_to_base_weight(self, delta: torch.Tensor) -> None:
        base = self.base_layer
        if isinstance(base, QuantizedLinear):
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
        """Both drawn N(0, 1); unless ``init=False``, A zeroed and B drawn again (PEFT's draws,
        so one seed gives both libraries one adapter)."""
        A, B = self.lora_embedding_A[name], self.lora_embedding_B[name]
        with torch.no_grad():
            nn.init.normal_(A)
            nn.init.normal_(B)
            if init is not False:
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
        return conv_rowwise_update(self._conv_fn, self.base_layer, x, down, up, slots)


def conv_rowwise_update(
    conv: Any,
    base: nn.Module,
    x: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    slots: torch.Tensor,
) -> torch.Tensor:
    """A mixed batch through a convolution's stacked factors: row ``b`` convolved with its own
    ``down`` kernel (stride/padding/dilation of ``base``) in one grouped convolution (groups =
    rows), then its own ``up``. ``down`` (n, r, in, *k), ``up`` (n, out, r), ``slots`` (B,)."""
    n_rows, r = x.shape[0], down.shape[1]
    weight = down[slots].flatten(0, 1)  # (B*r, in, *k)
    x_all = x.to(down.dtype).flatten(0, 1).unsqueeze(0)  # (1, B*in, *S)
    h = conv(x_all, weight, None, base.stride, base.padding, base.dilation, groups=n_rows)
    # h: (1, B*r, *S')
    h = h.view(n_rows, r, *h.shape[2:])  # (B, r, *S')
    return torch.einsum("br...,bor->bo...", h, up[slots])  # (B, out, *S')
