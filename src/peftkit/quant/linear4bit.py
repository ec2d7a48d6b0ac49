"""``Linear4bit``: a frozen linear layer whose weight is stored in 4 bits.

::

    x (..., in) --cast--> compute dtype --linear(x, W_hat, bias)--> y (..., out) --cast--> x.dtype
                                           ^
    packed_weight (in*out/2 bytes) + absmax stats --dequantize per call--> W_hat (out, in)

The dequantised weight lives only for the duration of one matmul: the matmul is torch's own
``F.linear``, and a saved-tensor hook hands autograd a reference to the layer in place of the
weight, so backward re-dequantises it (``grad_x = grad_y @ W_hat``) instead of keeping it, and
activation memory holds no full-precision copy of any base weight. Both dequantisations write
into one per-thread scratch pool (:class:`~peftkit.quant.scratch.ScratchPool`) reused by every
layer, so a step allocates no weight-sized temporaries at all. The weight itself gets no
gradient (QLoRA trains adapters on top); the bias, if present, can.

Why torch's own node and not a custom ``autograd.Function`` with the same two matmuls: measured
on SmolLM2-135M (batch 8, 7 steps, glibc malloc), the custom node's allocation order left
~40-190 MB more freed-but-resident holes in the heap at the step's peak than ``nn.Linear``'s,
for the same live tensors; torch's node with the hook gives ``nn.Linear``'s heap.

Every quantisation block must lie inside one output row (``in_features % blocksize == 0``):
bitsandbytes' kernels index blocks per row and silently misread blocks that straddle rows.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from ..heap import register_cache
from .bnb_compat import bnb_dequantize, use_bnb_for
from .nf4 import (
    SUPPORTED_BLOCKSIZES,
    SUPPORTED_DTYPES,
    QuantState4bit,
    dequantize_4bit,
    quantize_4bit,
)
from .scratch import ScratchPool

LINEAR_QUANT_TYPES = ("nf4", "fp4")
_FLOAT_STATS = ("absmax", "absmax_scales", "absmax_offset")


_THREAD = threading.local()


def _scratch() -> ScratchPool:
    """This thread's scratch pool for weights consumed by one matmul (autograd may run the
    backward of CUDA work on its own threads, hence one pool per thread)."""
    pool = getattr(_THREAD, "pool", None)
    if pool is None:
        pool = _THREAD.pool = ScratchPool()
    return pool


def _drop_scratch() -> None:
    """Drop this thread's scratch pool; the next 4-bit call builds a new one."""
    _THREAD.pool = None


register_cache(_drop_scratch)  # dropped where the trainer trims the heap (before the head)


class _RedequantisedInBackward(torch.autograd.graph.saved_tensors_hooks):
    """Within this context, autograd saves ``layer`` instead of ``weight`` (a scratch tensor)
    and unpacks it by dequantising again (``weight_for_matmul``), views included; every other
    saved tensor is kept as it is."""

    def __init__(self, layer: Linear4bit, weight: torch.Tensor) -> None:
        storage = weight.untyped_storage().data_ptr()
        base_offset = weight.storage_offset()

        def pack(t: torch.Tensor):
            if t.untyped_storage().data_ptr() != storage:
                return t
            # autograd saves W^T for grad_x = grad_y @ W: a view of the scratch buffer
            return (layer, t.shape, t.stride(), t.storage_offset() - base_offset)

        def unpack(packed):
            if isinstance(packed, torch.Tensor):
                return packed
            owner, shape, stride, offset = packed
            w = owner.weight_for_matmul()
            return w.as_strided(shape, stride, w.storage_offset() + offset)

        super().__init__(pack, unpack)


def _check_blocksize_fits(in_features: int, blocksize: int, name: str = "") -> None:
    if in_features % blocksize:
        where = f"layer {name!r} " if name else "a layer "
        divisors = [b for b in (16, 32, 64, 128, 256) if in_features % b == 0]
        hint = f"use blocksize={divisors[-1]}" if divisors else "leave it unquantised"
        raise ValueError(
            f"cannot quantise {where}with in_features={in_features}: it must be a multiple of "
            f"blocksize={blocksize} so no quantisation block spans two rows; {hint} or add the "
            "layer to skip_modules"
        )


def check_layer_args(
    quant_type: str,
    blocksize: int,
    compute_dtype: torch.dtype | None = None,
    weight_dtype: torch.dtype | None = None,
) -> None:
    """Raise a clear error for a quant_type / blocksize / dtype a Linear4bit cannot use."""
    if quant_type not in LINEAR_QUANT_TYPES:
        raise ValueError(f"quant_type={quant_type!r} is not supported; use 'nf4' or 'fp4'")
    if blocksize not in SUPPORTED_BLOCKSIZES:
        raise ValueError(
            f"blocksize={blocksize} is not supported; use one of {SUPPORTED_BLOCKSIZES}"
        )
    for label, dt in (("weight_dtype", weight_dtype), ("compute_dtype", compute_dtype)):
        if dt is not None and dt not in SUPPORTED_DTYPES:
            raise TypeError(
                f"{label}={dt} is not supported; use torch.float32, torch.bfloat16 or torch.float16"
            )


def check_weight(weight: torch.Tensor, name: str) -> None:
    """Raise a clear error for a weight that cannot be quantised (dtype, meta device)."""
    if weight.dtype not in SUPPORTED_DTYPES:
        hint = (
            "it looks already quantised"
            if not weight.dtype.is_floating_point
            else "cast the model to float32 or bfloat16 first"
        )
        raise TypeError(
            f"layer {name} has {weight.dtype} weights; only float32/float16/bfloat16 layers "
            f"can be quantised ({hint})"
        )
    if weight.device.type == "meta":
        raise ValueError(f"layer {name} is on the meta device; load its weights before quantising")


class QuantizedLinear(nn.Module):
    """A linear layer whose weight is stored quantised: the named interface adapters use.

    LoRA (merging, DoRA's norm, the fused training node) and target matching ask
    ``isinstance(layer, QuantizedLinear)`` and then these members, never probe for attributes::

        compute_dtype        the dtype the layer multiplies in
        dequantize()         the (out, in) weight as a tensor of its own
        weight_for_matmul()  the weight for one matmul, possibly in reusable scratch
        requantize_(weight)  store a new (out, in) weight (a merge into the quantised layer)
    """

    compute_dtype: torch.dtype

    def dequantize(self, scratch: ScratchPool | None = None) -> torch.Tensor:
        raise NotImplementedError

    def weight_for_matmul(self) -> torch.Tensor:
        raise NotImplementedError

    def requantize_(self, weight: torch.Tensor) -> None:
        raise NotImplementedError


class Linear4bit(QuantizedLinear):
    """Linear layer with NF4/FP4 weights, dequantised to ``compute_dtype`` on each call.

    Args:
        in_features, out_features: layer size (``in_features % blocksize == 0``).
        bias: whether the layer has a bias (kept in full precision).
        quant_type: "nf4" or "fp4".
        double_quant: quantise the per-block absmax to 8 bits.
        compute_dtype: dtype of the matmul (float32, bfloat16 or float16); defaults to
            ``weight_dtype``.
        blocksize: weights per absmax block.
        weight_dtype: dtype of the original weight; dequantisation rounds to it first (as
            bitsandbytes does), then casts to ``compute_dtype``.
        device: where to allocate the (zero) storage.

    Buffers: ``packed_weight`` (uint8), and either ``absmax`` (float32 per block) or, with double
    quantisation, ``absmax_codes`` (uint8 per block), ``absmax_scales`` (float32 per 256 blocks)
    and ``absmax_offset`` (float32 scalar). ``module.to(dtype)`` never casts these.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        quant_type: str = "nf4",
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
        blocksize: int = 64,
        weight_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        check_layer_args(quant_type, blocksize, compute_dtype, weight_dtype)
        _check_blocksize_fits(in_features, blocksize)
        self.in_features = in_features
        self.out_features = out_features
        self.quant_type = quant_type
        self.double_quant = double_quant
        self.blocksize = blocksize
        self.weight_dtype = weight_dtype
        self.compute_dtype = compute_dtype or weight_dtype
        self.from_conv1d = False  # set by from_linear: to_linear then rebuilds a Conv1D
        # Zero storage of the right shapes; load_state_dict or requantize_ fills it.
        n = in_features * out_features
        n_blocks = n // blocksize
        u8, f32 = dict(dtype=torch.uint8, device=device), dict(dtype=torch.float32, device=device)
        self.register_buffer("packed_weight", torch.zeros((n + 1) // 2, **u8))
        if double_quant:
            self.register_buffer("absmax_codes", torch.zeros(n_blocks, **u8))
            self.register_buffer("absmax_scales", torch.zeros(-(-n_blocks // 256), **f32))
            self.register_buffer("absmax_offset", torch.zeros((), **f32))
        else:
            self.register_buffer("absmax", torch.zeros(n_blocks, **f32))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=weight_dtype, device=device))
        else:
            self.register_parameter("bias", None)

    # ----------------------------------------------------------------------------- storage
    def _store_state(self, state: QuantState4bit) -> None:
        if state.double_quant:
            self.register_buffer("absmax_codes", state.absmax_codes)
            self.register_buffer("absmax_scales", state.absmax_scales)
            self.register_buffer("absmax_offset", state.absmax_offset)
        else:
            self.register_buffer("absmax", state.absmax_fp32)

    @property
    def quant_state(self) -> QuantState4bit:
        """A :class:`QuantState4bit` view of this layer's buffers (no copies)."""
        state = QuantState4bit(
            shape=torch.Size((self.out_features, self.in_features)),
            dtype=self.weight_dtype,
            blocksize=self.blocksize,
            quant_type=self.quant_type,
        )
        if self.double_quant:
            state.absmax_codes = self.absmax_codes
            state.absmax_scales = self.absmax_scales
            state.absmax_offset = self.absmax_offset
        else:
            state.absmax_fp32 = self.absmax
        return state

    def storage_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors that store the base weight (packed codes and statistics)."""
        return {"packed_weight": self.packed_weight, **self.quant_state.tensors()}

    def storage_bits_per_param(self) -> float:
        """Measured bits per weight element of the stored base weight (bias excluded)."""
        bits = sum(t.numel() * t.element_size() * 8 for t in self.storage_tensors().values())
        return bits / (self.in_features * self.out_features)

    def quantized_param_count(self) -> int:
        """Weight elements held in 4 bits (buffers, so ``parameters()`` does not count them)."""
        return self.in_features * self.out_features

    def _apply(self, fn, recurse=True):
        # Reinterpret the fp32 statistics as int32 while module-wide casts run, so
        # ``model.to(torch.bfloat16)`` / ``.half()`` move them without rounding them.
        for name in _FLOAT_STATS:
            if name in self._buffers:
                self._buffers[name] = self._buffers[name].view(torch.int32)
        try:
            return super()._apply(fn, recurse)
        finally:
            for name in _FLOAT_STATS:
                if name in self._buffers:
                    self._buffers[name] = self._buffers[name].view(torch.float32)

    # ------------------------------------------------------------------ the LoRA contract
    # (QuantizedLinear's members)
    def dequantize(self, scratch: ScratchPool | None = None) -> torch.Tensor:
        """The (out_features, in_features) weight in ``compute_dtype``.

        bitsandbytes' kernel does the work on CUDA when installed (see
        :func:`peftkit.quant.set_dequant_backend`); the result is the same either way.
        ``scratch``: build the weight in that pool's buffers (the result is then valid only
        until the pool's next use); ``None`` returns a tensor of its own.
        """
        state = self.quant_state
        if use_bnb_for(self.packed_weight.device):
            return bnb_dequantize(self.packed_weight, state).to(self.compute_dtype)
        return dequantize_4bit(self.packed_weight, state, self.compute_dtype, scratch)

    def weight_for_matmul(self) -> torch.Tensor:
        """The weight for one matmul, built in this thread's scratch pool: valid only until the
        next 4-bit layer's call. What LoRA's fused node reads in forward and again in backward."""
        return self.dequantize(scratch=_scratch())

    @torch.no_grad()
    def requantize_(self, weight: torch.Tensor) -> None:
        """Replace the stored weight by the 4-bit quantisation of ``weight`` (out, in)."""
        expected = (self.out_features, self.in_features)
        if tuple(weight.shape) != expected:
            raise ValueError(f"weight has shape {tuple(weight.shape)}, expected {expected}")
        w = weight.to(device=self.packed_weight.device, dtype=self.weight_dtype)
        packed, state = quantize_4bit(w, self.quant_type, self.blocksize, self.double_quant)
        self.packed_weight = packed
        self._store_state(state)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        quant_type: str = "nf4",
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
        blocksize: int = 64,
        name: str = "",
    ) -> Linear4bit:
        """Quantise an ``nn.Linear`` (or a transformers ``Conv1D``, whose weight is (in, out)).

        ``name`` only improves error messages.
        """
        bias = getattr(linear, "bias", None)
        if bias is not None:
            bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        return cls.from_weight(
            linear.weight,
            bias,
            quant_type,
            double_quant,
            compute_dtype,
            blocksize,
            name=name or type(linear).__name__,
            transposed=type(linear).__name__ == "Conv1D" and hasattr(linear, "nf"),
        )

    @classmethod
    @torch.no_grad()
    def from_weight(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        quant_type: str = "nf4",
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
        blocksize: int = 64,
        name: str = "",
        transposed: bool = False,
        weight_dtype: torch.dtype | None = None,
    ) -> Linear4bit:
        """Quantise a bare weight tensor (out, in) into a new layer on the weight's device.

        Used while loading a checkpoint tensor by tensor (:mod:`peftkit.quant.load`): no
        full-precision ``nn.Linear`` is ever built. ``transposed`` means ``weight`` is (in, out),
        as a transformers ``Conv1D`` stores it. ``bias`` is kept as given (as a Parameter).
        ``weight_dtype`` (default ``weight.dtype``) is the dtype the weight counts as: a bf16
        checkpoint tensor quantised as a float32 weight (the cast is exact, and is done a
        chunk at a time inside :func:`quantize_4bit` instead of on the whole tensor).
        """
        if transposed:
            weight = weight.t()
        check_weight(weight, name or "weight")
        out_features, in_features = weight.shape
        _check_blocksize_fits(in_features, blocksize, name)
        layer = cls(
            in_features,
            out_features,
            bias=False,
            quant_type=quant_type,
            double_quant=double_quant,
            compute_dtype=compute_dtype,
            blocksize=blocksize,
            weight_dtype=weight_dtype or weight.dtype,
            device="meta",  # placeholders only: the quantised tensors replace them below
        )
        packed, state = quantize_4bit(weight.detach(), quant_type, blocksize, double_quant)
        layer.packed_weight = packed
        layer._store_state(state)
        layer.from_conv1d = transposed
        if bias is not None:
            layer.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias)
        return layer

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Module:
        """A full-precision copy holding the dequantised weight: an ``nn.Linear``, or a
        transformers ``Conv1D`` (weight stored (in, out)) if the layer was quantised from one,
        so a de-quantised GPT-2 keeps its checkpoint layout.

        ``dtype`` defaults to the original weight dtype (the values are exactly those the
        4-bit layer computes with when ``compute_dtype`` equals it).
        """
        dtype = dtype or self.weight_dtype
        device = self.packed_weight.device
        with torch.no_grad():
            w = dequantize_4bit(self.packed_weight, self.quant_state).to(dtype)  # (out, in)
            if self.from_conv1d:
                from transformers.pytorch_utils import Conv1D

                layer = Conv1D(self.out_features, self.in_features).to(device=device, dtype=dtype)
                layer.weight.copy_(w.t())
                if self.bias is None:
                    layer.bias = None
            else:
                layer = nn.Linear(
                    self.in_features,
                    self.out_features,
                    bias=self.bias is not None,
                    device=device,
                    dtype=dtype,
                )
                layer.weight.copy_(w)
            if self.bias is not None:
                layer.bias.copy_(self.bias.to(dtype))
        layer.weight.requires_grad_(False)
        if self.bias is not None:
            layer.bias.requires_grad_(self.bias.requires_grad)
        return layer

    # --------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        x_c = x.to(self.compute_dtype)
        weight = self.weight_for_matmul()  # (out, in), valid until the next 4-bit layer's call
        if not torch.is_grad_enabled():
            return F.linear(x_c, weight, bias).to(x.dtype)
        with _RedequantisedInBackward(self, weight):
            y = F.linear(x_c, weight, bias)  # (..., out)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, quant_type={self.quant_type}, "
            f"double_quant={self.double_quant}, blocksize={self.blocksize}, "
            f"compute_dtype={self.compute_dtype}"
        )
