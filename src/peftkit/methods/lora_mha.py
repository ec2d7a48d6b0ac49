"""LoRA on ``nn.MultiheadAttention``: its packed in-projection and its out-projection.

The attention module never calls a linear layer: ``F.multi_head_attention_forward`` reads
``in_proj_weight`` (3E x E, q/k/v stacked) and ``out_proj.weight`` (E x E) directly. So the
adapter cannot add a term beside a layer's output; it runs the module with adapted weights::

    in_proj_weight'  = W_in  + s B A          A (r, E), B (3E, r)     (this layer)
    out_proj.weight' = W_out + 2 s B' A'      A' (r, E), B' (E, r)    (base_layer.out_proj; 2: PEFT's)

    torch.func.functional_call(mha, {in_proj_weight: W_in', out_proj...weight: W_out'}, inputs)

Nothing is written into the module in forward (autograd reaches A, B, A', B' through the
substituted tensors).

PEFT 0.21 counts the out-projection's update twice: its forward (and merge) first sets
``out_proj.weight = W_out + s B'A'`` and then merges the out-projection's own LoRA layer into that,
adding ``s B'A'`` again through ``.data`` (outside autograd). So its outputs use
``W_out + 2 s B'A'`` while gradients see one ``s B'A'``. Adapters trained with PEFT carry factors
fitted to that, so to give the same outputs (the drop-in requirement) :class:`MhaOutProjLora`
reproduces it: ``delta = d + d.detach()``, value ``2 d``, gradient of ``d``. (With several active
adapters PEFT also detaches all but the last one's in-/out-projection updates from the graph;
that part is not copied: every active adapter gets its gradient here.) As in PEFT, both projections are adapted with the same rank and alpha, the
out-projection's adapter is a :class:`LoraLinear` at ``base_layer.out_proj`` (so the tensors are
saved as PEFT names them: ``<path>.lora_A.weight``, ``<path>.base_layer.out_proj.lora_A.weight``),
``lora_dropout`` has no effect (the input never meets A on its own), and mixed-adapter batches,
DoRA and ``lora_bias`` are refused. Only ``_qkv_same_embed_dim`` modules (one packed in-projection)
are supported, as in PEFT.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .lora import LoraLayer, LoraLinear
from .lora_config import LoraConfig


class MhaOutProjLora(LoraLinear):
    """The out-projection's adapter inside :class:`LoraMultiheadAttention`: its update counts
    twice in value, once in gradient, as PEFT 0.21 computes it (see the module docstring)."""

    def delta_weight(self, name: str) -> torch.Tensor:
        delta = super().delta_weight(name)  # (E, E)
        return delta + delta.detach()


class LoraMultiheadAttention(LoraLayer):
    """LoRA on ``nn.MultiheadAttention``; the in-projection's factors live here, the
    out-projection's in the :class:`LoraLinear` that replaces ``base_layer.out_proj``."""

    def __init__(self, base_layer: nn.MultiheadAttention) -> None:
        if not base_layer._qkv_same_embed_dim:
            raise ValueError(
                "LoRA on nn.MultiheadAttention with kdim/vdim != embed_dim (separate q/k/v "
                "projection weights) is not supported (nor by PEFT); leave it out of target_modules"
            )
        super().__init__(base_layer)
        self.in_features = base_layer.embed_dim
        self.out_features = 3 * base_layer.embed_dim
        base_layer.out_proj = MhaOutProjLora(base_layer.out_proj)

    @property
    def out_layer(self) -> MhaOutProjLora | None:
        """The out-projection's LoRA layer (None once unloaded)."""
        out = self.base_layer.out_proj
        return out if isinstance(out, MhaOutProjLora) else None

    def _check_options(self, config: LoraConfig) -> None:
        for option in ("use_dora", "lora_bias"):
            if getattr(config, option):
                raise ValueError(
                    f"{self.module_name}: {option}=True on nn.MultiheadAttention is not supported "
                    f"(nor by PEFT); set {option}=False or leave this module out of target_modules"
                )

    def add_adapter(self, name: str, config: LoraConfig, module_name: str) -> None:
        super().add_adapter(name, config, module_name)
        out = self.out_layer
        out.add_adapter(name, config, module_name)  # the module's r/alpha, as in PEFT
        out.module_name = f"{module_name}.base_layer.out_proj"

    def _create_factors(self, name: str, r: int) -> None:
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False)

    def delta_weight(self, name: str) -> torch.Tensor:
        return (self.lora_B[name].weight @ self.lora_A[name].weight) * self.scaling[name]  # (3E, E)

    def _base_weight(self) -> torch.Tensor:
        return self.base_layer.in_proj_weight

    def _add_to_base_weight(self, delta: torch.Tensor) -> None:
        with torch.no_grad():
            self.base_layer.in_proj_weight.add_(delta)

    # --- merging: both projections together (the tuner's own call on out_proj is then a no-op)
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        if self.out_layer is not None:
            self.out_layer.merge(adapter_names, safe_merge=safe_merge)
        super().merge(adapter_names, safe_merge=safe_merge)

    def unmerge(self) -> None:
        super().unmerge()
        if self.out_layer is not None:
            self.out_layer.unmerge()

    # --- forward -------------------------------------------------------------------------
    def forward(self, query: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """``base_layer(query, ...)`` with the active adapters added to both projection weights."""
        out = self.out_layer
        self._prepare_forward()
        if out is not None:
            out._prepare_forward()
        if self.batch_adapters is not None and not self.disable_adapters:
            raise ValueError(
                f"{self.module_name}: mixed-adapter batches (adapter_names=...) through "
                f"nn.MultiheadAttention are not supported (PEFT refuses them too); run each "
                f"adapter in its own batch with set_adapter()"
            )
        weights: dict[str, torch.Tensor] = {}
        if self._active():
            weight = self.base_layer.in_proj_weight  # (3E, E)
            for name in self._active():
                weight = weight + self.delta_weight(name).to(weight.dtype)
            weights["in_proj_weight"] = weight
        if out is not None and out._active():
            weight = out.base_layer.weight  # (E, E)
            for name in out._active():
                weight = weight + out.delta_weight(name).to(weight.dtype)
            weights["out_proj.base_layer.weight"] = weight
        if not weights:
            return self.base_layer(query, *args, **kwargs)
        return torch.func.functional_call(self.base_layer, weights, (query, *args), kwargs)

    def project(self, name: str, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("nn.MultiheadAttention has no separate LoRA term")
