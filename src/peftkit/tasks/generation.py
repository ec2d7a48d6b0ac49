"""Greedy generation over many prompts, batched, for evaluation and prediction.

Prompts arrive as token-id lists (encoded exactly as in training, so the model sees at test time
what it saw while learning). Decoder-only prompts are left-padded, so every row's new tokens
start at the same column::

    [pad pad p1 p2 p3] -> generate -> [pad pad p1 p2 p3 | n1 n2 eos]   keep columns after the prompt

Rows are sorted by length before batching to keep padding small; results come back in input
order. With several processes each generates its share of the batches (``EvalContext.shard``)
and all results are gathered. Decoding stops at EOS; special tokens are dropped and whitespace stripped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import GenerationConfig

from ..progress import progress_bar
from .base import EvalContext, chunks, pad


def _inner(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a PeftModel (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def is_encoder_decoder(model: torch.nn.Module) -> bool:
    """Whether ``model`` (or the transformers model under a PeftModel) is an encoder-decoder."""
    return bool(getattr(getattr(_inner(model), "config", None), "is_encoder_decoder", False))


def greedy_config(model: torch.nn.Module, tokenizer: Any, max_new_tokens: int) -> GenerationConfig:
    """A deterministic decoding config: greedy, one beam, stop at the tokenizer's / model's EOS."""
    inner = _inner(model)
    base = getattr(inner, "generation_config", None)
    eos: list[int] = []
    for value in (getattr(base, "eos_token_id", None), tokenizer.eos_token_id):
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and v not in eos:
                eos.append(int(v))
    start = getattr(base, "decoder_start_token_id", None)
    if start is None:
        start = getattr(getattr(inner, "config", None), "decoder_start_token_id", None)
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos or None,
        bos_token_id=getattr(base, "bos_token_id", None),
        decoder_start_token_id=start,
    )


@torch.no_grad()
def generate_texts(
    ctx: EvalContext,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    encoder_decoder: bool = False,
    desc: str = "generate",
) -> list[str]:
    """Greedy continuations of ``prompts`` (token-id lists), decoded, in input order."""
    model = ctx.model
    was_training = model.training
    model.eval()
    config = greedy_config(model, tokenizer, max_new_tokens)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    left = not encoder_decoder
    bar = progress_bar(len(prompts), desc=desc, unit="row", leave=False, enabled=ctx.progress)
    pieces = list(chunks(len(order), ctx.batch_size))
    done: list[tuple[int, tuple[list[int], list[str]]]] = []
    try:
        for index in ctx.shard(len(pieces)):  # several processes: this one's batches
            rows = [order[i] for i in pieces[0 if index is None else index]]
            seqs = [list(prompts[i]) for i in rows]
            input_ids = pad(seqs, tokenizer.pad_token_id, left=left).to(ctx.device)  # (B, T)
            mask = pad([[1] * len(s) for s in seqs], 0, left=left).to(ctx.device)  # (B, T)
            with ctx.autocast():
                generated = model.generate(
                    input_ids=input_ids,
                    attention_mask=mask,
                    generation_config=config,
                    synced_gpus=ctx.lockstep,  # sharded: every rank steps until all are done
                )
            new = generated if encoder_decoder else generated[:, input_ids.shape[1] :]  # (B, N)
            texts = tokenizer.batch_decode(new, skip_special_tokens=True)
            if index is not None:  # None: a padding batch, run to keep the ranks in step
                done.append((index, (rows, [t.strip() for t in texts])))
            bar.update(len(rows))
    finally:
        bar.close()
        model.train(was_training)
    for rows, texts in ctx.gather(done):  # every process's batches, in order
        for i, text in zip(rows, texts):
            out[i] = text
    return out
