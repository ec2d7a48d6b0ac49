"""LoKr: a Kronecker product as the weight update (LyCORIS; KronA, Edalati et al.).

The weight's output and input sizes are each split into two factors, ``out = a · b`` and
``in = c · d`` (:func:`factorization`), and the update is the Kronecker product of a small
``(a, c)`` matrix and a ``(b, d)`` one::

    ΔW = (alpha / r) · W1 ⊗ W2          W1 (a, c)   W2 (b, d)      ΔW (a·b, c·d) = (out, in)
    y  = op(x, W + ΔW)                  (lycoris.LycorisLayer: one product)

Either factor is itself low-rank when that is smaller, as in PEFT:

* ``W1 = lokr_w1_a (a, r) @ lokr_w1_b (r, c)`` with ``decompose_both`` and ``r < max(a, c) / 2``,
  else the full ``lokr_w1 (a, c)``;
* ``W2 = lokr_w2_a (b, r) @ lokr_w2_b (r, d)`` when ``r < max(b, d) / 2``, else ``lokr_w2``.

Convolutions (weight ``(out, in/g, *k)``, the factors split ``out`` and ``in/g``): a full ``W2``
carries the kernel, ``(b, d, *k)``; a low-rank one folds it into ``lokr_w2_b (r, d · prod(k))``,
or with ``use_effective_conv2d`` (kernel larger than 1) keeps it in a CP core
``lokr_t2 (r, r, k1, k2)`` with ``lokr_w2_a (r, b)``, ``lokr_w2_b (r, d)``. ``torch.kron`` then
pads the 2-d ``W1`` to ``W2``'s rank, and the product is read in the weight's shape, exactly as
PEFT does (so a saved adapter means the same in both libraries).

Initialisation (``init_weights``): ``True`` zeroes ``W1`` (or ``lokr_w1_a``) and draws the rest
Kaiming-uniform; ``"lycoris"`` zeroes ``W2`` (or ``lokr_w2_b``) instead; ``False`` draws all.
``rank_dropout_scale`` divides the rows that rank dropout keeps by the fraction kept.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
from torch import nn

from ..config import PeftType
from .lycoris import LycorisConfig, LycorisLayer, LycorisModel, kaiming_


@dataclasses.dataclass
class LoKrConfig(LycorisConfig):
    """LoKr hyper-parameters, HF PEFT's names and meaning (see :class:`LycorisConfig`).

    Attributes:
        decompose_both: make ``W1`` low-rank too (when ``r < max(a, c) / 2``).
        decompose_factor: split each size as ``(f, size / f)`` when ``f`` divides it, else near
            ``f``; ``-1``: as close to the square root as the divisors allow.
        rank_dropout_scale: rescale the rows rank dropout keeps (off by default, as in PEFT).
        init_weights: ``True``, ``False`` or ``"lycoris"`` (see the module docstring).
    """

    peft_type = PeftType.LOKR
    _INITS: ClassVar[tuple] = (True, False, "lycoris")

    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False


def factorization(size: int, factor: int = -1) -> tuple[int, int]:
    """Split ``size`` into ``(m, n)`` with ``m · n = size``, PEFT's (LyCORIS's) rule.

    ``factor`` > 0 dividing ``size``: ``(factor, size // factor)`` as is. Otherwise the divisors
    of ``size`` are walked upwards from 1, each taken while it is at most ``factor`` (``-1``: no
    bound), until one reaches the square root; the result is ordered small-first. Examples:
    ``256 -> (16, 16)``, ``128 -> (8, 16)``, ``127 -> (1, 127)``, ``(128, 4) -> (4, 32)``,
    ``(20, 3) -> (2, 10)``.
    """
    if factor > 0 and size % factor == 0:
        return factor, size // factor
    bound = size if factor == -1 else factor
    m = 1
    for d in range(2, size + 1):
        if m >= size // m:  # reached the square root
            break
        if size % d:
            continue
        if d > bound:
            break
        m = d
    n = size // m
    return min(m, n), max(m, n)


class LoKrLayer(LycorisLayer):
    """LoKr on ``nn.Linear``, ``nn.Conv1d`` or ``nn.Conv2d`` (grouped too)."""

    containers = (
        "lokr_w1",
        "lokr_w1_a",
        "lokr_w1_b",
        "lokr_w2",
        "lokr_w2_a",
        "lokr_w2_b",
        "lokr_t2",
    )

    def create(self, name: str, r: int, config: LoKrConfig) -> None:
        base = self.base_layer
        if isinstance(base, nn.Linear):
            fan_in, kernel = base.in_features, ()
        else:
            fan_in, kernel = base.in_channels // base.groups, tuple(base.kernel_size)
        a, b = factorization(base.weight.shape[0], config.decompose_factor)  # out = a · b
        c, d = factorization(fan_in, config.decompose_factor)  # in = c · d
        full_w1 = not (config.decompose_both and r < max(a, c) / 2)
        full_w2 = not r < max(b, d) / 2
        effective = config.use_effective_conv2d and math.prod(kernel) > 1
        if full_w1:
            w1 = [self.put("lokr_w1", name, a, c)]
        else:
            w1 = [self.put("lokr_w1_a", name, a, r), self.put("lokr_w1_b", name, r, c)]
        if full_w2:
            w2 = [self.put("lokr_w2", name, b, d, *kernel)]
        elif effective:
            core = kernel + (1,) * (2 - len(kernel))  # Conv1d's k as (k, 1)
            w2 = [self.put("lokr_w2_a", name, r, b), self.put("lokr_w2_b", name, r, d)]
            w2.append(self.put("lokr_t2", name, r, r, *core))
        else:
            w2 = [
                self.put("lokr_w2_a", name, b, r),
                self.put("lokr_w2_b", name, r, d * math.prod(kernel)),
            ]
        # PEFT's draw order: W1's factors, W2's, then the core; which one starts at zero
        zero = {True: w1[0], "lycoris": w2[1] if len(w2) > 1 else w2[0]}.get(config.init_weights)
        with torch.no_grad():
            for param in w1 + w2:
                if param is zero:
                    nn.init.zeros_(param)
                else:
                    kaiming_(param)

    def raw_delta(self, name: str) -> torch.Tensor:
        if name in self.lokr_w1:
            w1 = self.lokr_w1[name]  # (a, c)
        else:
            w1 = self.lokr_w1_a[name] @ self.lokr_w1_b[name]  # (a, c)
        if name in self.lokr_w2:
            w2 = self.lokr_w2[name]  # (b, d, *k)
        elif name in self.lokr_t2:  # Σ_ij t[i, j] a[i, p] b[j, q]: (b, d, k1, k2)
            t, wa, wb = self.lokr_t2[name], self.lokr_w2_a[name], self.lokr_w2_b[name]
            w2 = torch.einsum("ijkl,ip,jq->pqkl", t, wa, wb)
        else:
            w2 = self.lokr_w2_a[name] @ self.lokr_w2_b[name]  # (b, d · prod(k))
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]  # (a, c, 1, 1)
        # canonical strides: an einsum result with size-1 dims can be "contiguous" with strides
        # torch.kron cannot view (PEFT 0.21.2 fails there: LoKr CP form with r=1 on a Conv1d)
        w2 = w2.contiguous().reshape(-1).view(w2.shape)
        return torch.kron(w1, w2) * self.scaling[name]


class LoKrModel(LycorisModel):
    """PEFT's ``LoKrModel``: injects :class:`LoKrLayer` wrappers."""

    prefix = "lokr_"
    layer_cls = LoKrLayer
    saved_dict_names = LoKrLayer.containers
    method = "LoKr"
