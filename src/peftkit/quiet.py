"""What dependencies print whatever peftkit does, silenced at the source, one narrow rule each.

A user's run should print only what they can act on. Warnings that peftkit's own calls cause
are fixed in those calls; this module is only for lines a dependency prints regardless of how it
is called, on every machine like this one:

* DeepSpeed, on import, guesses its accelerator and warns ``Setting accelerator to CPU. If you
  have GPU or other accelerator, we were unable to detect it.`` (transformers imports it when a
  model is saved). Where torch sees no accelerator we tell DeepSpeed ``DS_ACCELERATOR=cpu``, its
  documented override, unless the user set it.
* bitsandbytes (imported by diffusers, so by every text-to-image run) logs ``Failed to load CPU
  gemm_4bit_forward from kernels-community`` on CPUs with AVX512-BF16: an optional kernel it
  would fetch from a hub. That one message is dropped from that one logger; everything else
  bitsandbytes logs, and every warning of the user's own, stays visible.
"""

from __future__ import annotations

import logging
import os

import torch

_BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
_BNB_KERNELS_LINE = "Failed to load CPU gemm_4bit_forward from kernels-community"


def _no_accelerator() -> bool:
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6: CUDA, XPU, MPS, ...
    if accelerator is not None:
        return not accelerator.is_available()
    return not torch.cuda.is_available()


def _drop_bnb_kernels_line(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_BNB_KERNELS_LINE)


def quiet_dependencies() -> None:
    """Install the rules above (idempotent; called when peftkit is imported)."""
    if _no_accelerator():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    bnb = logging.getLogger(_BNB_CPU_LOGGER)
    if _drop_bnb_kernels_line not in bnb.filters:
        bnb.addFilter(_drop_bnb_kernels_line)


__all__ = ["quiet_dependencies"]
