"""``accelerate launch`` with the shipped accelerate configs, as a user types it: DDP (2 processes
over gloo on CPU) and ZeRO-3 with CPU offload train the same adapter as one process with the two
shards' batches together, the run YAML needing no ``distributed`` block (the strategy and offload
come from the accelerate config, and summary.json says so), and score the eval rows (5, shared
unevenly: DDP without padding, ZeRO-3 with a padding batch) exactly as one process does; a YAML
that disagrees with the accelerate config stops before training.

The workers are fresh interpreters, not forks of pytest: a fork of a process whose OpenMP
thread pool is already running can deadlock in its first parallel op.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tiny_runs import base_config, make_model, method_block, write_corpus

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "accelerate"


def _recipe(root: Path, name: str, batch: int, **extra) -> Path:
    task = {"type": "causal_lm", "block_size": 8}
    data = {"train": {"path": str(root / "corpus.txt"), "text_split": "line"}, "eval_size": 5}
    method = {**method_block("lora"), "lora_dropout": 0.0}
    config = base_config(
        root / "llama",
        root / name,
        task,
        data,
        method,
        batch_size=batch,
        max_steps=2,
        epochs=1,
        plots=False,
        tensorboard=False,
        max_grad_norm=None,
        eval_before_training=True,  # 5 eval rows in 3 batches of 2: shared unevenly by 2 ranks
        eval_batch_size=2,
        **extra,
    )
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _launch(launch: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(launch, capture_output=True, text=True, timeout=600, env=env)


def _accelerate(config: str, recipe: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    launch += [str(EXAMPLES / config), "-m", "peftkit", "train", str(recipe)]
    return _launch(launch, env)


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("launch")
    make_model("llama", root / "llama")
    write_corpus(root / "corpus.txt")
    from peftkit.cli import main

    threads = torch.get_num_threads()
    try:  # the 1-process reference, inside pytest (no interpreter start to pay)
        assert main(["train", str(_recipe(root, "one", 8))]) == 0
    finally:
        torch.set_num_threads(threads)
    return root


@pytest.mark.parametrize(
    ("config", "strategy", "offload", "env"),
    [
        ("ddp.yaml", "ddp", "none", {"ACCELERATE_USE_CPU": "1"}),  # DDP on CPU: gloo
        ("zero3_offload.yaml", "zero3", "cpu", None),
    ],
)
def test_accelerate_launch_matches_one_process(tiny, config, strategy, offload, env):
    name = config.removesuffix(".yaml")
    proc = _accelerate(config, _recipe(tiny, name, 4), env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads((tiny / name / "summary.json").read_text())
    assert (summary["world_size"], summary["strategy"], summary["offload"]) == (
        2,
        strategy,
        offload,
    )
    if offload == "cpu":  # on a CPU-only machine offloading saves nothing, and the run says so
        assert "moves nothing on this CPU-only run" in summary["offload_note"]
        assert "moves nothing" in (tiny / name / "train.log").read_text()
    else:
        assert summary.get("offload_note") is None
    # the evaluation, its batches shared out and gathered, is 1 process's to the last bit
    before = json.loads((tiny / "one" / "summary.json").read_text())["before_training"]
    assert {**summary["before_training"], "time_s": 0} == {**before, "time_s": 0}
    got, want = _adapter(tiny / name), _adapter(tiny / "one")
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-7)
    assert any(want[k].abs().sum() > 0 for k in want if "lora_B" in k)


def test_yaml_and_accelerate_config_disagreeing_stop_the_run(tiny):
    recipe = _recipe(tiny, "disagree", 4, distributed={"strategy": "fsdp"})
    proc = _accelerate("zero2.yaml", recipe)
    assert proc.returncode != 0
    assert "the run YAML says 'fsdp' but the accelerate config says 'zero2'" in proc.stderr
    assert not (tiny / "disagree" / "adapter").exists()
