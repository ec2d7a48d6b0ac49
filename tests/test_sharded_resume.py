"""A crash under sharding resumes exactly: 2 processes (ZeRO-2, ZeRO-3, FSDP2), a BERT
classifier with dropout (its own and LoRA's), one rank killed with SIGKILL in the middle of
epoch 2; fresh processes resume (a) from the periodic checkpoint written mid-epoch just
before the kill, (b) from the checkpoint of the epoch boundary before it. Both give the
uninterrupted run's adapter, trainable head included, and its per-epoch evaluations.

What a sharded checkpoint must hold for that: each rank's own generator states (the ranks
draw dropout masks for batches of their own shapes, so their streams part after the first
step), DeepSpeed's partitioned optimizer state or FSDP2's gathered one, the data position.
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tiny_runs import LABELS, NEGATIVE, POSITIVE, base_config, make_model, method_block

pytest.importorskip("deepspeed")

HERE = Path(__file__).resolve().parent
KILL_AT = 7  # epoch 2 holds steps 5-8; periodic checkpoints at 3 and 6, epoch ends at 4 and 8
KILLER = r"""
import os, signal, sys
from peftkit.train.config import load_config
from peftkit.train.run import run_train

def kill(progress):
    if os.environ["RANK"] == "1" and progress.global_step == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no checkpoint: a crash

run_train(load_config(sys.argv[1]), on_step=kill)
"""


def _reviews(path: Path, n: int = 40) -> Path:
    """Reviews of 8 to 12 words: the ranks' batches differ in length, so their dropout masks
    differ in size and their generators part after the first step."""
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        label = rng.choice(LABELS)
        a, b = rng.sample(POSITIVE if label == "positive" else NEGATIVE, 2)
        very = " ".join(["very"] * rng.randint(1, 5))
        rows.append({"review": f"the food was {a} and staff {very} {b}", "label": label})
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["review", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def _config(root: Path, strategy: str) -> Path:
    method = method_block("lora", "bert")  # lora_dropout 0.1: masks drawn every step
    config = base_config(
        root / "bert",
        root / strategy,
        {"type": "seq_cls", "text": "{review}", "label": "label"},
        {"train": str(root / "reviews.csv"), "eval_size": 8},
        method,
        batch_size=4,  # 4 per process: 32 train rows are 4 steps an epoch
        epochs=3,
        lr=2e-2,
        save_steps=3,
        save_total_limit=10,
        plots=False,
        tensorboard=False,
        distributed={"strategy": strategy},
    )
    path = root / f"{strategy}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [*launch, *args], capture_output=True, text=True, timeout=900, env=env, cwd=cwd
    )


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _evals(run: Path) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r["eval_loss"] for r in map(json.loads, lines) if r["kind"] == "eval"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sharded_resume")
    make_model("bert", root / "bert")
    _reviews(root / "reviews.csv")
    (root / "killer.py").write_text(KILLER)
    return root


@pytest.mark.parametrize("strategy", ["zero2", "zero3", "fsdp"])
def test_a_killed_rank_resumes_to_the_uninterrupted_run(root, strategy):
    config = _config(root, strategy)
    run = root / strategy
    killed = _torchrun([str(root / "killer.py"), str(config), str(KILL_AT)], root)
    assert killed.returncode != 0  # torchrun stopped both ranks
    assert not (run / "adapter").exists()
    steps = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert steps == ["step-00000003", "step-00000004", "step-00000006"], steps
    boundary = root / f"{strategy}-boundary"  # the run folder as the crash left it
    shutil.copytree(run, boundary)
    straight = root / f"{strategy}-straight"
    commands = [
        ["train", str(config), "--resume"],  # the latest: step 6, mid-epoch 2
        ["train", str(config), f"output_dir={boundary}", "--resume",
         str(boundary / "checkpoints" / "step-00000004")],  # the end of epoch 1
        ["train", str(config), f"output_dir={straight}"],
    ]  # fmt: skip
    done = _torchrun([str(HERE / "run_recipes.py"), json.dumps(commands)], root)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert done.stdout.count("resumed from") == 2

    want = _adapter(straight)
    assert any("classifier" in k for k in want)  # the head (modules_to_save) resumes too
    for resumed in (run, boundary):
        got = _adapter(resumed)
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), f"{resumed.name}: {key} differs"
        assert _evals(resumed) == _evals(straight)  # epochs 1-3, the logged ones
