"""Reading weights that DeepSpeed ZeRO-3 has partitioned.

A model loaded while ZeRO-3 is on (``zero.Init``: transformers' ``from_pretrained`` under an
``HfDeepSpeedConfig`` of stage 3, as ``accelerate`` sets up) holds every weight as an empty
local tensor plus ``ds_*`` attributes: ``weight.shape`` is ``(0,)``, ``weight.numel()`` is 0,
and ``copy.deepcopy`` copies nothing. Code that reads a base weight's value while building an
adapter gathers it first::

    with gathered(module.parameters()):   # every rank enters; whole tensors inside
        copy.deepcopy(module) / embedding(ids)

Outside ZeRO-3 both helpers do nothing. FSDP2 shards only at ``prepare``, after the adapter is
built, and its DTensors report their whole shape and size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch


def is_partitioned(param: torch.Tensor) -> bool:
    """Whether ``param`` is a ZeRO-3 partitioned parameter."""
    return hasattr(param, "ds_id")


def numel(param: torch.Tensor) -> int:
    """The parameter's whole size, partitioned or not (ZeRO-3 keeps it in ``ds_numel``)."""
    return int(param.ds_numel) if is_partitioned(param) else param.numel()


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor]) -> Iterator[None]:
    """Inside, the ZeRO-3 partitioned ones among ``params`` hold their whole values (read-only:
    writes are not partitioned back). Every rank must enter. Elsewhere nothing happens."""
    zero = [p for p in params if is_partitioned(p)]
    if not zero:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(zero, modifier_rank=None):
        yield


__all__ = ["gathered", "is_partitioned", "numel"]
