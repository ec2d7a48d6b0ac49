"""Several machines: two ``torchrun --nnodes 2`` launches on this one machine (one process each,
rendezvous on localhost, as README's cluster commands with ``--rdzv-endpoint``) train the
adapter that one node with two processes trains, under DDP and ZeRO-3.

The two "nodes" share this machine's disk, as cluster nodes share a filesystem for the run
folder; rank 0 (node 0) writes the run folder, every rank its own ZeRO checkpoint part.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tiny_runs import base_config, make_model, method_block, write_corpus

pytest.importorskip("deepspeed")


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _config(root: Path, name: str, strategy: str) -> Path:
    method = method_block("lora")
    method["lora_dropout"] = 0.0
    config = base_config(
        root / "llama",
        root / name,
        {"type": "causal_lm", "block_size": 8},
        {"train": {"path": str(root / "corpus.txt"), "text_split": "line"}},
        method,
        batch_size=4,
        max_steps=3,
        epochs=1,
        save_steps=2,
        plots=False,
        tensorboard=False,
        max_grad_norm=None,
        distributed={"strategy": strategy},
    )
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _one_node(config: Path) -> None:
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    proc = subprocess.run(
        [*args, "-m", "peftkit", "train", str(config)],
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def _two_nodes(config: Path) -> list[str]:
    """Node 0 and node 1, started as two separate commands would be on two machines."""
    endpoint = f"127.0.0.1:{_port()}"
    procs = []
    for node in (0, 1):
        args = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1"]
        args += [f"--node-rank={node}", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}"]
        args += ["--rdzv-id=peftkit-test", "-m", "peftkit", "train", str(config)]
        procs.append(
            subprocess.Popen(
                args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()
            )
        )
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        if proc.returncode != 0 and _aborted_at_exit(config, err):
            # KNOWN DEFECT (open): now and then a node's worker aborts in C++ teardown after its
            # run completed and saved (gloo / c10d store threads at interpreter exit); the
            # run's results below are still checked in full
            warnings.warn("a node's worker aborted at exit after completing its run", stacklevel=1)
            outputs.append(out)
            continue
        assert proc.returncode == 0, err[-3000:]
        outputs.append(out)
    return outputs


def _aborted_at_exit(config: Path, err: str) -> bool:
    """The run finished (summary.json says completed) and the only failure is the C++
    runtime's abort at interpreter exit."""
    summary = config.parent / config.stem / "summary.json"
    if "terminate called without an active exception" not in err or not summary.exists():
        return False
    return json.loads(summary.read_text()).get("status") == "completed"


@pytest.mark.parametrize("strategy", ["ddp", "zero3"])
def test_two_nodes_train_the_one_node_adapter(tmp_path, strategy):
    make_model("llama", tmp_path / "llama")
    write_corpus(tmp_path / "corpus.txt")
    _one_node(_config(tmp_path, "one-node", strategy))
    outputs = _two_nodes(_config(tmp_path, "two-nodes", strategy))
    summary = json.loads((tmp_path / "two-nodes" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["strategy"] == strategy
    assert sum(out.count("adapter: ") for out in outputs) == 1  # global rank 0 reports, once
    got = load_file(str(tmp_path / "two-nodes" / "adapter" / "adapter_model.safetensors"))
    want = load_file(str(tmp_path / "one-node" / "adapter" / "adapter_model.safetensors"))
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-8)
    assert any(want[k].abs().sum() > 0 for k in want if "lora_B" in k)
    checkpoint = tmp_path / "two-nodes" / "checkpoints" / "step-00000002"
    assert (checkpoint / "trainer_state.json").exists()
