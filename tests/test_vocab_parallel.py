"""The vocabulary-parallel embedding and head (``peftkit.vocab_parallel``) give the plain
model's numbers: two fresh ``torchrun`` workers (gloo), each with its own batch (different
batch sizes and lengths, ignored labels), against every batch run through the plain model in
one process.

Checked: each rank's loss equals the plain loss of its batch; the LoRA gradients averaged over
ranks (what ZeRO-3 / FSDP2 / DDP then apply) equal the mean of the plain per-batch gradients;
without gradients the head gives each rank its tokens' whole logits; tied (BLOOM) and untied
(Llama) heads; greedy generation through the swapped model equals the plain model's; and the
parameter counts are the whole model's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = r"""
import copy, json, sys
import torch, torch.distributed as dist
sys.path.insert(0, sys.argv[2])
from tiny_models import tiny_model
from peftkit import LoraConfig, get_peft_model
from peftkit.vocab_parallel import VocabParallelEmbedding, VocabParallelHead, shard_vocabulary

dist.init_process_group("gloo")
world, rank = dist.get_world_size(), dist.get_rank()
arch, targets = sys.argv[1], {"llama": ["q_proj", "v_proj"], "bloom": ["query_key_value"]}

def model():
    torch.manual_seed(0)
    base = tiny_model(arch, "CAUSAL_LM", vocab_size=64)
    torch.manual_seed(1)
    peft = get_peft_model(base, LoraConfig(r=4, target_modules=targets[arch], lora_dropout=0.0))
    for n, p in peft.named_parameters():  # B = 0 at init: give the adapter a real effect
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    return peft

def batch(s):
    g = torch.Generator().manual_seed(10 + s)
    b, t = (3, 7) if s == 0 else (2, 5)  # the ranks' batches differ in size and length
    ids = torch.randint(0, 64, (b, t), generator=g)
    labels = ids.clone()
    labels[0, :2] = -100  # a prompt left out of the loss
    return ids, labels

def grads(m):
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}

plain = model().train()
want_loss, want_grad = [], None
for s in range(world):
    plain.zero_grad()
    ids, labels = batch(s)
    loss = plain(input_ids=ids, labels=labels).loss
    loss.backward()
    want_loss.append(float(loss))
    g = grads(plain)
    want_grad = g if want_grad is None else {k: want_grad[k] + g[k] for k in g}
want_grad = {k: v / world for k, v in want_grad.items()}

par = model().train()
counts_before = par.get_nb_trainable_parameters()
note = shard_vocabulary(par)
same_counts = par.get_nb_trainable_parameters() == counts_before
base = par.get_base_model()
swapped = isinstance(base.get_input_embeddings(), VocabParallelEmbedding) and isinstance(
    base.get_output_embeddings(), VocabParallelHead)
ids, labels = batch(rank)
loss = par(input_ids=ids, labels=labels).loss
loss.backward()
got = grads(par)
for v in got.values():
    dist.all_reduce(v)
    v /= world
grad_err = max(float((got[k] - want_grad[k]).abs().max() / want_grad[k].abs().max()) for k in got)

par.eval(), plain.eval()
with torch.no_grad():
    logit_err = float((par(input_ids=ids).logits - plain(input_ids=ids).logits).abs().max())
    embed_err = float((base.get_input_embeddings()(ids)
                       - plain.get_base_model().get_input_embeddings()(ids)).abs().max())
    prompt = ids[:1, :3]
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, synced_gpus=True)
    same_generation = torch.equal(par.generate(input_ids=prompt, **kw),
                                  plain.generate(input_ids=prompt, **kw))
out = {"rank": rank, "note": note, "swapped": swapped, "same_counts": same_counts, "loss": float(loss),
       "want_loss": want_loss[rank], "grad_err": grad_err, "logit_err": logit_err,
       "embed_err": embed_err, "same_generation": same_generation}
every = [None] * world
dist.all_gather_object(every, out)
if rank == 0:
    print("RESULT " + json.dumps(every))
"""

HERE = Path(__file__).resolve().parent


def _run(tmp_path: Path, arch: str) -> list[dict]:
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*args, str(worker), arch, str(HERE)], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    line = [s for s in proc.stdout.splitlines() if s.startswith("RESULT ")][-1]
    ranks = json.loads(line[len("RESULT ") :])
    assert len(ranks) == 2  # the world size this test expects
    return ranks


@pytest.mark.parametrize("arch", ["llama", "bloom"])
def test_vocabulary_parallel_equals_the_plain_model(tmp_path, arch):
    for rank in _run(tmp_path, arch):
        assert rank["swapped"] and "32 of 64 rows" in rank["note"]
        assert rank["same_counts"]  # the slices count as the whole matrices they stand for
        assert rank["loss"] == pytest.approx(rank["want_loss"], rel=1e-5)
        assert rank["grad_err"] < 1e-5, rank
        assert rank["logit_err"] < 1e-5 and rank["embed_err"] == 0.0, rank
        assert rank["same_generation"], rank
