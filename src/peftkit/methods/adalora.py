"""AdaLoRA: LoRA in SVD form whose rank budget moves to the matrices that matter.

Each adapted weight ``W`` (out x in) gets ``P`` = ``lora_B`` (out x r), ``Λ`` = ``lora_E`` (r x 1,
the singular values, starting at zero) and ``Q`` = ``lora_A`` (r x in)::

    y = W x + (B (A ⊙ E) x) · scaling / (ranknum + 1e-5)        scaling = lora_alpha (or r if 0)

``ranknum`` stays the initial rank ``init_r`` for the life of the adapter (also after masking and
after a saved adapter is re-loaded at its reduced size), so a masked triplet simply drops out.

Training adds, as HF PEFT does, an orthogonality penalty that keeps ``P`` and ``Q`` near-orthogonal::

    loss += orth_reg_weight · mean over adapted A, B of  ‖A Aᵀ − I‖_F  and  ‖Bᵀ B − I‖_F

and, every optimiser step, ``update_and_allocate(step)`` scores the triplets and masks the least
important ones (:mod:`peftkit.methods.rank_allocator`). The final keep-masks become the config's
``rank_pattern``; ``save_pretrained`` writes only the kept triplets (PEFT's format), and loading
shrinks the layers to match before copying the tensors in.

Forgetting ``update_and_allocate`` silently trains a plain LoRA in PEFT. Here a global
``torch.optim`` step hook counts optimiser steps that touch the adapter; the next training forward
warns (once) when two have passed without an allocation call.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import pathlib
import warnings
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..checkpoint import atomic_write_text
from ..config import PeftType
from ..tuner import InjectedAdapterModel
from .adalora_report import final_ranks, plot_rank_heatmap, rank_report
from .lora import (
    LoraLayer,
    _linear_features,
    _reference_tensor,
    conv_rowwise_update,
    dropout_then_project,
)
from .lora_config import LoraConfig
from .rank_allocator import RankAllocator, Triplets, module_path_of, saved_rank_pattern

RANKNUM_EPS = 1e-5  # added to ranknum in the divisor, as PEFT does


@dataclasses.dataclass
class AdaLoraConfig(LoraConfig):
    """AdaLoRA hyper-parameters (HF PEFT's names and meaning) plus LoRA's targeting fields.

    Attributes:
        init_r: starting rank of every adapted matrix (``r`` is ignored).
        target_r: average final rank; the total budget shrinks to ``target_r`` x (matrices).
        tinit: warm-up steps at the full budget.
        tfinal: final steps at the fixed target budget (the pattern is frozen at
            ``total_step - tfinal``).
        deltaT: steps between two maskings during the cubic budget decay.
        beta1: EMA factor of the sensitivity ``|θ ∇θ|``.
        beta2: EMA factor of the uncertainty ``|I - Ī|``.
        orth_reg_weight: weight of the orthogonality penalty added to the training loss.
        total_step: the number of optimiser steps of the run (required).
        rank_pattern: ``{"<module path>.lora_E.<adapter>": [keep, ...]}``, written by the allocator
            (HF PEFT's keys; ``adapter_config.json`` drops the adapter name, as PEFT's does, and
            both spellings are read); a saved adapter holds only the kept triplets.
    """

    peft_type = PeftType.ADALORA

    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1  # noqa: N815  (HF PEFT's field name)
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict[str, list[bool]] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r != 8:
            warnings.warn(
                f"AdaLoRA ignores r={self.r}; the starting rank is init_r={self.init_r}",
                stacklevel=3,
            )
        if self.total_step is None or not isinstance(self.total_step, int) or self.total_step <= 0:
            raise ValueError(
                f"AdaLoRA needs total_step, the number of optimiser steps the run will take "
                f"(got {self.total_step!r}); its rank budget schedule is defined over it. Set e.g. "
                f"total_step=epochs * steps_per_epoch"
            )
        for name in ("init_r", "target_r", "deltaT"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"AdaLoRA {name} must be a positive integer, got {value!r}")
        for name in ("tinit", "tfinal"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"AdaLoRA {name} must be a non-negative integer, got {value!r}")
        if self.target_r > self.init_r:
            raise ValueError(
                f"target_r={self.target_r} > init_r={self.init_r}: AdaLoRA only removes rank. "
                f"Lower target_r or raise init_r"
            )
        if self.tinit + self.tfinal >= self.total_step:
            raise ValueError(
                f"tinit + tfinal = {self.tinit} + {self.tfinal} >= total_step={self.total_step}: "
                f"no steps are left for rank allocation. Lower tinit/tfinal or raise total_step"
            )
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise ValueError(f"AdaLoRA {name} must be in (0, 1), got {value!r}")
        if self.orth_reg_weight < 0:
            raise ValueError(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight!r}")
        if self.use_rslora:
            raise ValueError("AdaLoRA has no rank-stabilised scaling: set use_rslora=False")
        if self.alpha_pattern:
            warnings.warn("AdaLoRA ignores alpha_pattern (as HF PEFT does)", stacklevel=3)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; ``rank_pattern`` keys lose the adapter name (PEFT's file format)."""
        out = super().to_dict()
        out["rank_pattern"] = saved_rank_pattern(self.rank_pattern)
        return out

    def rank_for(self, module_name: str) -> int:
        """Every matrix starts at ``init_r`` (``rank_pattern`` here is a mask, not a rank table)."""
        return self.init_r

    def alpha_for(self, module_name: str) -> float:
        return self.lora_alpha


@functools.lru_cache(maxsize=64)
def _fp32_divisor(ranknum: float) -> float:
    return float(torch.tensor(ranknum, dtype=torch.float32) + RANKNUM_EPS)


class AdaLoraLayer(LoraLayer):
    """SVD-form adapter state: ``lora_A`` (r, in), ``lora_E`` (r, 1), ``lora_B`` (out, r) per name.

    The factors are bare parameters (``nn.ParameterDict``), so state-dict keys read
    ``...lora_A.<adapter>`` exactly as in HF PEFT.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()
        self.ranknum: dict[str, float] = {}  # init_r, fixed: the divisor of the update

    def add_adapter(self, name: str, config: AdaLoraConfig, module_name: str) -> None:
        """Create adapter ``name`` at rank ``init_r``.

        The random draws follow HF PEFT's order (A, E, B and ranknum drawn from N(0, 1), then A and
        B redrawn from N(0, 0.02²) with E zeroed), so one seed gives both libraries one adapter.
        """
        r = config.init_r
        alpha = config.lora_alpha
        self.module_name = module_name
        self.r[name] = r
        self.lora_alpha[name] = alpha
        self.scaling[name] = alpha if alpha > 0 else float(r)
        self.ranknum[name] = float(r)
        self.lora_dropout_p[name] = config.lora_dropout
        A = torch.randn(r, self.in_features)
        E = torch.randn(r, 1)
        B = torch.randn(self.out_features, r)
        torch.randn(1)  # PEFT draws its ranknum placeholder here; keep the streams aligned
        if config.init_lora_weights:
            E.zero_()
            A.normal_(0.0, 0.02)
            B.normal_(0.0, 0.02)
        self._set_factors(name, A, E, B)
        self.active_adapters = self.active_adapters or [name]

    def _set_factors(self, name: str, A: torch.Tensor, E: torch.Tensor, B: torch.Tensor) -> None:
        """Store the factors on the base layer's device (fp32 when the base is half precision)."""
        ref = _reference_tensor(self.base_layer)
        dtype = ref.dtype if ref.dtype in (torch.float32, torch.float64) else torch.float32
        for table, value in ((self.lora_A, A), (self.lora_E, E), (self.lora_B, B)):
            old = table[name] if name in table else None
            table[name] = nn.Parameter(
                value.to(device=ref.device, dtype=dtype),
                requires_grad=old.requires_grad if old is not None else True,
            )

    def resize(self, name: str, keep: list[bool]) -> None:
        """Keep only the triplets where ``keep`` is true (a saved adapter's size); ranknum stays."""
        idx = torch.tensor(keep, dtype=torch.bool, device=self.lora_E[name].device)
        with torch.no_grad():
            A, E, B = self.lora_A[name][idx], self.lora_E[name][idx], self.lora_B[name][:, idx]
        self.r[name] = int(idx.sum())
        self._set_factors(name, A, E, B)

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        if name in self.lora_E:
            del self.lora_E[name]
        self.ranknum.pop(name, None)

    def triplet(self, name: str) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter]:
        return self.lora_A[name], self.lora_E[name], self.lora_B[name]

    def rank_divisor(self, name: str) -> float:
        """``ranknum + 1e-5`` rounded to fp32, as PEFT computes it on its fp32 ``ranknum`` tensor."""
        return _fp32_divisor(self.ranknum[name])


class SVDLinear(AdaLoraLayer):
    """AdaLoRA on ``nn.Linear``, GPT-2's ``Conv1D`` (``fan_in_fan_out``) or a 4-bit linear layer."""

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = fan_in_fan_out
        self.in_features, self.out_features = _linear_features(base_layer)

    def delta_weight(self, name: str) -> torch.Tensor:
        """``B (A ⊙ E) · scaling / (ranknum + 1e-5)`` laid out like the base weight."""
        A, E, B = self.triplet(name)
        delta = B @ (A * E) * self.scaling[name] / self.rank_divisor(name)  # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def update(self, name: str, x: torch.Tensor) -> torch.Tensor:
        A, E, B = self.triplet(name)  # (r, in), (r, 1), (out, r)
        xa = x.to(A.dtype)
        AE = A * E  # (r, in)
        p = self.lora_dropout_p[name]
        if self.training and p > 0:
            h = dropout_then_project(xa, AE, p)  # (..., r)
        else:
            h = xa @ AE.T  # (..., r)
        return (h @ B.T) * self.scaling[name] / self.rank_divisor(name)  # (..., out)

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        A, E, B = self.triplet(name)
        return A * E, B * (self.scaling[name] / self.rank_divisor(name))

    def extra_repr(self) -> str:
        return ", ".join(
            f"{n}: r={self.r[n]}, init_r={self.ranknum[n]:g}, scaling={self.scaling[n]:g}"
            for n in self.r
        )


class SVDConv2d(AdaLoraLayer):
    """AdaLoRA on ``nn.Conv2d``: the kernel read as a matrix (out, in·kh·kw), as HF PEFT does::

        ΔW = (B (A ⊙ E) · scaling / (ranknum + 1e-5)).view(out, in, kh, kw)
        y  = conv(x, W) + conv(dropout(x), ΔW)        (the base's stride, padding, dilation)

    so ``A`` is (r, in·kh·kw) and the allocator scores it like a linear layer's. Grouped
    convolutions are refused (:func:`create_svd_layer`): ΔW mixes every input channel.
    """

    def __init__(self, base_layer: nn.Conv2d) -> None:
        super().__init__(base_layer)
        kh, kw = base_layer.kernel_size
        self.in_features = base_layer.in_channels * kh * kw  # A's columns: one per kernel tap
        self.out_features = base_layer.out_channels

    def delta_weight(self, name: str) -> torch.Tensor:
        A, E, B = self.triplet(name)  # (r, in*kh*kw), (r, 1), (out, r)
        delta = B @ (A * E) * self.scaling[name] / self.rank_divisor(name)  # (out, in*kh*kw)
        return delta.view(self.base_layer.weight.shape)  # (out, in, kh, kw)

    def update(self, name: str, x: torch.Tensor) -> torch.Tensor:
        delta = self.delta_weight(name)
        xa = x.to(delta.dtype)
        p = self.lora_dropout_p[name]
        if self.training and p > 0:
            xa = F.dropout(xa, p)
        base = self.base_layer
        out = F.conv2d(xa, delta, None, base.stride, base.padding, base.dilation)
        return out  # (B, out, H', W')

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A ⊙ E)`` as r kernels (r, in, kh, kw) and the scaled ``B`` (out, r)."""
        A, E, B = self.triplet(name)
        kernels = (A * E).view(A.shape[0], *self.base_layer.weight.shape[1:])  # (r, in, kh, kw)
        return kernels, B * (self.scaling[name] / self.rank_divisor(name))

    def rowwise_update(
        self, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, slots: torch.Tensor
    ) -> torch.Tensor:
        return conv_rowwise_update(F.conv2d, self.base_layer, x, down, up, slots)

    def extra_repr(self) -> str:
        return ", ".join(
            f"{n}: r={self.r[n]}, init_r={self.ranknum[n]:g}, scaling={self.scaling[n]:g}"
            for n in self.r
        )


def create_svd_layer(target: nn.Module, config: AdaLoraConfig) -> AdaLoraLayer:
    """Wrap a linear-like ``target`` in :class:`SVDLinear`, an ``nn.Conv2d`` in
    :class:`SVDConv2d`, or raise naming what is supported."""
    from ..inject import linear_fan_in_fan_out

    fan_in_fan_out = linear_fan_in_fan_out(target, config)
    if fan_in_fan_out is not None:
        return SVDLinear(target, fan_in_fan_out=fan_in_fan_out)
    if isinstance(target, nn.Conv2d):
        if target.groups > 1:
            raise ValueError(
                f"AdaLoRA cannot adapt a grouped nn.Conv2d (groups={target.groups}): its update "
                f"(out x in·kh·kw) mixes every input channel, which a grouped kernel cannot hold. "
                f"Use LoRA for this layer, or leave it out of target_modules"
            )
        return SVDConv2d(target)
    raise TypeError(
        f"AdaLoRA cannot adapt a {type(target).__name__}; supported: nn.Linear, transformers "
        f"Conv1D, nn.Conv2d and peftkit Linear4bit. Narrow target_modules to those layers"
    )


# --- forgotten update_and_allocate detection --------------------------------------------------
_WATCHED: weakref.WeakSet = weakref.WeakSet()
_HOOK_HANDLE = None


def _on_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Global post-step hook: count steps of optimisers that hold a watched adapter."""
    for tuner in list(_WATCHED):
        sentinel = tuner._sentinel_param()
        if sentinel is None:
            continue
        if any(p is sentinel for group in optimizer.param_groups for p in group["params"]):
            tuner._steps_since_allocation += 1


def _watch(tuner: AdaLoraModel) -> None:
    global _HOOK_HANDLE
    if _HOOK_HANDLE is None:
        _HOOK_HANDLE = register_optimizer_step_post_hook(_on_optimizer_step)
    _WATCHED.add(tuner)


MISSED_ALLOCATION_WARNING = (
    "AdaLoRA: {n} optimizer steps updated the adapter without "
    "model.base_model.update_and_allocate(global_step). Without it AdaLoRA never allocates ranks "
    "(it trains as a plain LoRA at init_r). Call it every step after optimizer.step() and before "
    "optimizer.zero_grad(); peftkit's trainer does this for you."
)


class AdaLoraModel(InjectedAdapterModel):
    """Injects :class:`SVDLinear` / :class:`SVDConv2d` layers, adds the orthogonality penalty, allocates ranks.

    Only one adapter trains at a time (others must be loaded with ``inference_mode=True``).
    """

    layer_cls = AdaLoraLayer
    saved_dict_names = ("lora_A", "lora_B", "lora_E")
    trainable_adapter_name: str | None = None
    rank_allocator: RankAllocator | None = None

    def __init__(self, model: nn.Module, config: AdaLoraConfig, adapter_name: str) -> None:
        super().__init__(model, config, adapter_name)
        self._steps_since_allocation = 0
        self._warned_missing_allocation = False
        _watch(self)

    def create_layer(self, target: nn.Module, config: AdaLoraConfig) -> nn.Module:
        return create_svd_layer(target, config)

    def add_adapter(self, adapter_name: str, config: AdaLoraConfig) -> None:
        """Inject adapter ``adapter_name``; a trainable one gets the rank allocator."""
        if not isinstance(config, AdaLoraConfig):
            raise TypeError(f"AdaLoraModel needs an AdaLoraConfig, got {type(config).__name__}")
        trainable = self.trainable_adapter_name
        if not config.inference_mode and trainable is not None and trainable in self.peft_config:
            raise ValueError(
                f"AdaLoRA trains one adapter at a time and {trainable!r} is trainable: add "
                f"{adapter_name!r} with inference_mode=True, or delete {trainable!r} first"
            )
        super().add_adapter(adapter_name, config)
        if not config.inference_mode:
            self.trainable_adapter_name = adapter_name
            self.rank_allocator = RankAllocator(config, self.triplets(adapter_name), adapter_name)

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise ValueError(
            "add_weighted_adapter does not combine AdaLoRA adapters (nor does PEFT): their "
            "ranks differ per matrix; combine LoRA or IA3 adapters"
        )

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if adapter_name == self.trainable_adapter_name:
            self.trainable_adapter_name = None
            self.rank_allocator = None

    # --- walking -------------------------------------------------------------------------------
    def triplets(self, adapter_name: str) -> Triplets:
        """``{module path: (A, E, B)}`` of one adapter, paths relative to the wrapped model."""
        return {
            path: layer.triplet(adapter_name)
            for path, layer in self.adapter_layers()
            if adapter_name in layer.lora_E
        }

    def _sentinel_param(self) -> nn.Parameter | None:
        """One parameter of the trainable adapter, to recognise optimisers that update it."""
        name = self.trainable_adapter_name
        if name is None or self.peft_config[name].inference_mode:
            return None
        for _, layer in self.adapter_layers():
            if name in layer.lora_E:
                return layer.lora_E[name]
        return None

    # --- training ------------------------------------------------------------------------------
    def forward(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """Run the model; in training add ``orth_reg_weight`` x the orthogonality penalty to the loss.

        HF PEFT adds the penalty whenever a loss is returned; peftkit adds it in training mode only,
        so evaluation losses (and perplexities) are the model's own. ``adapter_names`` runs a
        mixed-adapter batch (inference only), as for LoRA.
        """
        with self.mixed_batch(adapter_names):
            outputs = self.model(*args, **kwargs)
        loss = getattr(outputs, "loss", None)
        name = self.trainable_adapter_name
        if self.training and isinstance(loss, torch.Tensor) and name is not None:
            weight = self.peft_config[name].orth_reg_weight
            if weight > 0:
                outputs.loss = loss + weight * self.orthogonal_penalty(name)
        return outputs

    def orthogonal_penalty(self, adapter_name: str) -> torch.Tensor:
        """Mean over the adapter's A and B factors of ``‖A Aᵀ − I‖_F`` and ``‖Bᵀ B − I‖_F``."""
        total: torch.Tensor | float = 0.0
        count = 0
        for A, _, B in self.triplets(adapter_name).values():
            A, B = _whole(A), _whole(B)  # FSDP2 shards them (DTensors) outside their forward
            for gram in (A @ A.T, B.T @ B):  # (r, r) each
                eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
                total = total + torch.linalg.matrix_norm(gram - eye, ord="fro")
                count += 1
        return total / count if count else torch.zeros(())

    def check_training_step(self) -> None:
        """Called on every training forward: warn once when allocation calls are being skipped."""
        if self._warned_missing_allocation or self._steps_since_allocation < 2:
            return
        self._warned_missing_allocation = True
        warnings.warn(
            MISSED_ALLOCATION_WARNING.format(n=self._steps_since_allocation), stacklevel=4
        )

    def update_and_allocate(self, global_step: int) -> int:
        """Score the triplets and mask to the scheduled budget; returns the budget.

        Call after ``optimizer.step()`` and before ``optimizer.zero_grad()`` on every step, with the
        number of optimiser steps taken so far. At ``total_step - tfinal`` the pattern is frozen
        into ``config.rank_pattern``; later calls keep masked singular values at zero.
        """
        name = self.trainable_adapter_name
        if name is None or self.rank_allocator is None:
            raise ValueError(
                "no trainable AdaLoRA adapter: load it with is_trainable=True (or "
                "inference_mode=False) to continue training"
            )
        self._steps_since_allocation = 0
        config = self.peft_config[name]
        allocator = self.rank_allocator
        triplets = self.triplets(name)
        final_step = config.total_step - config.tfinal
        if global_step < final_step:
            budget, pattern = allocator.update_and_allocate(triplets, global_step)
            if pattern:
                config.rank_pattern = pattern
        elif global_step == final_step or config.rank_pattern is None:
            if not allocator.sensitivity:  # never scored (allocation started late): score now
                allocator.update_ipt(triplets)
            budget, pattern = allocator.update_and_allocate(triplets, global_step, force_mask=True)
            config.rank_pattern = pattern
            allocator.reset_ipt()
        else:
            budget = allocator.target_budget
            allocator.mask_using_rank_pattern(triplets, config.rank_pattern)
        return budget

    # --- resuming (the trainer saves this next to the optimiser state) ---------------------------
    def training_state_dict(self) -> dict[str, Any]:
        """What a resumed run needs beyond the weights: the score averages and the rank pattern.

        Plain tensors, lists and strings only, so it loads with ``torch.load(weights_only=True)``.
        """
        name = self.trainable_adapter_name
        alloc = self.rank_allocator
        if name is None or alloc is None:
            return {}
        config = self.peft_config[name]
        return {
            "adapter_name": name,
            "rank_pattern": copy.deepcopy(config.rank_pattern),
            "sensitivity": {f"{p}|{f}": t.clone() for (p, f), t in alloc.sensitivity.items()},
            "uncertainty": {f"{p}|{f}": t.clone() for (p, f), t in alloc.uncertainty.items()},
            "steps_since_allocation": self._steps_since_allocation,
        }

    def load_training_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`training_state_dict` into the trainable adapter."""
        if not state:
            return
        name = self.trainable_adapter_name
        if name is None or self.rank_allocator is None or state["adapter_name"] != name:
            raise ValueError(
                f"AdaLoRA training state is for adapter {state.get('adapter_name')!r} but the "
                f"trainable adapter here is {name!r}; resume with the same method config"
            )
        self.peft_config[name].rank_pattern = copy.deepcopy(state["rank_pattern"])
        alloc = self.rank_allocator
        alloc.reset_ipt()
        for table, saved in (
            (alloc.sensitivity, "sensitivity"),
            (alloc.uncertainty, "uncertainty"),
        ):
            for key, tensor in state[saved].items():
                path, factor = key.rsplit("|", 1)
                table[(path, factor)] = tensor.clone()
        self._steps_since_allocation = int(state.get("steps_since_allocation", 0))

    # --- run report (the trainer calls it on any adapted model that has one) ---------------------
    def write_run_report(self, folder: pathlib.Path, plots: bool) -> tuple[str, dict]:
        """Where the rank budget went: ``adalora_ranks.txt`` (and ``adalora_ranks.png`` with
        ``plots``) in ``folder``, for the active adapter.

        Returns:
            ``(table, summary)``: the rank table for the log, and ``{"ranks": {module path: rank},
            "kept": total rank, "mean_rank": rounded to 3 places}`` plus ``"heatmap"``: the PNG's
            path when plotted.
        """
        folder = pathlib.Path(folder)
        table = rank_report(self)
        atomic_write_text(str(folder / "adalora_ranks.txt"), table + "\n")
        ranks = final_ranks(self)
        summary: dict[str, Any] = {
            "ranks": ranks,
            "kept": sum(ranks.values()),
            "mean_rank": round(sum(ranks.values()) / max(len(ranks), 1), 3),
        }
        if plots:
            summary["heatmap"] = plot_rank_heatmap(self, folder / "adalora_ranks.png")
        return table, summary

    @property
    def rankallocator(self) -> RankAllocator | None:
        """HF PEFT's attribute name for :attr:`rank_allocator`."""
        return self.rank_allocator

    # --- saving and loading (tensors sliced to the rank pattern) --------------------------------
    def state_dict_for_save(self, state: dict, adapter_name: str) -> dict:
        """Keep only the triplets ``rank_pattern`` keeps (PEFT's on-disk AdaLoRA format)."""
        pattern = self.peft_config[adapter_name].rank_pattern
        for key, keep in (pattern or {}).items():
            prefix = "base_model.model." + module_path_of(key)
            idx = torch.tensor(keep, dtype=torch.bool)
            for factor, dim in (("lora_A", 0), ("lora_E", 0), ("lora_B", 1)):
                disk = f"{prefix}.{factor}"
                if disk not in state:
                    raise ValueError(
                        f"rank_pattern names {key!r} but the adapter has no {disk}: the "
                        f"pattern belongs to another model"
                    )
                tensor = state[disk]
                if tensor.shape[dim] == len(keep):
                    state[disk] = tensor.index_select(dim, idx.nonzero().view(-1).to(tensor.device))
        return state

    def state_dict_for_load(self, state: dict, adapter_name: str) -> dict:
        """Shrink the layers to the saved ``rank_pattern`` so the sliced tensors fit."""
        self.resize_modules_by_rank_pattern(
            self.peft_config[adapter_name].rank_pattern, adapter_name
        )
        return state

    def resize_modules_by_rank_pattern(
        self, rank_pattern: dict[str, list[bool]] | None, adapter_name: str
    ) -> None:
        """Resize every layer named in ``rank_pattern`` to its kept triplets (PEFT's method name)."""
        if not rank_pattern:
            return
        layers = dict(self.adapter_layers())
        for key, keep in rank_pattern.items():
            path = module_path_of(key)
            layer = layers.get(path)
            if layer is None or adapter_name not in layer.lora_E:
                raise ValueError(
                    f"rank_pattern names {key!r}, which is not an AdaLoRA layer of adapter "
                    f"{adapter_name!r}: the adapter was saved from a different model"
                )
            if layer.r[adapter_name] == len(keep) and not all(keep):
                layer.resize(adapter_name, list(map(bool, keep)))
        if adapter_name == self.trainable_adapter_name:
            self.rank_allocator = RankAllocator(
                self.peft_config[adapter_name], self.triplets(adapter_name), adapter_name
            )


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A sharded (FSDP2 DTensor) factor as one tensor; autograd flows back to the shards."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
