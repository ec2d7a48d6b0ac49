"""Optional bitsandbytes interop: state conversion and its dequantise kernel as a fast path.

Our packed bytes and statistics are bit-identical to bitsandbytes', so a
:class:`~peftkit.quant.nf4.QuantState4bit` converts to a ``bitsandbytes.functional.QuantState``
(and back) without touching the data. On CUDA, :class:`~peftkit.quant.Linear4bit` hands
dequantisation to bitsandbytes' kernel when it is installed (``backend="auto"``); everywhere
else, or without bitsandbytes, the pure PyTorch path runs. Both give the same numbers.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from .codebooks import code_4bit, dynamic_code_8bit
from .nf4 import QuantState4bit

BACKENDS = ("auto", "torch", "bitsandbytes")
_backend = "auto"


@lru_cache(maxsize=1)
def bnb_available() -> bool:
    """True if ``bitsandbytes`` imports (it prints a harmless warning on CPU-only machines)."""
    try:
        import bitsandbytes.functional  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA setup raising at import time
        return False
    return True


def set_dequant_backend(backend: str) -> None:
    """Choose who dequantises Linear4bit weights: "auto" (bitsandbytes on CUDA when installed,
    else PyTorch), "torch" (always ours), or "bitsandbytes" (always theirs; must be installed)."""
    global _backend
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    if backend == "bitsandbytes" and not bnb_available():
        raise ImportError("backend='bitsandbytes' needs `pip install bitsandbytes`")
    _backend = backend


def get_dequant_backend() -> str:
    return _backend


def use_bnb_for(device: torch.device) -> bool:
    """Whether the current backend setting sends a dequantisation on ``device`` to bitsandbytes."""
    if _backend == "bitsandbytes":
        return True
    return _backend == "auto" and device.type == "cuda" and bnb_available()


def to_bnb_quant_state(state: QuantState4bit):
    """The same statistics as a ``bitsandbytes.functional.QuantState`` (tensors shared)."""
    import bitsandbytes.functional as bf

    ref = state.absmax_fp32 if state.absmax_fp32 is not None else state.absmax_codes
    common = dict(
        shape=state.shape,
        dtype=state.dtype,
        blocksize=state.blocksize,
        code=code_4bit(state.quant_type, ref.device),
        quant_type=state.quant_type,
    )
    if not state.double_quant:
        return bf.QuantState(absmax=state.absmax_fp32, **common)
    nested = bf.QuantState(
        absmax=state.absmax_scales,
        code=dynamic_code_8bit(ref.device),
        blocksize=state.nested_blocksize,
        dtype=torch.float32,
    )
    return bf.QuantState(
        absmax=state.absmax_codes, offset=state.absmax_offset, state2=nested, **common
    )


def from_bnb_quant_state(bnb_state) -> QuantState4bit:
    """A bitsandbytes ``QuantState`` (from ``quantize_4bit`` or a loaded checkpoint) as ours."""
    if getattr(bnb_state, "packing_format_for_cpu", False):
        raise ValueError(
            "this bitsandbytes state was repacked for its CPU bf16 kernel; convert the layer "
            "before running it in eval mode on CPU"
        )
    if bnb_state.quant_type not in ("nf4", "fp4"):
        raise ValueError(f"unsupported bitsandbytes quant_type {bnb_state.quant_type!r}")
    state = QuantState4bit(
        shape=torch.Size(bnb_state.shape),
        dtype=bnb_state.dtype,
        blocksize=bnb_state.blocksize,
        quant_type=bnb_state.quant_type,
    )
    if bnb_state.nested:
        state.absmax_codes = bnb_state.absmax
        state.absmax_scales = bnb_state.state2.absmax
        state.absmax_offset = bnb_state.offset
        state.nested_blocksize = bnb_state.state2.blocksize
    else:
        state.absmax_fp32 = bnb_state.absmax
    return state


def bnb_dequantize(packed: torch.Tensor, state: QuantState4bit) -> torch.Tensor:
    """Dequantise with bitsandbytes' kernel; returns ``state.dtype`` in ``state.shape``."""
    import bitsandbytes.functional as bf

    out = bf.dequantize_4bit(packed.view(-1, 1), to_bnb_quant_state(state))
    return out.reshape(state.shape)
