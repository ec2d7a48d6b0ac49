"""Trainable tokens (``LoraConfig.trainable_token_indices``): train only chosen embedding rows.

For new or re-purposed tokens, training a few rows of the embedding matrix is much cheaper than
``modules_to_save=["embed_tokens"]`` (a copy of the whole table). Each adapter keeps the values
of its rows; the frozen table is never written in forward::

    W'  = W with rows idx replaced by V          V (k, dim), starts at W[idx]
    y   = F.embedding(ids, W')                   (x embed_scale when the layer has one)
    tied output layer (lm_head sharing W):  y = F.linear(h, W')        (its bias is not used)

Layout and file names follow PEFT (``TrainableTokensWrapper``): the wrapper sits at the
embedding's path and holds ``token_adapter`` (:class:`TrainableTokensLayer`: ``base_layer`` and
``trainable_tokens_delta[name]``, which holds V itself, not a difference), saved as
``<path>.token_adapter.trainable_tokens_delta``. ``trainable_token_indices`` is a list (the input
embeddings) or ``{module name suffix: indices}``. When the model ties its output layer to the
input embeddings (``config.tie_word_embeddings`` not False and the same weight tensor), the output
layer is wrapped too and reads the embedding's rows (nothing saved for it), as PEFT does.

Merging copies V into the rows (``W[idx] = V``) and unmerging copies the original rows back.
Several active adapters must not share a token (as in PEFT); a mixed-adapter batch looks each
row up in its adapter's table.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..inject import BASE_ADAPTER, check_mixed_batch, replace_module


class TrainableTokensLayer(nn.Module):
    """The replacement rows of one table; a tied layer reads those of ``tied_to``."""

    def __init__(self, base_layer: nn.Module, tied_to: TrainableTokensLayer | None = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        self._tied = [tied_to] if tied_to is not None else []  # a list: not a submodule
        if tied_to is None:
            self.trainable_tokens_delta = nn.ParameterDict()
            self.token_indices: dict[str, list[int]] = {}
            self.originals: dict[str, torch.Tensor] = {}  # name -> W[idx] at creation (k, dim)

    @property
    def source(self) -> TrainableTokensLayer:
        return self._tied[0] if self._tied else self

    def add_adapter(self, name: str, indices: list[int]) -> None:
        if self._tied:
            return
        weight = self.base_layer.weight  # (num, dim)
        rows = weight.detach()[torch.tensor(indices, device=weight.device)]  # (k, dim)
        self.token_indices[name] = list(indices)
        self.originals[name] = rows.clone()
        self.trainable_tokens_delta[name] = nn.Parameter(rows.clone())

    def delete_adapter(self, name: str) -> None:
        if not self._tied and name in self.trainable_tokens_delta:
            del self.trainable_tokens_delta[name]
            self.token_indices.pop(name)
            self.originals.pop(name)

    def names(self) -> list[str]:
        return list(self.source.trainable_tokens_delta)

    def check_disjoint(self, names: list[str]) -> None:
        seen: set[int] = set()
        for name in names:
            rows = set(self.source.token_indices[name])
            if seen & rows:
                raise ValueError(
                    f"trainable_token_indices: adapters {names} train the same tokens "
                    f"{sorted(seen & rows)}; only disjoint token sets can be active or merged "
                    f"together (as in PEFT)"
                )
            seen |= rows

    def weight_for(self, names: list[str]) -> torch.Tensor:
        """``W`` with each adapter's rows replaced (differentiable in the rows)."""
        weight = self.base_layer.weight  # (num, dim)
        src = self.source
        for name in names:
            index = torch.tensor(src.token_indices[name], device=weight.device)
            weight = weight.index_copy(0, index, src.trainable_tokens_delta[name].to(weight))
        return weight

    def lookup(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if isinstance(base, nn.Embedding):
            out = F.embedding(
                x, weight, base.padding_idx, base.max_norm, base.norm_type,
                base.scale_grad_by_freq, base.sparse,
            )  # fmt: skip
            scale = getattr(base, "embed_scale", None)  # e.g. Gemma's scaled embeddings
            return out if scale is None else out * torch.as_tensor(scale).to(out.dtype)
        return F.linear(x, weight)  # a tied output layer (PEFT uses no bias)

    def copy_rows(self, names: list[str], original: bool) -> None:
        src = self.source
        with torch.no_grad():
            weight = self.base_layer.weight
            for name in names:
                index = torch.tensor(src.token_indices[name], device=weight.device)
                rows = src.originals[name] if original else src.trainable_tokens_delta[name]
                weight.index_copy_(0, index, rows.to(weight))


class TrainableTokensWrapper(nn.Module):
    """At the embedding's (or tied output layer's) path: picks the active adapters' rows."""

    def __init__(self, base_layer: nn.Module, tied_to: TrainableTokensLayer | None = None) -> None:
        super().__init__()
        self.token_adapter = TrainableTokensLayer(base_layer, tied_to)
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        self.batch_adapters: list[str] | None = None

    @property
    def base_layer(self) -> nn.Module:
        return self.token_adapter.base_layer

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "token_adapter":
                raise
            return getattr(self.token_adapter.base_layer, name)

    def add_adapter(self, name: str, indices: list[int]) -> None:
        self.token_adapter.add_adapter(name, indices)
        if not self.active_adapters:
            self.active_adapters = [name]

    def set_adapter(self, names: list[str]) -> None:
        own = [n for n in names if n in self.token_adapter.names()]
        if len(own) > 1:
            raise ValueError(
                f"trainable_token_indices: adapters {own} both train tokens of "
                f"{type(self.base_layer).__name__}; only one of them can be active (as in PEFT)"
            )
        self.active_adapters = own

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged into the weights; unmerge it first")
        self.token_adapter.delete_adapter(name)
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def trainable(self, name: str) -> list[nn.Parameter]:
        layer = self.token_adapter
        return (
            [] if layer._tied or name not in layer.names() else [layer.trainable_tokens_delta[name]]
        )

    def merge(self, names: list[str] | None = None, safe_merge: bool = False) -> None:
        todo = [n for n in (names or self.active_adapters) if n in self.token_adapter.names()]
        todo = [n for n in todo if n not in self.merged_adapters]
        self.token_adapter.check_disjoint(self.merged_adapters + todo)
        if safe_merge:
            weight = self.token_adapter.weight_for(todo)
            if not torch.isfinite(weight).all():
                raise ValueError(f"merging adapters {todo} produces NaN/Inf weights; not merged")
        self.token_adapter.copy_rows(todo, original=False)
        self.merged_adapters.extend(todo)

    def unmerge(self) -> None:
        while self.merged_adapters:
            self.token_adapter.copy_rows([self.merged_adapters.pop()], original=True)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        layer = self.token_adapter
        if self.disable_adapters and self.merged_adapters:
            self.unmerge()
        if self.disable_adapters:
            return self.base_layer(x, *args, **kwargs)
        if self.batch_adapters is not None:
            return self._mixed(x)
        active = [n for n in self.active_adapters if n not in self.merged_adapters]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        layer.check_disjoint(self.merged_adapters + active)
        return layer.lookup(x, layer.weight_for(active))

    def _mixed(self, x: torch.Tensor) -> torch.Tensor:
        """Row ``b`` looked up in adapter ``batch_adapters[b]``'s table (one lookup per adapter)."""
        names = self.batch_adapters
        check_mixed_batch(
            self, names, x.shape[0], f"trainable tokens of {type(self.base_layer).__name__}"
        )
        if self.merged_adapters:
            raise ValueError(
                f"cannot run a mixed-adapter batch while adapters {self.merged_adapters} are "
                f"merged (as in PEFT); call model.unmerge_adapter() first"
            )
        layer, out = self.token_adapter, None
        for name in dict.fromkeys(names):
            rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=x.device)
            own = [name] if name != BASE_ADAPTER and name in layer.names() else []
            part = layer.lookup(x[rows], layer.weight_for(own))
            if out is None:
                out = part.new_empty((x.shape[0], *part.shape[1:]))
            out[rows] = part
        return out


def _input_embeddings_name(model: nn.Module) -> str:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    for path, module in model.named_modules():
        if emb is not None and module is emb:
            return path
    return "embed_tokens"


def wrap_trainable_tokens(model: nn.Module, config: Any, adapter_name: str) -> list[str]:
    """Wrap the layers ``config.trainable_token_indices`` names (and tied output layers);
    return the paths wrapped. A name matches a module path that ends with it (PEFT's rule)."""
    spec = config.trainable_token_indices
    targets = spec if isinstance(spec, dict) else {_input_embeddings_name(model): spec}
    for name in targets:
        if config.modules_to_save and name in config.modules_to_save:
            raise ValueError(
                f"{name} is in both modules_to_save (trained in full) and trainable_token_indices; "
                f"use one of them (as in PEFT)"
            )
    wrapped = []
    for name, indices in targets.items():
        hits = [
            p for p, m in model.named_modules()
            if p.endswith(name) and ".token_adapter" not in f".{p}" and ".base_layer" not in f".{p}"
        ]  # fmt: skip
        if not hits:
            raise ValueError(f"trainable_token_indices names {name!r}, which matches no module")
        for path in hits:
            module = model.get_submodule(path)
            if isinstance(module, TrainableTokensWrapper):
                module.add_adapter(adapter_name, indices)
            elif isinstance(module, (nn.Embedding, nn.Linear)):
                layer = TrainableTokensWrapper(module)
                layer.add_adapter(adapter_name, indices)
                replace_module(model, path, layer)
            else:
                raise ValueError(
                    f"trainable_token_indices: {path} is a {type(module).__name__}; it must be an "
                    f"nn.Embedding (or nn.Linear) not adapted otherwise (leave it out of "
                    f"target_modules)"
                )
            wrapped.append(path)
    wrapped += _wrap_tied_outputs(model, adapter_name)
    return wrapped


def _wrap_tied_outputs(model: nn.Module, adapter_name: str) -> list[str]:
    """Output layers that share the (wrapped) input embedding's weight read its rows too."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    tie = getattr(getattr(model, "config", None), "tie_word_embeddings", None)
    if not isinstance(emb, TrainableTokensWrapper) or tie is False:
        return []
    shared, wrapped = emb.base_layer.weight, []
    for path, module in list(model.named_modules()):
        if ".token_adapter" in f".{path}" or ".base_layer" in f".{path}":
            continue  # inside a wrapper
        if isinstance(module, TrainableTokensWrapper) and module.token_adapter._tied:
            module.active_adapters = module.active_adapters or [adapter_name]
            continue
        if isinstance(module, nn.Linear) and module.weight is shared:
            layer = TrainableTokensWrapper(module, tied_to=emb.token_adapter)
            layer.active_adapters = [adapter_name]
            replace_module(model, path, layer)
            wrapped.append(path)
    return wrapped
