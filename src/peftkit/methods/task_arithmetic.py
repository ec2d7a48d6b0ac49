"""Combining task tensors: weighted sums with optional pruning and sign election.

Each function takes ``n`` tensors of one shape (one per adapter) and their weights, and returns
one tensor of that shape::

    linear            Σ w_i t_i                                         (task arithmetic)
    magnitude_prune   Σ w_i top_k(t_i)                                  k = density · numel
    ties              sign election over top_k(t_i), then the mean of the weighted values
                      that agree with the elected sign                  (TIES-merging)
    dare_linear       Σ w_i (m_i ⊙ t_i) / density                       m_i ~ Bernoulli(density)
    dare_ties         dare's random pruning, then ties' election and disjoint mean

Random pruning draws ``torch.bernoulli`` on the global generator, tensor by tensor in the order
given, as HF PEFT does, so a seed gives both libraries one mask. The majority sign is ``sign(Σ
t_i)`` (``"total"``) or the sign most tensors have (``"frequency"``), zero counting as positive.
"""

from __future__ import annotations

import warnings

import torch

PRUNING = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
COMBINERS = ("linear",) + PRUNING
SIGN_METHODS = ("total", "frequency")


def prune_magnitude(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density · numel)`` entries of largest magnitude, zero the rest."""
    keep = int(density * tensor.numel())
    flat = tensor.reshape(-1)
    mask = torch.zeros_like(flat)
    mask[torch.topk(flat.abs(), k=keep, largest=True).indices] = 1
    return tensor * mask.view_as(tensor)


def prune_random(tensor: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    """Keep each entry with probability ``density`` (``/ density`` when ``rescale``: DARE)."""
    kept = tensor * torch.bernoulli(torch.full_like(tensor, density))
    return kept / density if rescale else kept


def prune(tensor: torch.Tensor, density: float, random: bool) -> torch.Tensor:
    if density >= 1:
        warnings.warn(f"density={density} >= 1: nothing is pruned", stacklevel=3)
        return tensor
    if density < 0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    return (
        prune_random(tensor, density, rescale=True) if random else prune_magnitude(tensor, density)
    )


def majority_sign_mask(stacked: torch.Tensor, method: str = "total") -> torch.Tensor:
    """``(n, ...)`` -> bool ``(n, ...)``: where each tensor agrees with the elected sign."""
    sign = stacked.sign()
    if method == "total":
        weight = stacked.sum(dim=0)
    elif method == "frequency":
        weight = sign.sum(dim=0)
    else:
        raise ValueError(f"majority_sign_method must be one of {SIGN_METHODS}, got {method!r}")
    elected = torch.where(weight >= 0, 1, -1)  # (...)
    return sign == elected


def _weighted(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``(n, ...) * (n,)`` broadcast over the trailing dims."""
    return stacked * weights.view(-1, *[1] * (stacked.dim() - 1))


def combine(
    tensors: list[torch.Tensor],
    weights: torch.Tensor,
    how: str,
    density: float | None = None,
    majority_sign_method: str = "total",
) -> torch.Tensor:
    """One tensor from ``tensors`` weighted by ``weights`` (n,), combined as ``how`` says."""
    if how not in COMBINERS:
        raise ValueError(f"unknown combination {how!r}; use one of {COMBINERS}")
    if how in PRUNING:
        if density is None:
            raise ValueError(f"combination {how!r} prunes: pass density (the fraction kept, 0..1)")
        tensors = [prune(t, density, random=how.startswith("dare")) for t in tensors]
    stacked = torch.stack(tensors, dim=0)  # (n, ...)
    if how in ("ties", "dare_ties"):
        agree = majority_sign_mask(stacked, majority_sign_method)
        weighted = _weighted(stacked, weights) * agree
        return weighted.sum(dim=0) / agree.sum(dim=0).clamp(min=1.0)  # disjoint mean
    return _weighted(stacked, weights).sum(dim=0)
