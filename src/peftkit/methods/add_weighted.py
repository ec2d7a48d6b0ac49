"""``add_weighted_adapter``: a new adapter made from existing ones (HF PEFT's adapter arithmetic).

LoRA (``combination_type``), for adapters ``i`` with weights ``w_i`` and scalings ``s_i``::

    cat                  A = [w_1 s_1 A_1; w_2 s_2 A_2; ...]   B = [B_1, B_2, ...]   rank Σ r_i
                         (exactly Σ w_i s_i B_i A_i)
    linear, ties, dare_linear, dare_ties, magnitude_prune
                         A = comb({±sqrt|w_i s_i| A_i})       B = comb({sqrt|w_i s_i| B_i})
                         factor by factor (task_arithmetic.combine); the sign rides on A; all
                         ranks equal; an approximation of Σ w_i s_i B_i A_i
    svd, ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd
                         ΔW = comb({s_i B_i A_i}, w); B, A = the top svd_rank singular triplets
                         of ΔW (U·S, Vh), optionally clamped at the svd_clamp quantile

The new adapter's config is the first adapter's with ``r = lora_alpha = new rank`` (scaling 1),
the union of the targets and no rank/alpha patterns, and its layers are created (drawing their
initial values) before the factors are overwritten, all in PEFT's order: dare's random masks then
come from the generator in the same state, and one seed gives both libraries one adapter.

IA3: the new vectors are ``Σ_i w_i l_i`` on the union of the targets.

Where inputs do not combine the error says why (as PEFT's: unknown adapters, ranks that differ
under a rank-preserving combination, list and regex targets mixed, two adapters with their own
``modules_to_save`` copy of one module). peftkit also refuses, where PEFT would go on silently:
a name that exists (PEFT returns without doing anything), weights and adapters of different
lengths (PEFT drops the extra ones), DoRA / ``lora_bias`` adapters (PEFT drops the magnitude and
the bias), pruning without a density, and ``cat``/svd on grouped convolutions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import torch

from .task_arithmetic import COMBINERS, SIGN_METHODS, combine

SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
LORA_COMBINATIONS = ("cat",) + COMBINERS + SVD_TYPES


def _check_common(model: Any, adapters: list[str], weights: list[float], adapter_name: str) -> None:
    if adapter_name in model.peft_config:
        raise ValueError(
            f"an adapter named {adapter_name!r} already exists; pick a new name for the combined "
            f"adapter or delete_adapter({adapter_name!r}) first"
        )
    if not adapters:
        raise ValueError("add_weighted_adapter needs at least one adapter to combine")
    if len(weights) != len(adapters):
        raise ValueError(
            f"{len(adapters)} adapters but {len(weights)} weights; pass one weight per adapter"
        )
    unknown = [a for a in adapters if a not in model.peft_config]
    if unknown:
        raise ValueError(f"no adapter named {unknown[0]!r}; have {list(model.peft_config)}")
    for path, wrapper in model.save_wrappers():
        own = [a for a in adapters if a in wrapper.modules_to_save]
        if len(own) > 1:
            raise ValueError(
                f"adapters {own} each have their own modules_to_save copy of {path}, which cannot "
                f"be combined (as in PEFT); combine adapters where at most one trains {path}"
            )


def _union(values: list[Any], what: str) -> Any:
    """Targets of the new adapter: regex strings or-ed, lists united (PEFT's rule)."""
    kinds = {type(v) for v in values}
    if len(kinds) > 1:
        raise ValueError(
            f"the adapters' {what} mix a regex string and a list; combining them is not "
            f"supported (as in PEFT): give every adapter the same kind of {what}"
        )
    if isinstance(values[0], str):
        return "|".join(f"({v})" for v in values)
    return sorted(set().union(*(v or () for v in values)))


# --- LoRA ---------------------------------------------------------------------------------------
def add_weighted_lora(
    model: Any,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
) -> None:
    """Add ``adapter_name`` to ``model`` (an InjectedAdapterModel holding LoRA adapters)."""
    _check_common(model, adapters, weights, adapter_name)
    configs = [model.peft_config[a] for a in adapters]
    for name, config in zip(adapters, configs):
        for option in ("use_dora", "lora_bias", "target_parameters", "trainable_token_indices"):
            if getattr(config, option, None):
                raise ValueError(
                    f"adapter {name!r} uses {option}; add_weighted_adapter combines plain LoRA "
                    f"factors only (PEFT would drop or refuse that part)"
                )
    if combination_type not in LORA_COMBINATIONS:
        raise ValueError(
            f"invalid combination_type {combination_type!r}; use one of {LORA_COMBINATIONS}"
        )
    if majority_sign_method not in SIGN_METHODS:
        raise ValueError(f"majority_sign_method must be one of {SIGN_METHODS}")
    how = "linear" if len(adapters) == 1 else combination_type  # one adapter: a rescale
    pruning = how.removesuffix("_svd") not in ("svd", "linear", "cat")
    if pruning and density is None:
        raise ValueError(f"combination_type {how!r} prunes: pass density (the fraction kept)")
    ranks = [max(c.r, *c.rank_pattern.values()) if c.rank_pattern else c.r for c in configs]
    if how in COMBINERS:
        if len(set(ranks)) != 1:
            raise ValueError(
                f"combination_type {how!r} combines the factors entry by entry, so every "
                f"adapter needs the same r (got {dict(zip(adapters, ranks))}); use 'cat' or an "
                f"svd type for different ranks"
            )
        new_rank = ranks[0]
    elif how == "cat":
        new_rank = sum(ranks)
    else:
        new_rank = svd_rank or max(ranks)
    targets = _union([c.target_modules for c in configs], "target_modules")
    for path, layer in model.adapter_layers():
        if any(a in layer.adapter_names() for a in adapters):
            _check_layer(layer, path, how)
    new_config = dataclasses.replace(
        configs[0],
        r=new_rank,
        lora_alpha=new_rank,
        target_modules=targets,
        rank_pattern={},
        alpha_pattern={},
    )
    with _removed_on_error(model, adapter_name):
        model.add_adapter(adapter_name, new_config)  # draws the new factors' initial values
        for _, layer in model.adapter_layers():
            if adapter_name in layer.r:
                _fill_lora_layer(
                    layer,
                    adapter_name,
                    adapters,
                    weights,
                    how,
                    new_rank,
                    density=density,
                    majority_sign_method=majority_sign_method,
                    svd_clamp=svd_clamp,
                    svd_full_matrices=svd_full_matrices,
                    svd_driver=svd_driver,
                )


def _fill_lora_layer(
    layer: Any,
    adapter_name: str,
    adapters: list[str],
    weights: list[float],
    how: str,
    new_rank: int,
    **options: Any,
) -> None:
    """Overwrite ``adapter_name``'s factors in one layer with the combination (zero where no
    source adapter adapts this layer)."""
    density, sign_method = options["density"], options["majority_sign_method"]
    present = [(a, w) for a, w in zip(adapters, weights) if a in layer.r]
    A, B = _factors(layer, adapter_name)
    with torch.no_grad():
        A.zero_()
        B.zero_()
        if not present:
            return
        if how == "cat":
            new_A, new_B = _cat(layer, present)
        elif how in COMBINERS:
            new_A, new_B = _arithmetic(layer, present, how, density, sign_method)
        else:
            kind = {"svd": "linear"}.get(how, how.removesuffix("_svd"))
            delta = _svd_delta(layer, present, kind, density, sign_method)
            clamp, full, driver = (
                options[k] for k in ("svd_clamp", "svd_full_matrices", "svd_driver")
            )
            new_A, new_B = _svd_factors(layer, delta, new_rank, clamp, full, driver)
        A[: new_A.shape[0]] = new_A.to(A.dtype)
        B[:, : new_B.shape[1]] = new_B.to(B.dtype)


@contextlib.contextmanager
def _removed_on_error(model: Any, adapter_name: str) -> Iterator[None]:
    """A combination that fails half-way leaves no half-made adapter behind."""
    try:
        yield
    except BaseException:
        if adapter_name in model.peft_config:
            model.delete_adapter(adapter_name)
        raise


def _check_layer(layer: Any, path: str, how: str) -> None:
    from .lora import LoraConv, LoraEmbedding, LoraLinear

    if type(layer) not in (LoraLinear, LoraEmbedding, LoraConv):
        raise ValueError(
            f"{path}: add_weighted_adapter combines LoRA on linear, embedding and convolution "
            f"layers; {type(layer).__name__} is not supported"
        )
    groups = getattr(layer.base_layer, "groups", 1)
    if groups > 1 and (how == "cat" or how in SVD_TYPES):
        raise ValueError(
            f"{path}: a grouped convolution (groups={groups}) has no combined update for "
            f"{how!r} (its LoRA update does not fit the grouped weight); use 'linear' or a "
            f"pruning type, which combine the factors themselves"
        )


def _factors(layer: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` of one adapter: A (r, in, ...) / (r, num), B (out, r, ...) / (dim, r)."""
    if name in layer.lora_embedding_A:
        return layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    return layer.lora_A[name].weight, layer.lora_B[name].weight


def _cat(layer: Any, present: list[tuple[str, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``[w_i s_i A_i]`` stacked by rows, ``[B_i]`` by columns: exactly Σ w_i s_i B_i A_i."""
    As, Bs = [], []
    for adapter, weight in present:
        A, B = _factors(layer, adapter)
        As.append(A * weight * layer.scaling[adapter])
        Bs.append(B)
    return torch.cat(As, dim=0), torch.cat(Bs, dim=1)  # (Σr, ...), (out, Σr, ...)


def _arithmetic(
    layer: Any, present: list[tuple[str, float]], how: str, density, sign_method: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine A's and B's separately, each weighted by ``sqrt|w s|`` (the sign on A)."""
    As, Bs, wA, wB = [], [], [], []
    for adapter, weight in present:
        A, B = _factors(layer, adapter)
        ws = weight * layer.scaling[adapter]
        root = math.sqrt(abs(ws))
        wA.append(root if ws >= 0 else -root)
        wB.append(root)
        As.append(A.detach())
        Bs.append(B.detach())
    new_A = combine(As, torch.tensor(wA, device=As[0].device), how, density, sign_method)
    new_B = combine(Bs, torch.tensor(wB, device=Bs[0].device), how, density, sign_method)
    return new_A, new_B


def _svd_delta(
    layer: Any, present: list[tuple[str, float]], how: str, density, sign_method: str
) -> torch.Tensor:
    """The combined update ``comb({s_i B_i A_i}, w)``, laid out (out, in) for the SVD."""
    from .lora import LoraConv, LoraEmbedding

    deltas = [layer.delta_weight(a).detach() for a, _ in present]
    w = torch.tensor([w for _, w in present], device=deltas[0].device)
    delta = combine(deltas, w, how, density, sign_method)
    if isinstance(layer, LoraConv):
        return delta.flatten(1)  # (out, in · prod(k))
    if isinstance(layer, LoraEmbedding) or layer.fan_in_fan_out:
        return delta.T  # the stored (num, dim) / (in, out) back to (out, in)
    return delta


def _svd_factors(
    layer: Any, delta: torch.Tensor, rank: int, clamp, full_matrices: bool, driver
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors of ``delta`` (out, in): ``A = Vh[:r]``, ``B = U[:, :r] S``."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    rank = min(rank, S.numel())  # a rank above min(out, in) has nothing more to keep
    U = U[:, :rank] @ torch.diag(S[:rank])  # (out, r)
    Vh = Vh[:rank, :]  # (r, in)
    if clamp is not None:
        limit = torch.quantile(torch.cat([U.flatten(), Vh.flatten()]), clamp)
        U, Vh = U.clamp(-limit, limit), Vh.clamp(-limit, limit)
    A, B = _factors(layer, next(iter(layer.r)))
    # the new adapter's rows / columns past min(out, in) stay zero
    return Vh.reshape(rank, *A.shape[1:]), U.reshape(B.shape[0], rank, *B.shape[2:])


# --- IA3 ----------------------------------------------------------------------------------------
def add_weighted_ia3(
    model: Any, adapters: list[str], weights: list[float], adapter_name: str
) -> None:
    """Add ``adapter_name`` whose vectors are ``Σ_i weights[i] · l_i`` (an IA3Model)."""
    _check_common(model, adapters, weights, adapter_name)
    configs = [model.peft_config[a] for a in adapters]
    targets = _union([c.target_modules for c in configs], "target_modules")
    feedforward = _union([c.feedforward_modules for c in configs], "feedforward_modules")
    new_config = dataclasses.replace(
        configs[0], target_modules=targets, feedforward_modules=feedforward
    )
    for path, layer in model.adapter_layers():  # each layer keeps one side: input or output
        sides = {a: layer.is_feedforward[a] for a in adapters if a in layer.ia3_l}
        if sides and set(sides.values()) != {new_config.is_feedforward(path)}:
            raise ValueError(
                f"{path}: the adapters scale different sides of this layer (feed-forward, i.e. "
                f"input: {sides}; the combined adapter would scale the "
                f"{'input' if new_config.is_feedforward(path) else 'output'}), so their vectors "
                f"cannot be summed. Give the adapters the same feedforward_modules"
            )
    with _removed_on_error(model, adapter_name):
        model.add_adapter(adapter_name, new_config)  # draws the new vectors, as PEFT does
        for _, layer in model.adapter_layers():
            if adapter_name not in layer.ia3_l:
                continue
            target = layer.ia3_l[adapter_name]
            with torch.no_grad():
                target.zero_()
                for adapter, weight in zip(adapters, weights):
                    if adapter in layer.ia3_l:
                        target += layer.ia3_l[adapter] * weight
