"""peftkit.heap: trimming gives freed heap pages back, the trainer trims once per training
forward (before the output head) and never during evaluation, and trimming changes no number."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftkit
import peftkit.heap as heap
from peftkit.train.config import load_config
from peftkit.train.run import run_train
from tiny_models import tiny_model
from tiny_runs import base_config, make_model, method_block, write_corpus

glibc_only = pytest.mark.skipif(
    not sys.platform.startswith("linux") or heap._malloc_trim() is None,
    reason="platform: malloc_trim is glibc's",
)


@glibc_only
def test_trim_heap_returns_the_pages_of_freed_blocks_below_live_ones():
    """A fresh interpreter frees 96 one-MB blocks, each pinned below a 64 KB live block, so the
    heap cannot shrink from the top: RssAnon stays up until trim_heap() gives the pages back."""
    script = textwrap.dedent(
        """
        import re
        import torch
        from peftkit.heap import trim_heap

        def anon_mb():
            status = open("/proc/self/status").read()
            return int(re.search(r"RssAnon:\\s+(\\d+)", status).group(1)) / 1024

        big = torch.ones(8 * 2**20, dtype=torch.uint8)
        del big  # freeing a mapped 8 MB block lifts glibc's mmap threshold above 1 MB
        blocks, pins = [], []
        for _ in range(96):
            blocks.append(torch.ones(2**20, dtype=torch.uint8))  # touched: resident
            pins.append(torch.ones(64 * 1024, dtype=torch.uint8))  # from the top: a pin
        before = anon_mb()
        del blocks
        freed = anon_mb()
        assert trim_heap()
        print(before, freed, anon_mb())
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    before, freed, trimmed = map(float, out.stdout.split())
    assert freed > before - 16  # freeing alone keeps the pages (the point of trimming)
    assert trimmed < freed - 64  # ~96 MB given back


def test_output_head_is_found_through_wrappers_and_absent_without_one():
    model = tiny_model("llama", "CAUSAL_LM")
    assert heap.output_head(model) is model.lm_head
    wrapped = peftkit.get_peft_model(model, peftkit.LoraConfig(target_modules=["q_proj"]))
    assert heap.output_head(wrapped) is model.lm_head
    assert heap.output_head(nn.Sequential(nn.Linear(4, 4))) is None

    class Undeclared(nn.Linear):
        def get_output_embeddings(self):
            raise NotImplementedError

    assert heap.output_head(Undeclared(4, 4)) is None


@glibc_only
def test_backward_trims_once_before_each_blocks_backward(monkeypatch):
    """Sharded runs free a block's gathered weights after its backward too: with ``backward``
    the trainer also trims once per block (and head) in the backward pass, nothing in eval."""
    calls = []
    monkeypatch.setattr(heap, "trim_heap", lambda: calls.append(1) or True)
    model = tiny_model("llama", "CAUSAL_LM")
    points = len(model.model.layers) + 1  # blocks + head
    ids = torch.tensor([[1, 2, 3]])
    with heap.trimming_heap(model, "blocks", backward=True):
        loss = model(input_ids=ids, labels=ids).loss
        assert len(calls) == points
        loss.backward()
        assert len(calls) == 2 * points
    model(input_ids=ids, labels=ids).loss.backward()  # the hooks are gone
    assert len(calls) == 2 * points


def test_blocks_sharded_by_fsdp2_are_still_blocks():
    """fully_shard swaps a block's class for a subclass named FSDP<name>: trimming before
    each block must still find them (it found none under FSDP2 before)."""
    model = tiny_model("llama", "CAUSAL_LM")
    for layer in model.model.layers:
        layer.__class__ = type(f"FSDP{type(layer).__name__}", (type(layer),), {})
    assert heap.repeated_blocks(model) == list(model.model.layers)


@glibc_only
def test_the_hooks_trim_only_training_forwards_and_go_away(monkeypatch):
    calls = []
    monkeypatch.setattr(heap, "trim_heap", lambda: calls.append(1) or True)
    model = tiny_model("llama", "CAUSAL_LM")
    layers = len(model.model.layers)
    assert heap.repeated_blocks(model) == list(model.model.layers)
    ids = torch.tensor([[1, 2, 3]])
    for where, per_forward in (("head", 1), ("blocks", layers + 1), ("none", 0)):
        calls.clear()
        with heap.trimming_heap(model, where) as hooks:
            assert hooks == per_forward
            model(input_ids=ids)
            with torch.no_grad():
                model(input_ids=ids)
            assert len(calls) == per_forward, where
        model(input_ids=ids)  # the hooks are gone with the context
        assert len(calls) == per_forward, where
    assert not model.lm_head._forward_pre_hooks
    assert not model.model.layers[0]._forward_pre_hooks
    with pytest.raises(ValueError, match="trim_heap=.always.: use one of head, blocks, none"):
        heap.trim_points(model, "always")


def evaluations_in(run: Path) -> int:
    """How many evaluations a run logged (its metrics.jsonl's evaluation records)."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return sum(json.loads(line)["kind"] in ("eval", "test") for line in lines)


@glibc_only
def test_the_trainer_trims_per_training_forward_and_changes_nothing(tmp_path, monkeypatch):
    calls = []
    real = heap.trim_heap
    monkeypatch.setattr(heap, "trim_heap", lambda: calls.append(1) or real())
    llama = make_model("llama", tmp_path / "llama")
    corpus = write_corpus(tmp_path / "corpus.txt", n=24)

    def config(out, trim):
        task = {"type": "causal_lm", "block_size": 8}
        data = {"train": {"path": str(corpus), "text_split": "line"}, "eval_size": 4}
        return load_config(
            None,
            data=base_config(
                llama,
                out,
                task,
                data,
                method_block("lora"),
                batch_size=4,
                grad_accum=2,
                epochs=1,
                max_steps=2,
                plots=False,
                tensorboard=False,
                trim_heap=trim,
            ),
        )

    run_train(config(tmp_path / "none", "none"))
    assert not calls
    run_train(config(tmp_path / "head", "head"))
    evaluations = evaluations_in(tmp_path / "head")
    assert evaluations >= 1
    # 2 steps x 2 micro-batches, and one trim before each evaluation (none inside it)
    assert len(calls) == 4 + evaluations
    run_train(config(tmp_path / "blocks", "blocks"))
    layers = json.loads((llama / "config.json").read_text())["num_hidden_layers"]
    assert len(calls) == 4 + evaluations + 4 * (layers + 1) + evaluations
    plain = load_file(str(tmp_path / "none" / "adapter" / "adapter_model.safetensors"))
    for where in ("head", "blocks"):
        trimmed = load_file(str(tmp_path / where / "adapter" / "adapter_model.safetensors"))
        assert trimmed.keys() == plain.keys()
        for key in plain:
            assert torch.equal(trimmed[key], plain[key]), (where, key)


@glibc_only
def test_a_trim_drops_the_4bit_scratch_and_backward_rebuilds_it():
    """Trimming drops the 4-bit layers' dequantisation scratch (registered with
    ``register_cache``), also between a forward and its backward, which dequantises again into
    a new pool: the same gradient, bit for bit."""
    from peftkit.quant import Linear4bit, linear4bit

    torch.manual_seed(0)
    q = Linear4bit.from_linear(nn.Linear(128, 64))
    x = torch.randn(3, 128, requires_grad=True)
    q(x).pow(2).sum().backward()
    expected, x.grad = x.grad.clone(), None
    pool = linear4bit._scratch()
    assert pool._buffers  # the weight was built there
    assert heap.trim_heap()
    assert linear4bit._THREAD.pool is None
    y = q(x)
    heap.trim_heap()
    y.pow(2).sum().backward()
    torch.testing.assert_close(x.grad, expected, rtol=0, atol=0)
    assert linear4bit._scratch() is not pool and linear4bit._scratch()._buffers
