"""Every strategy (DDP, DeepSpeed ZeRO-2/3, FSDP2) trains the same adapter with 2 processes as
1 process with the same global batch and seed, on CPU over gloo, started as a user would
(``torchrun -m peftkit train``: fresh interpreters, never forks of pytest).

Each 2-process run must: report world size 2 and its strategy in ``summary.json`` (with both
ranks' peak memory), print its report once (rank 0), save the adapter once, complete and
non-empty (ZeRO-3 partitions and FSDP2 shards gathered), in PEFT's format: HF ``peft`` loads it
and gives the same outputs as peftkit.
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

pytest.importorskip("deepspeed")

STRATEGIES = ["ddp", "zero2", "zero3", "fsdp"]


def _config(root: Path, name: str, method: str, batch: int, strategy: str | None, **top) -> Path:
    task = {"type": "causal_lm", "block_size": 8}
    data = {"train": {"path": str(root / "corpus.txt"), "text_split": "line"}}
    block = method_block(method)
    if method in ("lora", "qlora"):
        block["lora_dropout"] = 0.0
    steps = 4 if method == "adalora" else 2  # AdaLoRA needs steps between tinit and tfinal
    config = base_config(
        root / "llama",
        root / name,
        task,
        data,
        block,
        batch_size=batch,
        max_steps=steps,
        epochs=1,
        plots=False,
        tensorboard=False,
        max_grad_norm=None,
        **top,
    )
    if strategy is not None:
        config["distributed"] = {"strategy": strategy}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def train(root: Path, recipe: Path, processes: int) -> subprocess.CompletedProcess:
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    launch += [f"--nproc_per_node={processes}", "-m", "peftkit", "train", str(recipe)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(launch, capture_output=True, text=True, timeout=600, env=env, cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return proc


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter" / "adapter_model.safetensors"))


def assert_same_adapter(got: dict, want: dict, rel: float = 1e-4) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].shape == want[key].shape and got[key].numel() > 0, key
        err = (got[key] - want[key]).norm() / want[key].norm().clamp_min(1e-12)
        assert err <= rel, f"{key}: relative error {float(err):.2e}"


def assert_two_process_run(proc: subprocess.CompletedProcess, out: Path, strategy: str) -> None:
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["strategy"] == strategy and summary["offload"] == "none"
    assert [p["rank"] for p in summary["rank_peaks"]] == [0, 1]
    assert all(p["cpu_peak_mb"] > 0 for p in summary["rank_peaks"])
    assert all(len(m["ranks"]) == 2 for m in summary["memory"])
    # rank 0 reports, once: one adapter line, one own + one max-over-ranks memory report
    assert proc.stdout.count("adapter: ") == 1
    assert proc.stdout.count("CPU Total Peak Memory consumed during the train (max):") == 1
    assert proc.stdout.count("during the train (max over 2 ranks) (max):") == 1
    assert proc.stdout.count("peftkit train: ") == 1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist")
    make_model("llama", root / "llama")
    write_corpus(root / "corpus.txt")
    return root


@pytest.fixture(scope="module")
def one_process(tiny) -> dict[str, torch.Tensor]:
    """The reference: 1 process, the global batch (8) in one go."""
    train(tiny, _config(tiny, "one", "lora", 8, None), 1)
    return adapter(tiny / "one")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_lora_two_processes_make_the_one_process_adapter(tiny, one_process, strategy):
    name = f"lora-{strategy}"
    proc = train(tiny, _config(tiny, name, "lora", 4, strategy), 2)
    assert_two_process_run(proc, tiny / name, strategy)
    got = adapter(tiny / name)
    assert_same_adapter(got, one_process)
    assert any(got[k].abs().sum() > 0 for k in got if "lora_B" in k)  # it trained


@pytest.mark.parametrize("strategy", ["zero3", "fsdp"])
def test_sharded_adapter_loads_in_peft_with_the_same_outputs(tiny, one_process, strategy):
    """The gathered adapter is PEFT's format: ``peft.PeftModel`` and peftkit agree on it."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    import peftkit

    folder = tiny / f"lora-{strategy}" / "adapter"
    if not folder.exists():
        train(tiny, _config(tiny, f"lora-{strategy}", "lora", 4, strategy), 2)
    ids = torch.tensor([[2, 10, 11, 12, 13, 3]])
    theirs = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny / "llama"), folder
    ).eval()
    ours = peftkit.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny / "llama"), folder
    ).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny / "llama").eval()
    with torch.no_grad():
        want = ours(input_ids=ids).logits
        torch.testing.assert_close(theirs(input_ids=ids).logits, want)
        assert not torch.allclose(base(input_ids=ids).logits, want)  # the adapter does something


METHODS = ["adalora", "prompt_tuning", "p_tuning", "prefix_tuning"]


@pytest.fixture(scope="module")
def one_process_by_method(tiny) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for method in METHODS:
        train(tiny, _config(tiny, f"{method}-one", method, 8, None), 1)
        out[method] = adapter(tiny / f"{method}-one")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["zero3", "fsdp"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_two_processes_make_the_one_process_adapter(
    tiny, one_process_by_method, method, strategy
):
    """AdaLoRA (orthogonality penalty on sharded factors, rank allocation from gathered
    gradients) and the prompt methods (P-tuning's encoder run inside the gathering) too."""
    name = f"{method}-{strategy}"
    proc = train(tiny, _config(tiny, name, method, 4, strategy), 2)
    assert_two_process_run(proc, tiny / name, strategy)
    assert_same_adapter(adapter(tiny / name), one_process_by_method[method])
    if method == "adalora":  # the same ranks were kept
        pattern = json.loads((tiny / name / "adapter" / "adapter_config.json").read_text())
        want = json.loads((tiny / "adalora-one" / "adapter" / "adapter_config.json").read_text())
        assert pattern["rank_pattern"] == want["rank_pattern"]


def test_qlora_is_refused_where_parameters_are_sharded(tiny):
    from peftkit.train.config import ConfigError, load_config

    for strategy in ("zero3", "fsdp"):
        with pytest.raises(ConfigError, match="ZeRO-3 and FSDP2 cannot cut"):
            load_config(_config(tiny, f"q-{strategy}", "qlora", 4, strategy))


@pytest.mark.slow
def test_qlora_two_processes_under_zero2(tiny):
    train(tiny, _config(tiny, "qlora-one", "qlora", 8, None), 1)
    proc = train(tiny, _config(tiny, "qlora-zero2", "qlora", 4, "zero2"), 2)
    assert_two_process_run(proc, tiny / "qlora-zero2", "zero2")
    assert_same_adapter(adapter(tiny / "qlora-zero2"), adapter(tiny / "qlora-one"))


def test_zero3_resume_continues_exactly(tiny):
    """Stopped at step 2 of 4 (DeepSpeed's own per-rank checkpoint of the trainable partitions,
    moments included), resumed by 2 fresh processes: the same adapter as the straight run."""
    recipe = _config(tiny, "z3-full", "lora", 4, "zero3", save_steps=2, save_total_limit=3)
    text = yaml.safe_load(recipe.read_text())
    text["max_steps"] = 4
    recipe.write_text(yaml.safe_dump(text))
    train(tiny, recipe, 2)
    step2 = tiny / "z3-full" / "checkpoints" / "step-00000002"
    assert (step2 / "deepspeed").is_dir() and (step2 / "adapter").is_dir()
    text["output_dir"] = str(tiny / "z3-resumed")
    resumed = tiny / "z3-resumed.yaml"
    resumed.write_text(yaml.safe_dump(text))
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    launch += ["-m", "peftkit", "train", str(resumed), "--resume", str(step2)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(launch, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    assert proc.stdout.count("resumed from") == 1
    assert_same_adapter(adapter(tiny / "z3-resumed"), adapter(tiny / "z3-full"), rel=1e-6)
