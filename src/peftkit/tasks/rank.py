"""Rank classification: score every label's log-likelihood after each prompt, batched.

As T-Few and the RAFT baselines score a label set with a language model: no text is generated,
each label (its tokens as training wrote them, then EOS) is scored after the prompt, and the
best one is the prediction, so the answer is always a label. ``sum`` is the label's total
log-likelihood; ``mean`` divides it by the label's token count (length-normalised, T-Few's
choice for answer options of different lengths). EOS is part of every label: without it a
label that starts another ("no" / "no complaint") could never lose to the longer one in ``sum``.

Decoder-only models run each prompt once and every label as a continuation of its cache::

    prompts, left-padded   [pad p1 p2 p3]  (B, T)  ──forward, use_cache──> cache, logits of p3
                                                                          = log p(first token)
    cache repeated per label (B*L rows); labels right-padded, minus their last token:
    [l1 l2 eos] -> input [l1 l2]  (B*L, W-1)  ──forward with the cache──> log p(l2), log p(eos)
    score = sum (or mean) over each label's own tokens

Positions come from the attention mask (``cumsum - 1``; a continuation goes on from its row's
last prompt token), so a padded row scores as that row alone. Adapters go through the adapted
model's own forward: prompt tuning and P-tuning put their virtual tokens in the first forward's
cache and extend masks and positions in the second; prefix tuning's prefix is in the cache from
the start. Encoder-decoder models score (prompt, label) pairs in one forward each, the labels as
decoder targets. Rows are shared out over processes like generation (``EvalContext.shard``).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch

from ..progress import progress_bar
from .base import IGNORE_INDEX, EvalContext, chunks, pad

RANK_SCORES = ("sum", "mean")
_CACHE_KWARGS = ("cache", "past_key_values")  # transformers >= 5.24 calls it `cache`


def _inner(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a PeftModel (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def _accepted(model: torch.nn.Module) -> set[str]:
    return set(inspect.signature(_inner(model).forward).parameters)


@torch.no_grad()
def rank_continuations(
    ctx: EvalContext,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    encoder_decoder: bool = False,
    mean: bool = False,
    desc: str = "rank",
) -> list[list[float]]:
    """Per prompt, the log-likelihood of each continuation after it (``mean``: per token).

    Args:
        prompts: token ids of each prompt (decoder-only: the input; encoder-decoder: the
            encoder's input).
        continuations: token ids of each label, EOS included (the decoder's targets for an
            encoder-decoder).
    """
    if not continuations or any(len(c) == 0 for c in continuations):
        raise ValueError("every label needs at least one token to be scored")
    model = ctx.model
    was_training = model.training
    model.eval()
    score = _pairs_forward if encoder_decoder else _prompt_then_labels
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    pieces = list(chunks(len(order), ctx.batch_size))
    bar = progress_bar(len(prompts), desc=desc, unit="row", leave=False, enabled=ctx.progress)
    done: list[tuple[int, tuple[list[int], list[list[float]]]]] = []
    try:
        for index in ctx.shard(len(pieces)):  # several processes: this one's batches
            rows = [order[i] for i in pieces[0 if index is None else index]]
            with ctx.autocast():
                sums, counts = score(ctx, tokenizer, [prompts[i] for i in rows], continuations)
            values = (sums / counts if mean else sums).tolist()  # (B, L)
            if index is not None:  # None: a padding batch, run to keep the ranks in step
                done.append((index, (rows, values)))
            bar.update(len(rows))
    finally:
        bar.close()
        model.train(was_training)
    out: list[list[float]] = [[] for _ in prompts]
    for rows, values in ctx.gather(done):  # every process's batches, in order
        for i, v in zip(rows, values):
            out[i] = v
    return out


def _label_batch(
    continuations: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels right-padded: ids (L, W) and mask (L, W)."""
    ids = pad(continuations, pad_id).to(device)  # (L, W)
    mask = pad([[1] * len(c) for c in continuations], 0).to(device)  # (L, W)
    return ids, mask


def _prompt_then_labels(
    ctx: EvalContext, tokenizer: Any, prompts: list[Sequence[int]], continuations: Sequence
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder-only: the prompts once (left-padded, cached), the labels as continuations.
    Returns the summed log-likelihoods and token counts, both (B, L)."""
    model, device = ctx.model, ctx.device
    accepted = _accepted(model)
    cache_kw = next((k for k in _CACHE_KWARGS if k in accepted), _CACHE_KWARGS[0])
    b, n_labels = len(prompts), len(continuations)
    input_ids = pad(prompts, tokenizer.pad_token_id, left=True).to(device)  # (B, T)
    mask = pad([[1] * len(p) for p in prompts], 0, left=True).to(device)  # (B, T)
    extra: dict[str, Any] = {}
    if "position_ids" in accepted:
        extra["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    if "logits_to_keep" in accepted:
        extra["logits_to_keep"] = 1  # only the last prompt token's logits are needed
    out = model(input_ids=input_ids, attention_mask=mask, use_cache=True, **extra)
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (B, V)
    cache = getattr(out, "cache", None)
    cache = getattr(out, "past_key_values", None) if cache is None else cache
    del out

    labels, label_mask = _label_batch(continuations, tokenizer.pad_token_id, device)  # (L, W)
    width = labels.shape[1]
    token_lp = torch.zeros(b, n_labels, width, device=device)  # (B, L, W)
    token_lp[:, :, 0] = first[:, labels[:, 0]]  # log p(first label token | prompt)
    if width > 1:
        if cache is None:
            raise ValueError(
                f"{type(_inner(model)).__name__} returned no key/value cache; rank decoding "
                "runs each label as a continuation of the prompt's cache"
            )
        cache.batch_repeat_interleave(n_labels)  # (B*L) rows: row i's copies side by side
        step = labels[:, :-1].repeat(b, 1)  # (B*L, W-1)
        step_mask = label_mask[:, :-1].repeat(b, 1)  # (B*L, W-1)
        full_mask = torch.cat((mask.repeat_interleave(n_labels, 0), step_mask), dim=1)
        extra = {}
        if "position_ids" in accepted:
            start = mask.sum(-1).repeat_interleave(n_labels)[:, None]  # (B*L, 1)
            extra["position_ids"] = start + torch.arange(width - 1, device=device)  # (B*L, W-1)
        out = model(
            input_ids=step, attention_mask=full_mask, use_cache=True, **{cache_kw: cache}, **extra
        )
        logits = out.logits[:, -(width - 1) :].float()  # (B*L, W-1, V)
        lp = torch.log_softmax(logits, dim=-1)
        nxt = labels[:, 1:].repeat(b, 1)  # (B*L, W-1): the token each position predicts
        later = lp.gather(-1, nxt.unsqueeze(-1)).squeeze(-1)  # (B*L, W-1)
        token_lp[:, :, 1:] = later.view(b, n_labels, width - 1)
    weights = label_mask.float().expand(b, -1, -1)  # (B, L, W)
    return (token_lp * weights).sum(-1), weights.sum(-1)


def _pairs_forward(
    ctx: EvalContext, tokenizer: Any, prompts: list[Sequence[int]], continuations: Sequence
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder-decoder: every (prompt, label) pair in one forward, the label as the decoder's
    target. Returns the summed log-likelihoods and token counts, both (B, L)."""
    model, device = ctx.model, ctx.device
    b, n_labels = len(prompts), len(continuations)
    input_ids = pad(prompts, tokenizer.pad_token_id).to(device)  # (B, S)
    mask = pad([[1] * len(p) for p in prompts], 0).to(device)  # (B, S)
    targets = pad(continuations, IGNORE_INDEX).to(device)  # (L, W)
    targets = targets.repeat(b, 1)  # (B*L, W)
    out = model(
        input_ids=input_ids.repeat_interleave(n_labels, 0),  # (B*L, S)
        attention_mask=mask.repeat_interleave(n_labels, 0),
        labels=targets,
    )
    lp = torch.log_softmax(out.logits[:, -targets.shape[1] :].float(), dim=-1)  # (B*L, W, V)
    known = targets != IGNORE_INDEX
    token_lp = lp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * known
    sums = token_lp.sum(-1).view(b, n_labels)
    return sums, known.sum(-1).float().view(b, n_labels)
