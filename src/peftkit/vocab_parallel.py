"""The token embedding and the language-model head cut by vocabulary rows across the ranks of a
sharded run (ZeRO-3, FSDP2): the vocabulary matrix is never gathered whole.

Why: plain ZeRO-3 / FSDP2 gather a parameter whole on every rank before using it. For the
embedding matrix ``E`` (``V x H``) that is the largest gather of the step: on bloomz-560m
(V 250,880, H 1,024, tied) 983 MB of fp32, gathered for the lookup and twice more for the head
(forward and backward), 46% of the model, and on CPU over gloo ~5 s each. Here rank ``r`` of
``W`` keeps rows ``[r V/W, (r+1) V/W)`` (``E_r``) for good and nothing else is ever gathered::

    lookup (B_s, T_s) ids on each rank s
        all_gather ids (padded to the largest B, T)            (W, B, T)
        rows in my range from E_r, zeros elsewhere              (W, B, T, H)
        all_reduce(sum)  -> every rank's embeddings; keep mine  (B_s, T_s, H)

    head, training (grad on):  hidden of every rank (all_gather)  (W, B, T, H)
        local logits  Z_r = hidden @ E_rᵀ                      (W, B, T, V/W)  = one rank's
        cross-entropy over the vocabulary split across ranks:   logits in DDP
          m = all_reduce_max(max_v Z_r),  S = all_reduce_sum(Σ_v exp(Z_r - m)),
          z_y = all_reduce_sum(Z_r[y] where y is in my range)
          loss(token) = log S + m - z_y;  mine: mean over my valid tokens (HF's ForCausalLMLoss)
        backward: dL/dZ_r = softmax_r - onehot_r, scaled by each token's owner's upstream
          gradient (all_gathered), for EVERY rank's tokens (their softmax needs my slice);
          dL/dhidden = dL/dZ_r @ E_r summed over ranks (all_reduce), mine kept

    head, evaluation / generation (no grad): Z_r gathered along the vocabulary -> my tokens'
        full logits (B_s, T_s, V), so generation and metrics see ordinary logits.

Invariants: every rank runs every forward (the trainer keeps sharded ranks in lockstep, and
evaluation pads the shorter share); the embedding and head are frozen (no gradient for E);
the training forward of a model whose head is swapped returns its loss through
:func:`causal_lm_loss` (installed as the model's ``loss_function``, the head bound to it), and
its ``logits`` field then holds the local slice ``Z_r``, which only the loss reads. Tested against the plain
single-process loss and gradients (``tests/test_vocab_parallel.py``).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .file_pages import is_file_backed

logger = logging.getLogger(__name__)

__all__ = ["VocabParallelEmbedding", "VocabParallelHead", "causal_lm_loss", "shard_vocabulary"]


def _world() -> tuple[int, int]:
    return dist.get_world_size(), dist.get_rank()


def _max_shape(*sizes: int) -> list[int]:
    """The elementwise maximum of ``sizes`` over ranks."""
    t = torch.tensor(sizes, dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _pad_to(x: torch.Tensor, b: int, t: int, value: float | int = 0) -> torch.Tensor:
    if x.shape[0] == b and x.shape[1] == t:
        return x.contiguous()
    out = x.new_full((b, t, *x.shape[2:]), value)
    out[: x.shape[0], : x.shape[1]] = x
    return out


def _all_gather(x: torch.Tensor) -> torch.Tensor:
    """(W, *x.shape): every rank's ``x`` (all the same shape)."""
    world, _ = _world()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.stack(parts)


class _GatherHidden(torch.autograd.Function):
    """Every rank's hidden states ``(B_s, T_s, H)``, padded and stacked ``(W, B, T, H)``;
    backward sums the gradient over ranks (each rank's share of the vocabulary contributed
    to every token) and keeps this rank's slice."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, b: int, t: int) -> torch.Tensor:
        ctx.shape = hidden.shape
        return _all_gather(_pad_to(hidden, b, t))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        _, rank = _world()
        b, t = ctx.shape[0], ctx.shape[1]
        return grad[rank, :b, :t], None, None


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of every rank's tokens, the vocabulary split across ranks;
    returns this rank's tokens' losses ``(B_s, T_s)`` (0 where ignored)."""

    @staticmethod
    def forward(
        ctx: Any, local: torch.Tensor, targets: torch.Tensor, lo: int, shape: tuple[int, int]
    ) -> torch.Tensor:
        # local (W, B, T, V_r) float; targets (W, B, T) global ids, -1 = ignored
        world, rank = _world()
        peak = local.amax(dim=-1)  # (W, B, T)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        exp = (local - peak.unsqueeze(-1)).exp_()  # (W, B, T, V_r)
        total = exp.sum(dim=-1)
        dist.all_reduce(total)  # (W, B, T): Σ over the whole vocabulary
        mine = (targets >= lo) & (targets < lo + local.shape[-1])
        index = (targets - lo).clamp(0, local.shape[-1] - 1)
        picked = local.gather(-1, index.unsqueeze(-1)).squeeze(-1) * mine
        dist.all_reduce(picked)  # (W, B, T): the target's logit, from whichever rank has it
        loss = (total.log() + peak - picked) * (targets >= 0)
        exp.div_(total.unsqueeze(-1))  # softmax over the whole vocabulary, my slice of it
        ctx.save_for_backward(exp, index, mine, targets >= 0)
        ctx.rank = rank
        b, t = shape
        return loss[rank, :b, :t]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        softmax, index, mine, valid = ctx.saved_tensors
        B, T = softmax.shape[1:3]  # (W, B, T, V/W)
        # every rank's upstream gradient per token: the softmax of their tokens is partly mine
        upstream = _all_gather(_pad_to(grad, B, T))  # (W, B, T)
        upstream = upstream * valid
        dlocal = softmax.mul_(upstream.unsqueeze(-1))  # in place: the saved softmax is done
        dlocal.scatter_add_(-1, index.unsqueeze(-1), -(upstream * mine).unsqueeze(-1))
        return dlocal, None, None, None


class VocabParallelEmbedding(nn.Embedding):
    """A frozen ``nn.Embedding`` of which this rank keeps rows ``[lo, lo + rows)``; the lookup
    is a collective (see the module docstring). It is an ``nn.Embedding`` to code that asks
    (prompt methods prepend to its output); ``weight`` is this rank's rows."""

    def __init__(self, shard: torch.Tensor, lo: int, num_embeddings: int, source: nn.Embedding):
        nn.Module.__init__(self)  # not nn.Embedding's: it would allocate the whole matrix
        self.register_buffer("shard", shard, persistent=False)  # (V/W, H)
        self.lo, self.num_embeddings = lo, num_embeddings
        self.embedding_dim = shard.shape[1]
        self.padding_idx = source.padding_idx
        self.max_norm, self.norm_type = None, 2.0
        self.scale_grad_by_freq, self.sparse = False, False

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return self.shard

    def represented_param_count(self) -> int:
        """The whole matrix this slice stands for (parameter counts stay the model's)."""
        return self.num_embeddings * self.embedding_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        b, t = _max_shape(ids.shape[0], ids.shape[1])
        every = _all_gather(_pad_to(ids, b, t, -1))  # (W, B, T)
        mine = (every >= self.lo) & (every < self.lo + self.shard.shape[0])
        rows = self.shard[(every - self.lo).clamp(0, self.shard.shape[0] - 1)]  # (W, B, T, H)
        rows = rows * mine.unsqueeze(-1).to(rows.dtype)
        dist.all_reduce(rows)
        _, rank = _world()
        return rows[rank, : ids.shape[0], : ids.shape[1]].contiguous()

    def extra_repr(self) -> str:
        rows = self.shard.shape[0]
        return f"rows {self.lo}..{self.lo + rows} of {self.num_embeddings}, {self.embedding_dim}"


class VocabParallelHead(nn.Module):
    """A frozen bias-free output head ``hidden @ Eᵀ`` of which this rank keeps rows
    ``[lo, lo + rows)`` of ``E``. With gradients on it returns the local logits of every rank's
    tokens, which :func:`causal_lm_loss` turns into this rank's loss; without, this rank's
    tokens' whole logits."""

    def __init__(self, shard: torch.Tensor, lo: int, out_features: int, tied: bool = False):
        super().__init__()
        self.register_buffer("shard", shard, persistent=False)  # (V/W, H)
        self.lo, self.out_features, self.tied = lo, out_features, tied
        self.in_features = shard.shape[1]
        # (B_s, T_s) of the local logits handed out in training, until the loss takes them.
        # Kept here, not on the tensor: ZeRO-3's module hooks hand the model's outputs on as
        # new tensor objects (to hook their backward), so a tensor attribute would be lost.
        self.pending: tuple[int, int] | None = None

    def represented_param_count(self) -> int:
        """The whole matrix this slice stands for; 0 when it is the embedding's (tied)."""
        return 0 if self.tied else self.out_features * self.in_features

    def take_pending(self) -> tuple[int, int] | None:
        pending, self.pending = self.pending, None
        return pending

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        b, t = _max_shape(hidden.shape[0], hidden.shape[1])
        shard = self.shard
        if not torch.is_autocast_enabled(hidden.device.type):
            hidden = hidden.to(shard.dtype)
        if torch.is_grad_enabled() and self.training:
            every = _GatherHidden.apply(hidden, b, t)  # (W, B, T, H)
            local = every @ shard.t()  # (W, B, T, V/W)
            self.pending = (hidden.shape[0], hidden.shape[1])  # for causal_lm_loss
            return local
        with torch.no_grad():
            every = _all_gather(_pad_to(hidden, b, t))  # (W, B, T, H)
            local = every @ shard.t()  # (W, B, T, V/W)
            parts = _all_gather(local)  # (W_vocab, W, B, T, V/W)
        _, rank = _world()
        mine = parts[:, rank, : hidden.shape[0], : hidden.shape[1]]  # (W_vocab, B, T, V/W)
        return torch.cat(list(mine), dim=-1)  # (B, T, V)

    def extra_repr(self) -> str:
        rows = self.shard.shape[0]
        return f"in {self.in_features}, rows {self.lo}..{self.lo + rows} of {self.out_features}"


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    head: VocabParallelHead | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` (labels shifted by one, ``ignore_index`` left out,
    mean over the valid tokens or sum / ``num_items_in_batch``), for the local logits ``head``
    (a :class:`VocabParallelHead`) just made in training; other logits go to transformers'
    own. Installed as the model's ``loss_function`` with ``head`` bound."""
    pending = head.take_pending() if head is not None else None
    if pending is None:
        from transformers.loss.loss_utils import ForCausalLMLoss

        return ForCausalLMLoss(
            logits, labels, vocab_size, num_items_in_batch, ignore_index, shift_labels, **kwargs
        )
    b_own, t_own = pending
    if shift_labels is None:
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    targets = shift_labels.to(torch.int64).masked_fill(shift_labels == ignore_index, -1)
    b, t = logits.shape[1:3]  # (W, B, T, V/W)
    every = _all_gather(_pad_to(targets, b, t, -1))  # (W, B, T)
    per_token = _VocabParallelCrossEntropy.apply(logits.float(), every, head.lo, (b_own, t_own))
    total = per_token.sum()
    if num_items_in_batch is not None:
        return total / num_items_in_batch
    return total / (targets >= 0).sum()


def _shard_rows(weight: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """This rank's rows of ``weight`` (V, H) and their first index; None where its ZeRO-3
    partition does not fall on whole rows (the vocabulary is not a multiple of the world)."""
    world, rank = _world()
    if hasattr(weight, "ds_id"):  # ZeRO-3: the partition already is a slice of rows
        rows, width = weight.ds_shape
        if rows % world:
            return None
        source = getattr(weight, "ds_file_range", None)  # set by peftkit.sharded_load
        if source is not None:
            # frozen rows mapped from the file instead of held: a lookup touches a few pages
            # of the embedding (the head reads all of its rows, from the page cache)
            weight.ds_tensor.data = source.map(weight.ds_tensor.data)
        return weight.ds_tensor.data.view(rows // world, width), rank * (rows // world)
    rows = weight.shape[0]
    if rows % world:
        return None
    per = rows // world
    mine = weight.detach()[rank * per : (rank + 1) * per]
    # a slice of a memory-mapped checkpoint stays a view: only the rows read become resident
    return (mine if is_file_backed(mine) else mine.clone()), rank * per


def shard_vocabulary(model: nn.Module, device: torch.device | None = None) -> str | None:
    """Swap ``model``'s frozen token embedding and (tied or not) bias-free output head for
    vocabulary-parallel ones; returns what was done (for the run log) or None when the model
    does not qualify (a head that trains, a custom embedding class, a vocabulary that does
    not split evenly, not a causal LM). Every rank must call it, before ``prepare``."""
    if not dist.is_initialized() or dist.get_world_size() < 2:
        return None
    base = model
    while hasattr(base, "get_base_model") and base.get_base_model() is not base:
        base = base.get_base_model()
    embed = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if type(embed) is not nn.Embedding or type(head) is not nn.Linear or head.bias is not None:
        return None
    if not type(base).__name__.endswith("ForCausalLM"):
        return None
    if embed.weight.requires_grad or head.weight.requires_grad:
        return None
    tied = head.weight is embed.weight
    embed_rows = _shard_rows(embed.weight)
    head_rows = embed_rows if tied else _shard_rows(head.weight)
    if embed_rows is None or head_rows is None:
        return None
    vocab = embed.num_embeddings
    if device is not None and device.type != "cpu":
        # frozen rows live where they are used (ZeRO-3 may offload them); on the CPU they stay
        # as they are: `.to("cpu:0")` would copy a memory-mapped slice out of its map
        embed_rows = (embed_rows[0].to(device), embed_rows[1])
        head_rows = embed_rows if tied else (head_rows[0].to(device), head_rows[1])
    parallel_head = VocabParallelHead(*head_rows, head.out_features, tied=tied)
    base.set_input_embeddings(VocabParallelEmbedding(*embed_rows, vocab, embed))
    base.set_output_embeddings(parallel_head)
    base.loss_function = functools.partial(causal_lm_loss, head=parallel_head)
    world, _ = _world()
    return (
        f"vocabulary-parallel embedding and head: each rank keeps {vocab // world:,d} of "
        f"{vocab:,d} rows{' (tied)' if tied else ''}; they are never gathered"
    )
