"""Quiet runs: a `peftkit` command prints nothing its user cannot act on (peftkit.quiet), while
the user's own warnings and a dependency's other messages stay visible."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings

import pytest
import torch

from peftkit.quiet import quiet_dependencies
from test_text_to_image import LORA, assets, write_config  # noqa: F401 (assets: a fixture)

# what the dependencies printed on every run before (DeepSpeed on import, bitsandbytes through
# diffusers), and what deprecations peftkit's own calls used to cause
FORBIDDEN = (
    "Setting accelerator to CPU",
    "real_accelerator",
    "kernels-community",
    "FutureWarning",
    "DeprecationWarning",
)


def test_a_text_to_image_run_prints_nothing_on_stderr(assets, tmp_path):  # noqa: F811
    """A text-to-image run imports diffusers (so bitsandbytes) and saves with transformers (so
    DeepSpeed): neither's line reaches the user; the run's own output goes to stdout."""
    recipe = write_config(assets, "quiet", LORA, epochs=1, output_dir=str(tmp_path / "run"))
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    env.pop("PYTHONWARNINGS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "peftkit", "train", str(recipe)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line in FORBIDDEN:
        assert line not in proc.stderr, proc.stderr[-3000:]
    assert "Warning" not in proc.stderr, proc.stderr[-3000:]
    assert "adapter:" in proc.stdout


def test_only_the_dependencies_lines_are_dropped(caplog, monkeypatch):
    quiet_dependencies()
    quiet_dependencies()  # idempotent: one filter
    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    assert len(bnb.filters) == 1
    with caplog.at_level(logging.WARNING):
        bnb.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s", "x")
        bnb.warning("a bitsandbytes warning about something else")
    assert [r.getMessage() for r in caplog.records] == [
        "a bitsandbytes warning about something else"
    ]
    with pytest.warns(UserWarning, match="the user's own"):
        warnings.warn("the user's own warning", UserWarning, stacklevel=1)
    # DeepSpeed is told the accelerator only where torch has none, never against the user
    monkeypatch.setenv("DS_ACCELERATOR", "xpu")
    quiet_dependencies()
    assert os.environ["DS_ACCELERATOR"] == "xpu"
    monkeypatch.delenv("DS_ACCELERATOR")
    quiet_dependencies()
    if not torch.cuda.is_available():
        assert os.environ["DS_ACCELERATOR"] == "cpu"


# peftkit's own calls into transformers: no deprecated name (the test log's FutureWarnings came
# from peft, the oracle; pyproject.toml filters exactly those, and this keeps peftkit clear of them)
@pytest.mark.filterwarnings("error::FutureWarning")
@pytest.mark.parametrize("method", ["prompt", "ptuning", "prefix"])
@pytest.mark.parametrize(
    "arch, task", [("llama", "CAUSAL_LM"), ("t5", "SEQ_2_SEQ_LM"), ("bert", "SEQ_CLS")]
)
def test_prompt_methods_call_no_deprecated_transformers_names(arch, task, method):
    from peftkit import get_peft_model
    from test_prompt_common import ours_config, task_labels, tiny_inputs
    from tiny_models import tiny_model

    extra = {"num_labels": 3} if task == "SEQ_CLS" else {}
    model = get_peft_model(tiny_model(arch, task, **extra), ours_config(method, task))
    inputs = tiny_inputs(task)
    model.train()
    model(**inputs, **task_labels(task, inputs)).loss.backward()  # training forward + backward
    model.eval()
    with torch.no_grad():
        model(**inputs)
        if task != "SEQ_CLS":
            gen = {k: v for k, v in inputs.items() if k != "decoder_input_ids"}
            model.generate(**gen, max_new_tokens=3, do_sample=False)


@pytest.mark.filterwarnings("error::FutureWarning")
def test_kbit_preparation_with_checkpointing_calls_no_deprecated_name():
    from peftkit import LoraConfig, get_peft_model, prepare_model_for_kbit_training, quantize_model
    from tiny_models import tiny_model

    base = quantize_model(tiny_model("llama", "CAUSAL_LM", hidden=64, ffn=128))
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=True)
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
    ids = torch.randint(3, 90, (2, 6))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
