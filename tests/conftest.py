"""Shared fixtures: tiny randomly initialised transformers models built from configs (no downloads)."""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*kernels.*")

import tiny_models  # noqa: E402 (after the offline switches)
from tiny_models import VOCAB  # noqa: E402

# --- several workers (`make test` runs `pytest -n 2`): the cores shared out, heavy files first ----
# Each xdist worker gets cores / workers torch threads (one each on this 2-core machine), and the
# processes it starts (torchrun, notebook kernels, `peftkit` subprocesses) inherit that through
# OMP_NUM_THREADS, so two workers never run four busy threads on two cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    _threads = max(1, (os.cpu_count() or 1) // _workers)
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = str(_threads)
    torch.set_num_threads(_threads)

# Files in order of their measured cost (`pytest --durations`), longest first; with
# `--dist loadfile --no-loadscope-reorder` each worker starts on a long file, so no long file is
# left for the end while the other worker idles. Other files keep pytest's order after these.
LONGEST_FIRST = (
    "test_notebooks.py",
    "test_train_ddp.py",
    "test_demo.py",
    "test_train_distributed.py",
    "test_qlora_memory.py",
    "test_models.py",
    "test_quant_smollm2.py",
    "test_image_cls_real.py",
    "test_quant_bnb_oracle.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest as before


# architecture -> the head its parity tests use (and how many labels it has)
_HEADS = {
    "bloom": ("CAUSAL_LM", {}),
    "gpt2": ("CAUSAL_LM", {}),
    "llama": ("CAUSAL_LM", {}),
    "opt": ("CAUSAL_LM", {}),
    "t5": ("SEQ_2_SEQ_LM", {}),
    "bert": ("SEQ_CLS", {"num_labels": 3}),
    "vit": ("IMAGE_CLS", {"num_labels": 5}),
}


def _tiny(name: str, seed: int = 0):
    """A tiny model of one architecture (tests/tiny_models.py) plus the kwargs one forward needs."""
    task, extra = _HEADS[name]
    model = tiny_models.tiny_model(name, task, seed=seed, **extra)
    if name == "vit":
        pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
        return model, {"pixel_values": pixels}
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # some padding
    text = {"input_ids": ids, "attention_mask": mask}
    if name == "t5":
        return model, {**text, "decoder_input_ids": ids[:, :5]}
    return model, text


# architecture -> (LoRA targets, task type, modules_to_save)
ARCHS = {
    "bloom": (["query_key_value", "dense_4h_to_h"], "CAUSAL_LM", None),
    "gpt2": (["c_attn", "c_proj"], "CAUSAL_LM", None),
    "llama": (["q_proj", "v_proj", "down_proj"], "CAUSAL_LM", None),
    "opt": (["q_proj", "v_proj", "fc1"], "CAUSAL_LM", None),
    "t5": (["q", "v", "wo"], "SEQ_2_SEQ_LM", None),
    "bert": (["query", "value"], "SEQ_CLS", None),
    "vit": (["q_proj", "v_proj"], None, ["classifier"]),
}


@pytest.fixture
def tiny_model():
    """Factory: ``tiny_model(name) -> (model in eval mode, forward kwargs)``, seeded."""

    def make(name: str):
        return _tiny(name)

    return make


def logits_of(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output[0]


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """max |a - e| <= rel * max |e|: the parity criterion (fp32, relative error <= 1e-5)."""
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= rel * max(scale, 1e-12), f"relative error {err / max(scale, 1e-12):.3g} > {rel}"


# --- loud, not silent: a missing pinned dependency or shipped data set fails, never skips --------
# A CI run that skipped the DeepSpeed / diffusers / bitsandbytes tests would look green on a
# machine where those features were never tested. So: `require` instead of `importorskip`,
# `shared_data` instead of "skip if the folder is not there", and any other skip fails the run
# unless its reason starts with "platform:" (a test that cannot exist on this OS).
INSTALL_HINT = (
    "it is pinned in pyproject.toml's `test` extra: `make test` installs it, or run "
    ".venv/bin/pip install -c constraints.txt torch==2.13.0 -e '.[test]'"
)
_MISSING: dict[str, str] = {}  # test module name -> why its required import failed


class _Missing:
    """An inert stand-in for a module that did not import, so the test module still imports
    (``BF = bnb.functional``); its tests fail in setup before anything uses it."""

    def __getattr__(self, attr: str) -> _Missing:
        return self

    def __call__(self, *args, **kwargs) -> _Missing:
        return self


def require(module: str):
    """Import a test dependency pinned in the ``test`` extra (``pytest.importorskip``'s
    replacement). Missing, called in a test: that test fails with the fix; called at a test
    module's top level: every test of that module fails in setup with the fix."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        message = f"{module} cannot be imported ({exc}); {INSTALL_HINT}"
        caller = sys._getframe(1)
        if caller.f_code.co_name != "<module>":
            pytest.fail(message, pytrace=False)
        _MISSING[caller.f_globals.get("__name__", "")] = message
        return _Missing()


def shared_data(relative: str) -> Path:
    """A data set shipped in ``../shared/data`` (``PEFTKIT_SHARED_DATA``); missing, the test fails."""
    from peftkit.data import shared_data_dir

    try:
        path = shared_data_dir() / relative
    except FileNotFoundError as exc:
        pytest.fail(f"shipped data {relative} not found: {exc}", pytrace=False)
    if not path.exists():
        pytest.fail(
            f"shipped data {path} is missing: the repository expects ../shared (with data/) "
            "beside it, or PEFTKIT_SHARED_DATA pointing at that data folder",
            pytrace=False,
        )
    return path


def pytest_runtest_setup(item):
    module = getattr(item, "module", None)
    if module is not None and module.__name__ in _MISSING:
        pytest.fail(_MISSING[module.__name__], pytrace=False)


_SKIPPED: list[tuple[str, str]] = []


def pytest_runtest_logreport(report):
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if not reason.removeprefix("Skipped: ").startswith("platform:"):
        _SKIPPED.append((report.nodeid, reason))


def pytest_terminal_summary(terminalreporter):
    if _SKIPPED:
        terminalreporter.section("skipped tests fail the run (only 'platform:' skips may pass)")
        for nodeid, reason in _SKIPPED:
            terminalreporter.write_line(f"{nodeid}: {reason}")


def pytest_sessionfinish(session, exitstatus):
    if _SKIPPED and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
