"""ZeRO-3 loading is partitioned from the start: every parameter is an empty local tensor plus
its rank's partition before ``accelerator.prepare`` ever runs, each rank read only its part of
the checkpoint, and the partitions gathered are the checkpoint's tensors.

Two fresh workers (``torchrun``, gloo) load tiny Llama and BLOOM folders with
``load_base_model(..., zero3_config=...)``, as the trainer does for ``distributed.strategy:
zero3``, with transformers' own ZeRO-3 loader switched off (it would gather every module).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_models import tiny_model
from tiny_runs import make_model, make_tokenizer, vocab_size

pytest.importorskip("deepspeed")

WORKER = r"""
import json, sys
import torch, torch.distributed as dist
import deepspeed
import transformers.integrations.deepspeed as hf_ds
from safetensors.torch import load_file
from transformers.integrations import HfDeepSpeedConfig
from peftkit.models import load_base_model
from peftkit.sharded_load import partition_range

def refuse(*a, **k):
    raise AssertionError("transformers' ZeRO-3 loader ran")
hf_ds._load_state_dict_into_zero3_model = refuse
hf_ds.initialize_weights_zero3 = refuse

deepspeed.init_distributed(dist_backend="gloo")
world, rank = dist.get_world_size(), dist.get_rank()
out = {}
for folder, task, labels in json.loads(sys.argv[1]):
    ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    # alive, as accelerate keeps one for its DeepSpeed plugin: transformers would then build
    # under its own zero.Init (gathering every module to initialise it)
    plain, _ = load_base_model(folder, task=task, **(({"num_labels": labels}) if labels else {}))
    keep = HfDeepSpeedConfig(ds)
    kw = {"num_labels": labels} if labels else {}
    model, _ = load_base_model(folder, task=task, zero3_config=ds, **kw)
    params = dict(model.named_parameters())
    partitioned = all(hasattr(p, "ds_id") and p.numel() == 0 for p in params.values())
    sizes = all(p.ds_tensor.numel() == -(-p.ds_numel // world) for p in params.values())
    ranges = {n: partition_range(p) for n, p in params.items()}
    ref = load_file(f"{folder}/model.safetensors")
    prefix = model.base_model_prefix
    errors, missing = {}, []
    with deepspeed.zero.GatheredParameters(list(params.values())):
        for name, p in params.items():
            key = name if name in ref else name.removeprefix(prefix + ".")
            if key not in ref:
                missing.append(name)
                errors[name] = float(p.abs().sum())  # initialised, not zero
                continue
            errors[name] = float((p.detach() - ref[key]).abs().max())
    # the whole model, gathered, computes what the plain model computes (buffers included)
    ids = torch.tensor([[2, 5, 6, 7, 8, 3]])
    with deepspeed.zero.GatheredParameters(list(params.values())), torch.no_grad():
        model.eval()
        output_err = float((model(input_ids=ids).logits - plain(input_ids=ids).logits).abs().max())
        if task == "seq_cls":  # the freshly initialised head differs: compare the body
            output_err = float((model.model(input_ids=ids).last_hidden_state
                                - plain.model(input_ids=ids).last_hidden_state).abs().max())
    mapped, vocab_err = None, None
    if task == "causal_lm" and model.config.vocab_size % world == 0:
        # vocabulary-parallel rows of a partitioned load are a map of the checkpoint file
        from peftkit.vocab_parallel import shard_vocabulary
        model.requires_grad_(False)  # frozen, as under an adapter
        assert shard_vocabulary(model) is not None
        rows = model.get_input_embeddings().shard
        lo, address = rows.data_ptr(), rows.data_ptr() + rows.numel() * rows.element_size()
        maps = [line.split() for line in open("/proc/self/maps")]
        mapped = any(int(m[0].split("-")[0], 16) <= lo and address <= int(m[0].split("-")[1], 16)
                     and m[-1].endswith("model.safetensors") for m in maps)
        with deepspeed.zero.GatheredParameters(list(model.parameters())), torch.no_grad():
            vocab_err = float((model(input_ids=ids).logits - plain(input_ids=ids).logits).abs().max())
    out[f"{folder}:{task}"] = {"mapped": mapped, "vocab_err": vocab_err, "output_err": output_err, "partitioned": partitioned, "sizes": sizes, "errors": errors,
                   "missing": missing, "ranges": {n: list(r) for n, r in ranges.items()},
                   "numels": {n: int(p.ds_numel) for n, p in params.items()}}
    del keep  # the next plain load must not see ZeRO-3
dist.barrier()
gathered = [None] * world
dist.all_gather_object(gathered, out)
if rank == 0:
    print("RESULT " + json.dumps(gathered))
"""


def _bloom(folder: Path) -> Path:
    """A tiny BLOOM (tied embeddings) with an odd vocabulary: the embedding's two partitions
    meet in the middle of a row."""
    tiny_model("bloom", "CAUSAL_LM", vocab_size=vocab_size() + 1).save_pretrained(folder)
    make_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    llama, bloom = make_model("llama", root / "llama"), _bloom(root / "bloom")
    jobs = [
        [str(llama), "causal_lm", None],
        [str(bloom), "causal_lm", None],  # tied embeddings: one tensor, two names
        [str(llama), "seq_cls", 3],  # `score` is not in the checkpoint: initialised
    ]
    worker = root / "worker.py"
    worker.write_text(WORKER)
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(
        [*args, str(worker), json.dumps(jobs)], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    line = [s for s in proc.stdout.splitlines() if s.startswith("RESULT ")][-1]
    ranks = json.loads(line[len("RESULT ") :])
    assert len(ranks) == 2  # the world size this test expects
    return ranks, f"{llama}:causal_lm", f"{bloom}:causal_lm", f"{llama}:seq_cls"


def test_every_parameter_is_partitioned_before_prepare(loaded):
    ranks, *jobs = loaded
    for rank in ranks:
        for folder in jobs:
            assert rank[folder]["partitioned"], "a parameter was left whole"
            assert rank[folder]["sizes"], "a partition is not ceil(numel / world)"


def test_the_ranks_split_each_tensor_without_overlap(loaded):
    ranks, llama, *_ = loaded
    numels = ranks[0][llama]["numels"]
    for name, numel in numels.items():
        (a0, a1), (b0, b1) = ranks[0][llama]["ranges"][name], ranks[1][llama]["ranges"][name]
        assert (a0, b1) == (0, numel) and a1 == b0, name  # rank 0 the front, rank 1 the rest


def test_gathered_partitions_are_the_checkpoint(loaded):
    ranks, llama, bloom, _ = loaded
    for rank in ranks:
        for folder in (llama, bloom):
            assert rank[folder]["missing"] == []
            worst = max(rank[folder]["errors"].values())
            assert worst == 0.0, f"{folder}: a gathered parameter differs by {worst}"


def test_the_partitioned_model_computes_the_plain_models_outputs(loaded):
    ranks, *jobs = loaded
    for rank in ranks:
        for job in jobs:
            assert rank[job]["output_err"] < 1e-6, job  # rotary tables and buffers intact


def test_a_head_the_checkpoint_lacks_is_initialised(loaded):
    ranks, *_, classifier = loaded
    for rank in ranks:
        assert rank[classifier]["missing"] == ["score.weight"]
        assert rank[classifier]["errors"]["score.weight"] > 0


def test_vocabulary_parallel_rows_are_a_map_of_the_checkpoint(loaded):
    """The frozen embedding rows a rank keeps after a partitioned load are read from the file
    when touched (not held), and the swapped model still computes the plain logits."""
    ranks, llama, *_ = loaded
    for rank in ranks:
        assert rank[llama]["mapped"] is True
        assert rank[llama]["vocab_err"] < 1e-5
