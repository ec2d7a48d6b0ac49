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
