"""AdaLoRA's rank allocator: score every singular triplet, shrink a global rank budget, mask the rest.

Each adapted matrix ``k`` holds ``r`` triplets ``(A[i, :], E[i], B[:, i])``. After an optimiser step
the allocator scores every trainable entry ``θ`` by its sensitivity ``I = |θ · ∇θ|``, smoothed::

    Ī_t = β1 Ī_{t-1} + (1 - β1) I_t                  (sensitivity, EMA)
    Ū_t = β2 Ū_{t-1} + (1 - β2) |I_t - Ī_t|          (uncertainty, EMA)
    s(θ) = Ī_t · Ū_t

and a triplet's score is ``s(E[i]) + mean_j s(A[i, j]) + mean_j s(B[j, i])``.

The budget (total kept triplets over all matrices) follows the paper's schedule::

    step <= tinit                      b = b0 = sum of initial ranks        (warm-up, no masking)
    tinit < step <= T - tfinal         b = bT + (b0 - bT) (1 - (step - tinit)/(T - tfinal - tinit))^3
    step > T - tfinal                  b = bT = target_r x (number of adapted matrices)

with ``T = total_step``. Every ``deltaT`` steps of the middle phase the ``b0 - b`` lowest-scoring
triplets get ``E[i] = 0``; the boolean keep-mask per matrix is the ``rank_pattern``, keyed as
PEFT keys it: ``<path>.lora_E.<adapter>`` in memory, ``<path>.lora_E`` in ``adapter_config.json``
(both spellings are read).

This module knows tensors only (``{path: (A, E, B)}``), not layers or models, so it can be tested on
its own. The arithmetic order follows the published algorithm step by step so that, from the same
gradients, masks agree bit for bit with HF PEFT's.
"""

from __future__ import annotations

import sys

import torch

# path of an adapted module -> its (A (r, in), E (r, 1), B (out, r)) parameters
Triplets = dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]

RANK_PATTERN_SUFFIX = ".lora_E"


def pattern_key(path: str, adapter_name: str | None = None) -> str:
    """``rank_pattern`` key of a module path, spelled as HF PEFT spells it.

    In memory (the allocator's output): ``<path>.lora_E.<adapter>``; in ``adapter_config.json``
    (``adapter_name=None``): ``<path>.lora_E``.
    """
    key = path + RANK_PATTERN_SUFFIX
    return f"{key}.{adapter_name}" if adapter_name else key


def module_path_of(key: str) -> str:
    """Inverse of :func:`pattern_key`: the module path of either spelling (or of a bare path)."""
    path, suffix, adapter = key.rpartition(RANK_PATTERN_SUFFIX)  # adapter: "" or ".<name>"
    return path if suffix and (not adapter or adapter.startswith(".")) else key


def saved_rank_pattern(pattern: dict[str, list[bool]] | None) -> dict[str, list[bool]] | None:
    """``pattern`` with PEFT's on-disk keys (``<path>.lora_E``, adapter name dropped)."""
    if pattern is None:
        return None
    return {pattern_key(module_path_of(k)): list(v) for k, v in pattern.items()}


def _full_grad(p: torch.Tensor) -> torch.Tensor | None:
    """``p.grad``, or under DeepSpeed ZeRO (which keeps gradients partitioned) the gathered one."""
    if p.grad is not None:
        return p.grad
    deepspeed = sys.modules.get("deepspeed")  # only when the run already uses it
    if deepspeed is None:
        return None
    try:
        return deepspeed.utils.safe_get_full_grad(p)
    except Exception:  # noqa: BLE001 - not a DeepSpeed-managed parameter
        return None


class RankAllocator:
    """Importance bookkeeping and budget masking for one trainable AdaLoRA adapter.

    Args:
        config: an ``AdaLoraConfig`` (reads ``init``/``target`` ranks, the schedule and the betas).
        triplets: the adapter's current ``{path: (A, E, B)}``; fixes the starting budget.
        adapter_name: ends the ``rank_pattern`` keys (``<path>.lora_E.<adapter>``, as PEFT's).
    """

    def __init__(self, config, triplets: Triplets, adapter_name: str = "default") -> None:
        self.config = config
        self.adapter_name = adapter_name
        if not triplets:
            raise ValueError("AdaLoRA found no adapted matrices to allocate ranks over")
        self.init_budget = sum(E.shape[0] for _, E, _ in triplets.values())
        self.target_budget = config.target_r * len(triplets)
        self.reset_ipt()

    def reset_ipt(self) -> None:
        """Forget the smoothed scores (done once the final pattern is fixed)."""
        self.sensitivity: dict[tuple[str, str], torch.Tensor] = {}  # Ī per (path, factor)
        self.uncertainty: dict[tuple[str, str], torch.Tensor] = {}  # Ū per (path, factor)

    # --- schedule ----------------------------------------------------------------------------
    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """``(budget, mask_now)`` at ``step``: full, then cubic decay, then ``target_r`` per matrix."""
        c = self.config
        if step <= c.tinit:
            return self.init_budget, False
        if step > c.total_step - c.tfinal:
            return self.target_budget, True
        progress = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        budget = int((self.init_budget - self.target_budget) * (progress**3) + self.target_budget)
        return budget, step % c.deltaT == 0

    # --- importance --------------------------------------------------------------------------
    @torch.no_grad()
    def update_ipt(self, triplets: Triplets) -> None:
        """Fold this step's ``|θ · ∇θ|`` into the sensitivity and uncertainty averages.

        Call after ``loss.backward()`` (gradients present) and before ``zero_grad()``.
        """
        tensors = [(path, f, t) for path, abe in triplets.items() for f, t in zip("AEB", abe)]
        grads = [_full_grad(t) for _, _, t in tensors]
        if all(g is None for g in grads):
            raise RuntimeError(
                "AdaLoRA update_and_allocate() found no gradients on the adapter: call it after "
                "loss.backward() and optimizer.step(), before optimizer.zero_grad()"
            )
        b1, b2 = self.config.beta1, self.config.beta2
        for (path, factor, p), grad in zip(tensors, grads):
            key = (path, factor)
            if key not in self.sensitivity or self.sensitivity[key].shape != p.shape:
                self.sensitivity[key] = torch.zeros_like(p)
                self.uncertainty[key] = torch.zeros_like(p)
            if grad is None:
                grad = torch.zeros_like(p)  # a module the batch did not reach: no signal
            ipt = (p * grad).abs()
            self.sensitivity[key] = b1 * self.sensitivity[key] + (1 - b1) * ipt
            self.uncertainty[key] = (
                b2 * self.uncertainty[key] + (1 - b2) * (ipt - self.sensitivity[key]).abs()
            )

    def _score(self, path: str, factor: str) -> torch.Tensor:
        return self.sensitivity[(path, factor)] * self.uncertainty[(path, factor)]

    def triplet_scores(self, triplets: Triplets) -> dict[str, torch.Tensor]:
        """``{path: (r,) score}``: ``s(E_i) + mean_j s(A_ij) + mean_j s(B_ji)``."""
        scores = {}
        for path in triplets:
            if (path, "E") not in self.sensitivity:
                raise RuntimeError(
                    f"no importance scores for {path} yet: update_and_allocate() must run on "
                    f"training steps before ranks can be allocated"
                )
            a = self._score(path, "A").mean(dim=1, keepdim=True)  # (r, 1)
            b = self._score(path, "B").mean(dim=0).view(-1, 1)  # (r, 1)
            ab = torch.cat([a, b], dim=1).sum(dim=1)  # (r,)
            scores[path] = self._score(path, "E").view(-1) + ab  # (r,)
        return scores

    # --- masking -----------------------------------------------------------------------------
    @torch.no_grad()
    def mask_to_budget(self, triplets: Triplets, budget: int) -> dict[str, list[bool]]:
        """Zero the singular values of all but the ``budget`` best triplets; return the keep-masks.

        Triplets whose score is <= the ``(init_budget - budget)``-th smallest are masked, so ties
        at the threshold are all masked.
        """
        scores = self.triplet_scores(triplets)
        n_drop = self.init_budget - budget
        if n_drop > 0:
            threshold = torch.kthvalue(torch.cat(list(scores.values())), k=n_drop)[0].item()
        else:
            threshold = float("-inf")
        pattern = {}
        for path, (_, E, _) in triplets.items():
            drop = scores[path] <= threshold  # (r,)
            E.masked_fill_(drop.view(-1, 1), 0.0)
            pattern[pattern_key(path, self.adapter_name)] = (~drop).tolist()
        return pattern

    @torch.no_grad()
    def mask_using_rank_pattern(self, triplets: Triplets, rank_pattern: dict[str, list[bool]]):
        """Re-apply a fixed keep-mask (the final phase: masked values must stay zero).

        Reads either key spelling (with or without the adapter name).
        """
        masks = {module_path_of(k): v for k, v in rank_pattern.items()}
        for path, (_, E, _) in triplets.items():
            keep = masks.get(path)
            if keep is None or len(keep) != E.shape[0]:
                continue  # layer already resized to its kept triplets: nothing left to mask
            drop = ~torch.tensor(keep, dtype=torch.bool, device=E.device)
            E.masked_fill_(drop.view(-1, 1), 0.0)

    def update_and_allocate(
        self, triplets: Triplets, step: int, force_mask: bool = False
    ) -> tuple[int, dict[str, list[bool]] | None]:
        """One allocation step: update scores (before the final phase) and mask when scheduled."""
        if step < self.config.total_step - self.config.tfinal:
            self.update_ipt(triplets)
        budget, mask_now = self.budget_schedule(step)
        if mask_now or force_mask:
            return budget, self.mask_to_budget(triplets, budget)
        return budget, None
