"""Two processes (DDP over gloo on CPU, started by ``torchrun`` as a user would) train the same
adapter as one process with the two shards' batches together: the loop shards batches per rank
and accelerate averages the gradients.

The workers are fresh interpreters (``torchrun -m peftkit train``), not forks of pytest: a fork
of a process whose OpenMP thread pool is already running can deadlock in its first parallel op.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tiny_runs import base_config, make_model, method_block, write_corpus


def _config(root, out, batch):
    task = {"type": "causal_lm", "block_size": 8}
    data = {"train": {"path": str(root / "corpus.txt"), "text_split": "line"}}
    method = {**method_block("lora"), "lora_dropout": 0.0}
    return base_config(
        root / "llama",
        out,
        task,
        data,
        method,
        batch_size=batch,
        max_steps=2,
        epochs=1,
        plots=False,
        tensorboard=False,
        max_grad_norm=None,
    )


def _train(root, name: str, batch: int, processes: int) -> dict[str, torch.Tensor]:
    recipe = root / f"{name}.yaml"
    recipe.write_text(yaml.safe_dump(_config(root, root / name, batch)))
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    launch += [f"--nproc_per_node={processes}", "-m", "peftkit", "train", str(recipe)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(launch, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return load_file(str(root / name / "adapter" / "adapter_model.safetensors"))


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_with_both_shards(tmp_path):
    make_model("llama", tmp_path / "llama")
    write_corpus(tmp_path / "corpus.txt")
    ddp = _train(tmp_path, "ddp", batch=4, processes=2)
    one = _train(tmp_path, "one", batch=8, processes=1)
    assert ddp.keys() == one.keys()
    for key in one:
        torch.testing.assert_close(ddp[key], one[key], rtol=1e-5, atol=1e-7)
    assert any(one[k].abs().sum() > 0 for k in one if "lora_B" in k)
