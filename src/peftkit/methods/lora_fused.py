"""The LoRA linear layer as one autograd node: base matmul, adapter branch and their sum.

Same maths as :meth:`LoraLinear.update` added to the base output::

    y = x W^T + b + s B (A drop(x))^T                      drop: inverted dropout, keep 1 - p

but written so that no pass over the (N, out) output or the (N, in) input is spent on
bookkeeping (profiled on the SmolLM2-135M shape, 2 CPU cores: the LoRA matmuls at r=16 are ~4%
of the base's arithmetic, yet the plain path cost ~40% of the base's time, because every skinny
matmul and every elementwise op is a full pass over memory, and MKL's skinny sgemm is 2-3x
slower in some operand layouts than in others)::

    forward   y = x W^T (+ b)                                (the base matmul)
              h = drop(x) A_p^T          (N, r)              A_p = A / (1 - p): scale folded in
              y += h (s B)^T             addmm_: the add fused into the matmul
    backward  g_h = g (s B)              (N, r)              s B kept as a (r, out) copy
              g_x = g W  +=  g_h A_p     addmm_ (masked when dropout: g_x += mask * (g_h A_p))
              g_A = g_h^T drop(x) / (1 - p)    g_B = s (h^T g)^T     (r x out layout: fast)

Nothing but ``x`` (saved anyway), ``h`` (N, r) and, with dropout, the keep-mask at one bit per
element is kept for backward. The base weight is read through ``weight_fn`` in forward and again
in backward, so a 4-bit base is dequantised twice (into reusable scratch) and never saved, as
its own layer does (:func:`base_operands`).

:func:`fast_path_ok` says when a layer may take this path; anything unusual (autocast, hooks on
the base layer such as ZeRO-3's parameter gathering, DTensors, lora_bias, DoRA, several active
adapters, mixed batches, mismatched dtypes) takes the plain path, which stays the reference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module_hooks

from ..quant.linear4bit import QuantizedLinear
from .dropout_mask import keep_mask, pack_mask, unpack_mask


class _LoraLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        base_weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        A: torch.Tensor,
        B: torch.Tensor,
        weight_fn: Callable[[], torch.Tensor],
        scaling: float,
        p: float,
    ) -> torch.Tensor:
        in_f = x.shape[-1]
        x2 = x.reshape(-1, in_f)  # (N, in)
        W = weight_fn()  # (out, in)
        y = F.linear(x2, W, bias)  # (N, out)
        A_p = A if p == 0 else A * (1.0 / (1.0 - p))  # (r, in)
        packed = None
        if p > 0:
            keep = keep_mask(x2.shape, p, x.device)  # (N, in), the plain path's draw
            xd = x2 * keep  # (N, in); a dropped inf/nan gives nan, as in nn.Dropout
            packed = pack_mask(keep)  # (N, in/8)
        else:
            xd = x2
        h = xd @ A_p.T  # (N, r)
        sBt = (B.T * scaling).contiguous()  # (r, out): the fast operand layout for both uses
        y.addmm_(h, sBt)  # y += h (s B)^T
        ctx.save_for_backward(x2, A_p, sBt, h, packed)
        ctx.weight_fn, ctx.scaling, ctx.p, ctx.x_shape = weight_fn, scaling, p, x.shape
        ctx.has_bias = bias is not None
        return y.view(*x.shape[:-1], y.shape[-1])  # (..., out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x2, A_p, sBt, h, packed = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])  # (N, out)
        if g.stride(-1) != 1:
            g = g.contiguous()
        need_x, need_w, need_b, need_A, need_B = ctx.needs_input_grad[:5]
        g_h = g @ sBt.T  # (N, r)
        keep = unpack_mask(packed) if packed is not None else None  # (N, in) bool
        grad_x = grad_w = grad_bias = grad_A = grad_B = None
        if need_x:
            grad_x = g @ ctx.weight_fn()  # (N, in)
            if keep is None:
                grad_x.addmm_(g_h, A_p)  # += g_h A
            else:
                grad_x.addcmul_(g_h @ A_p, keep)  # += mask * (g_h A_p), one pass
            grad_x = grad_x.view(ctx.x_shape)
        if need_w:  # the base weight itself trains (unusual for LoRA, kept correct)
            grad_w = g.T @ x2  # (out, in)
        if need_b and ctx.has_bias:
            grad_bias = g.sum(0)
        if need_A:
            xd = x2 if keep is None else x2 * keep  # (N, in)
            grad_A = g_h.T @ xd  # (r, in), for A_p = A / (1 - p)
            if ctx.p > 0:
                grad_A = grad_A * (1.0 / (1.0 - ctx.p))
        if need_B:
            grad_B = (h.T @ g).T * ctx.scaling  # (out, r): h^T g is (r, out), the fast layout
        return grad_x, grad_w, grad_bias, grad_A, grad_B, None, None, None


def lora_linear(
    x: torch.Tensor,
    base_weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
    p: float,
    weight_fn: Callable[[], torch.Tensor],
) -> torch.Tensor:
    """``x W^T + b + scaling * B A dropout_p(x)`` (dropout only when ``p > 0``) as one node.

    ``base_weight`` is the base's trainable weight tensor when it has one (so a base weight that
    requires grad gets its gradient); ``weight_fn`` returns the weight (out, in) to multiply by.
    """
    if not torch.is_grad_enabled():
        return _lora_linear_no_grad(x, bias, A, B, scaling, p, weight_fn)
    if not (
        x.requires_grad
        or A.requires_grad
        or B.requires_grad
        or (base_weight is not None and base_weight.requires_grad)
        or (bias is not None and bias.requires_grad)
    ):
        with torch.no_grad():
            return _lora_linear_no_grad(x, bias, A, B, scaling, p, weight_fn)
    return _LoraLinearFn.apply(x, base_weight, bias, A, B, weight_fn, scaling, p)


def _lora_linear_no_grad(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
    p: float,
    weight_fn: Callable[[], torch.Tensor],
) -> torch.Tensor:
    """Inference: three ops (base matmul, down-projection, addmm_ of the up-projection)."""
    x2 = x.reshape(-1, x.shape[-1])  # (N, in)
    y = F.linear(x2, weight_fn(), bias)  # (N, out)
    h = F.linear(x2 if p == 0 else F.dropout(x2, p), A)  # (N, r)
    y.addmm_(h, B.T, alpha=scaling)
    return y.view(*x.shape[:-1], y.shape[-1])


_PLAIN_TYPES = (torch.Tensor, nn.Parameter)


def base_operands(
    base: nn.Module,
) -> tuple[torch.Tensor | None, Callable[[], torch.Tensor], torch.dtype] | None:
    """How the fused node reads ``base``'s weight: ``(trainable weight or None, weight_fn,
    the dtype it multiplies in)``, or None for a base layer it cannot read.

    An ``nn.Linear`` hands over its weight. A layer that builds its weight per call (a 4-bit
    layer's ``weight_for_matmul``: dequantised into reusable scratch, valid for one matmul)
    hands over that function, and the node calls it in forward and again in backward.
    """
    if type(base) is nn.Linear:
        weight = base.weight
        return weight, lambda: weight, weight.dtype
    if isinstance(base, QuantizedLinear):
        return None, base.weight_for_matmul, base.compute_dtype
    return None


def fast_path_operands(
    layer: nn.Module, name: str, x: torch.Tensor
) -> tuple[torch.Tensor | None, Callable[[], torch.Tensor], torch.Tensor, torch.Tensor] | None:
    """``(trainable base weight or None, weight_fn, A, B)`` when ``layer`` (a LoraLinear) may run
    adapter ``name`` through :func:`lora_linear`, else None.

    Called on every forward of every adapted layer: in greedy decoding (one token, a few
    microseconds of matmul per layer) these checks are a visible share of the step, so modules
    are read from ``_modules`` directly rather than through ``nn.Module.__getattr__``.
    """
    modules = layer._modules
    base = modules["base_layer"]
    operands = base_operands(base)
    if operands is None or layer.fan_in_fan_out:
        return None
    if (
        base._forward_hooks
        or base._forward_pre_hooks
        or base._backward_hooks
        or base._backward_pre_hooks
        or _module_hooks._global_forward_hooks
        or _module_hooks._global_forward_pre_hooks
    ):
        return None  # e.g. ZeRO-3 gathers the weight in a pre-forward hook
    if type(x) is not torch.Tensor or x.dim() < 2 or x.shape[-1] % 8:
        return None
    if torch.is_autocast_enabled(x.device.type):
        return None
    down, up = modules["lora_A"]._modules[name], modules["lora_B"]._modules[name]
    A, B = down.weight, up.weight
    W, b = operands[0], base.bias
    if up.bias is not None or type(A) not in _PLAIN_TYPES or type(B) not in _PLAIN_TYPES:
        return None
    if (W is not None and type(W) not in _PLAIN_TYPES) or (
        b is not None and (type(b) not in _PLAIN_TYPES or b.dtype != x.dtype)
    ):
        return None
    if not (x.dtype == operands[2] == A.dtype == B.dtype) or not x.is_floating_point():
        return None
    return W, operands[1], A, B
