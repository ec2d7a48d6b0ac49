"""Two processes (DDP over gloo, on CPU, through accelerate's debug launcher) train the same
adapter as one process with the two shards' batches together: the loop shards batches per rank
and accelerate averages the gradients."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tiny_runs import base_config, make_model, method_block, write_corpus


def _worker(config: dict) -> None:
    from accelerate.state import AcceleratorState

    from peftkit.train.config import load_config
    from peftkit.train.run import run_train

    AcceleratorState._reset_state(True)  # forked from pytest: forget the parent's single process
    run_train(load_config(None, data=config))


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


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_with_both_shards(tmp_path):
    from accelerate import debug_launcher
    from accelerate.state import AcceleratorState

    from peftkit.train.config import load_config
    from peftkit.train.run import run_train

    make_model("llama", tmp_path / "llama")
    write_corpus(tmp_path / "corpus.txt")
    debug_launcher(_worker, args=(_config(tmp_path, tmp_path / "ddp", 4),), num_processes=2)
    AcceleratorState._reset_state(True)
    run_train(load_config(None, data=_config(tmp_path, tmp_path / "one", 8)))
    ddp = load_file(str(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors"))
    one = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    assert ddp.keys() == one.keys()
    for key in one:
        torch.testing.assert_close(ddp[key], one[key], rtol=1e-5, atol=1e-7)
    assert any(one[k].abs().sum() > 0 for k in one if "lora_B" in k)
