"""What every injected adapter layer shares, whatever its maths (LoRA, LoHa, LoKr, IA3).

::

    wrapper (replaces the target module in the model)
      .base_layer          the frozen original module
      .<container>[name]   per-adapter tensors (lora_A, hada_w1_a, lokr_w1, ia3_l, ...)
      .active_adapters     names that run in forward, in order
      .merged_adapters     names folded into base_layer's weight, in merge order
      .disable_adapters    True: forward is the base layer alone (merged adapters unmerged first)
      .batch_adapters      per-row adapter names while a mixed batch runs (set by the tuner)

``tuner.InjectedAdapterModel`` walks the model for instances of this class, so one walker serves
every injected method; a method's layer supplies ``add_adapter``, ``delete_adapter``, ``merge``,
``unmerge``, ``adapter_names`` and ``forward``.
"""

from __future__ import annotations

from typing import Any

from torch import nn


class AdapterLayer(nn.Module):
    """The frozen ``base_layer`` plus the bookkeeping the tuner reads on every adapter layer."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.merged_adapters: list[str] = []
        self.active_adapters: list[str] = []
        self.disable_adapters = False
        # Per-row adapter names for a mixed batch (set by the tuner for one forward call).
        self.batch_adapters: list[str] | None = None
        self.module_name = type(base_layer).__name__  # the module path, once an adapter is added

    def __getattr__(self, name: str) -> Any:
        # Model code reads e.g. ``self.wo.weight.dtype``: answer from the wrapped layer.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def adapter_names(self) -> list[str]:
        """Names of the adapters this layer carries."""
        raise NotImplementedError

    def add_adapter(self, name: str, config: Any, module_name: str) -> None:
        raise NotImplementedError

    def delete_adapter(self, name: str) -> None:
        raise NotImplementedError

    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        raise NotImplementedError

    def unmerge(self) -> None:
        raise NotImplementedError

    def _active(self) -> list[str]:
        """Adapters whose output must be added in forward (active, present, not merged)."""
        if self.disable_adapters:
            return []
        present = self.adapter_names()
        return [a for a in self.active_adapters if a in present and a not in self.merged_adapters]

    def _prepare_forward(self) -> None:
        """Disabled adapters must see the original weights, so un-merge them first."""
        if self.disable_adapters and self.merged:
            self.unmerge()
