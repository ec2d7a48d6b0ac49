"""LoHa: a low-rank Hadamard product as the weight update (LyCORIS; FedPara, Hyeon-Woo et al.).

For a frozen weight ``W`` (out x in) LoHa learns two rank-``r`` pairs and multiplies their
products element-wise::

    ΔW = (alpha / r) · (A1 B1) ⊙ (A2 B2)        A1, A2 (out, r)   B1, B2 (r, in)
    y  = op(x, W + ΔW)                          (lycoris.LycorisLayer: one product)

The element-wise product of two rank-``r`` matrices can reach rank ``r²``, so LoHa gets a fuller
update than LoRA for the same ``2 r (out + in)`` values. ``B2`` starts at zero (a fresh adapter
changes nothing; PEFT's He init for the rest).

Convolutions (weight ``(out, in/g, *k)``): by default the kernel folds into the input side, ``B``
is ``(r, in/g · prod(k))``. With ``use_effective_conv2d`` (kernel larger than 1) each pair keeps
its kernel in a small core ``T`` (CP form, FedPara's "Proposition 3")::

    W_i[p, q, k, l] = Σ_ab  A_i[a, p] · B_i[b, q] · T_i[a, b, k, l]     A (r, out), B (r, in/g),
                                                                        T (r, r, k1, k2)
    ΔW = (alpha / r) · W_1 ⊙ W_2                 (Conv1d: T (r, r, k, 1), read as (out, in/g, k))

On disk and in memory the tensors carry PEFT's names: ``hada_w1_a`` (A1), ``hada_w1_b`` (B1),
``hada_w2_a``, ``hada_w2_b``, ``hada_t1``, ``hada_t2``.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from ..config import PeftType
from .lycoris import LycorisConfig, LycorisLayer, LycorisModel, kaiming_


@dataclasses.dataclass
class LoHaConfig(LycorisConfig):
    """LoHa hyper-parameters, HF PEFT's names and meaning (see :class:`LycorisConfig`)."""

    peft_type = PeftType.LOHA


class _HadamardDelta(torch.autograd.Function):
    """``s · (A1 B1) ⊙ (A2 B2)`` that keeps the four factors for backward, not the two
    weight-sized products (recomputed there: two small matmuls per layer instead of
    ``2 · out · in`` values held per adapted layer until backward)."""

    @staticmethod
    def forward(ctx, a1, b1, a2, b2, scale: float) -> torch.Tensor:
        ctx.save_for_backward(a1, b1, a2, b2)
        ctx.scale = scale
        return (a1 @ b1) * (a2 @ b2) * scale  # (out, in)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a1, b1, a2, b2 = ctx.saved_tensors
        grad = grad * ctx.scale  # (out, in)
        g1 = grad * (a2 @ b2)  # d/d(A1 B1)
        g2 = grad * (a1 @ b1)  # d/d(A2 B2)
        return g1 @ b1.T, a1.T @ g1, g2 @ b2.T, a2.T @ g2, None


def _cp_weight(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``W[p, q, k, l] = Σ_ab a[a, p] b[b, q] t[a, b, k, l]``: (r, r, k1, k2) -> (out, in, k1, k2)."""
    return torch.einsum("abkl,ap,bq->pqkl", t, a, b)


class LoHaLayer(LycorisLayer):
    """LoHa on ``nn.Linear``, ``nn.Conv1d`` or ``nn.Conv2d`` (grouped too)."""

    containers = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")

    def create(self, name: str, r: int, config: LoHaConfig) -> None:
        base = self.base_layer
        out = base.weight.shape[0]
        if isinstance(base, nn.Linear):
            fan_in, kernel = base.in_features, ()
        else:
            fan_in, kernel = base.in_channels // base.groups, tuple(base.kernel_size)
        # as in PEFT: a 1-wide kernel is a matmul, the CP form would only add a reshape
        effective = config.use_effective_conv2d and math.prod(kernel) > 1
        if effective:
            core = kernel + (1,) * (2 - len(kernel))  # Conv1d's k as (k, 1)
            factors = [
                self.put("hada_w1_a", name, r, out),
                self.put("hada_w1_b", name, r, fan_in),
                self.put("hada_w2_a", name, r, out),
                self.put("hada_w2_b", name, r, fan_in),
                self.put("hada_t1", name, r, r, *core),
                self.put("hada_t2", name, r, r, *core),
            ]
        else:
            width = fan_in * math.prod(kernel)  # the kernel folded into the input side
            factors = [
                self.put("hada_w1_a", name, out, r),
                self.put("hada_w1_b", name, r, width),
                self.put("hada_w2_a", name, out, r),
                self.put("hada_w2_b", name, r, width),
            ]
        # PEFT's draw order (w1_a, w1_b, w2_a, w2_b, t1, t2); zero w2_b -> a zero update
        with torch.no_grad():
            for i, param in enumerate(factors):
                if i == 3 and config.init_weights:
                    nn.init.zeros_(param)
                else:
                    kaiming_(param)

    def raw_delta(self, name: str) -> torch.Tensor:
        s = self.scaling[name]
        a1, b1 = self.hada_w1_a[name], self.hada_w1_b[name]
        a2, b2 = self.hada_w2_a[name], self.hada_w2_b[name]
        if name in self.hada_t1:  # CP form: (out, in/g, k1, k2)
            w1 = _cp_weight(self.hada_t1[name], a1, b1)
            w2 = _cp_weight(self.hada_t2[name], a2, b2)
            return w1 * w2 * s
        return _HadamardDelta.apply(a1, b1, a2, b2, s)  # (out, in/g * prod(k))


class LoHaModel(LycorisModel):
    """PEFT's ``LoHaModel``: injects :class:`LoHaLayer` wrappers."""

    prefix = "hada_"
    layer_cls = LoHaLayer
    saved_dict_names = LoHaLayer.containers
    method = "LoHa"
