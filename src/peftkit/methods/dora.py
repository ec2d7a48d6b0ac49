"""DoRA: weight-decomposed low-rank adaptation (Liu et al., 2024), used by the LoRA layers.

The adapted weight is split into a trainable magnitude ``m`` and a direction::

    W' = m * (W + s B A) / ||W + s B A||_c            s = alpha / r, ||.||_c one norm per output

``m`` starts at ``||W + s B A||_c`` (``||W||_c`` for a fresh adapter, where ``B = 0``), so a new
adapter leaves the model unchanged. (Grouped convolutions: PEFT 0.21 takes the norm of a
re-reading of B A's values, not of the update; :meth:`LoraConv.dora_norm_delta` copies it.) As in the paper (section 4.3) and PEFT, the norm
``n = ||W + s B A||_c`` is a constant in backward: gradients reach ``m``, ``A`` and ``B``, not the
norm. The layer never forms ``W'`` in forward::

    Linear / Conv:  y = base(x) + (m/n - 1) * W x + (m/n) * s B A x     (W x without the bias)
    Embedding:      y = (m/n) * (E[ids] + s A.T[ids] B.T)                (n per embedding dim)

A layer supplies ``dora_axis`` (the axis of its base weight that ``m`` runs along: the output
rows of a Linear/Conv, the embedding dims of an Embedding), ``dora_out_axis`` (the same axis in
its output), ``dora_scales_output`` (True for an Embedding), ``base_op(x)`` (``W x`` without bias) and ``project(name, x)`` (``s B A x``, no
dropout). Merging writes ``W' `` into the base weight and keeps ``m / n`` to undo it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .lora import LoraLayer


def column_norm(weight: torch.Tensor, axis: int) -> torch.Tensor:
    """L2 norm over every axis of ``weight`` but ``axis``: shape ``(weight.shape[axis],)``."""
    dims = [d for d in range(weight.dim()) if d != axis % weight.dim()]
    return torch.linalg.vector_norm(weight, dim=dims)


def along(vector: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    """``vector`` (n,) viewed to broadcast along ``axis`` of an ``ndim``-dim tensor."""
    shape = [1] * ndim
    shape[axis] = -1
    return vector.reshape(shape)


def adapted_norm(layer: LoraLayer, name: str) -> torch.Tensor:
    """``n = ||W + s B A||_c`` (n,), detached (a constant in backward)."""
    with torch.no_grad():
        weight = layer._base_weight()
        adapted = weight + layer.dora_norm_delta(name).to(weight.dtype)
        return column_norm(adapted.float(), layer.dora_axis).to(weight.dtype)


def init_magnitude(layer: LoraLayer, name: str) -> torch.Tensor:
    """``m`` at creation, in PEFT's stored shape: (n,) or (1, out, 1, ...) for convolutions."""
    norm = adapted_norm(layer, name)
    if layer.dora_out_axis == 1:  # convolutions: PEFT keeps (1, out, 1, ...)
        return along(norm, 1, layer._base_weight().dim()).clone()
    return norm.clone()


def magnitude_scale(layer: LoraLayer, name: str) -> torch.Tensor:
    """``m / n`` (n,)."""
    magnitude = layer.lora_magnitude_vector[name].reshape(-1)
    return magnitude / adapted_norm(layer, name).to(magnitude.dtype)


def forward(layer: LoraLayer, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """``result`` (the base output) plus adapter ``name``'s DoRA term."""
    scale = magnitude_scale(layer, name)
    if layer.dora_scales_output:  # Embedding: the looked-up rows are scaled as a whole
        scale = scale.to(result.dtype)
        return scale * result + scale * layer.project(name, x).to(result.dtype)
    if layer.training and layer.lora_dropout_p[name] > 0:
        return forward_plain(layer, name, x, result, scale)
    # No dropout: W x = result - b, so  result + (m/n - 1) W x + (m/n) s B A x
    #   = (m/n) result + (1 - m/n) b + (m/n) s B A x:  two fused passes over the output
    #   (addcmul) instead of five (mul, mul, mul, add, add); same maths, same saved tensors.
    axis, ndim = layer.dora_out_axis, result.dim()
    scale_out = along(scale, axis, ndim).to(result.dtype)
    bias = getattr(layer.base_layer, "bias", None)
    if bias is None:
        out = scale_out * result
    else:
        shift = along((1 - scale) * bias.to(scale.dtype), axis, ndim).to(result.dtype)
        out = torch.addcmul(shift, scale_out, result)
    return out.addcmul_(scale_out, layer.project(name, x).to(result.dtype))


def forward_plain(
    layer: LoraLayer, name: str, x: torch.Tensor, result: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """The DoRA term written out (with dropout: ``W dropout(x)`` is not ``result - b``)."""
    scale = along(scale, layer.dora_out_axis, result.dim()).to(result.dtype)
    p = layer.lora_dropout_p[name]
    if layer.training and p > 0:
        x = F.dropout(x, p)
        base = layer.base_op(x)  # W dropout(x): the base output was computed on the clean x
    else:
        bias = getattr(layer.base_layer, "bias", None)
        base = result if bias is None else result - along(bias, layer.dora_out_axis, result.dim())
    lora = layer.project(name, x).to(result.dtype)
    return result + (scale - 1) * base + scale * lora


def merge_factor(layer: LoraLayer, name: str, adapted: torch.Tensor) -> torch.Tensor:
    """``m / ||adapted||_c`` shaped to broadcast over the base weight's layout."""
    with torch.no_grad():
        norm = column_norm(adapted.float(), layer.dora_axis).to(adapted.dtype)
        magnitude = layer.lora_magnitude_vector[name].detach().reshape(-1).to(adapted.dtype)
        return along(magnitude / norm, layer.dora_axis, adapted.dim())
