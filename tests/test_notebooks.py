"""The notebooks (``notebooks/*.ipynb``): each one runs top to bottom, and the committed copies
carry their outputs.

Every notebook is executed with nbclient in a fresh kernel running this interpreter, with the
small size (``PEFTKIT_NOTEBOOK_SIZE=small``: a few steps on a few rows), in a temporary folder
(the adapters go to ``PEFTKIT_NOTEBOOK_OUT``); the committed files are never rewritten.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
DATA = ROOT.parent / "shared" / "data"
KERNEL = "peftkit-tests"

# notebook -> texts its small run must print (besides running without an error)
EXPECTED = {
    "00_environment": ["trainable params:", "smollm2-135m", "minilm-l6"],
    "01_prompt_tuning": ["trainable params:", "held-out accuracy: before", "Peak Memory"],
    "02_p_tuning": [
        "--- MLP prompt encoder",
        "--- LSTM prompt encoder",
        "held-out accuracy: before",
    ],
    "03_prefix_tuning": ["trainable params:", "held-out accuracy: before", "Peak Memory"],
    "04_lora": ["trainable params:", "held-out accuracy: before", "merged vs adapter"],
    "05_adalora": ["trainable params:", "AdaLoRA ranks", "rank_pattern saved for"],
    "06_qlora": ["bits/param", "trainable params:", "held-out accuracy: before"],
}


def test_every_notebook_is_listed():
    assert [p.stem for p in NOTEBOOKS] == sorted(EXPECTED)


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """A kernelspec that starts this interpreter, found through JUPYTER_PATH (works in a fresh
    clone where only .venv exists, whatever kernels the user registered)."""
    jupyter = tmp_path_factory.mktemp("jupyter")
    spec = jupyter / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    kernel = {"argv": argv, "display_name": "peftkit tests", "language": "python"}
    (spec / "kernel.json").write_text(json.dumps(kernel))
    return {
        "JUPYTER_PATH": str(jupyter),
        "PEFTKIT_NOTEBOOK_SIZE": "small",
        "PEFTKIT_SHARED_DATA": str(DATA),
        "MPLBACKEND": "agg",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }


def _text_of(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            parts.append(out["text"])
        elif out["output_type"] in ("execute_result", "display_data"):
            parts.append(out.get("data", {}).get("text/plain", ""))
    return "".join(parts)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch, kernel_env):
    out = tmp_path / "out"
    for key, value in {**kernel_env, "PEFTKIT_NOTEBOOK_OUT": str(out)}.items():
        monkeypatch.setenv(key, value)
    committed = hashlib.sha256(path.read_bytes()).hexdigest()
    book = nbformat.read(path, as_version=4)
    client = NotebookClient(
        book,
        kernel_name=KERNEL,
        timeout=300,
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working folder
    )
    client.execute()  # raises CellExecutionError, naming the cell, if one fails

    text = "\n".join(_text_of(c) for c in book.cells if c.cell_type == "code")
    for expected in EXPECTED[path.stem]:
        assert expected in text, f"{path.name} did not print {expected!r}"
    if path.stem != "00_environment":  # every method chapter saves its adapter
        saved = out / path.stem
        assert (saved / "adapter_config.json").is_file(), sorted(out.rglob("*"))
        assert (saved / "adapter_model.safetensors").is_file()
        assert str(saved) in text  # and lists the folder
        assert any(
            o.get("data", {}).get("image/png") for c in book.cells for o in c.get("outputs", [])
        )
    assert hashlib.sha256(path.read_bytes()).hexdigest() == committed  # outputs stay as committed


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_notebook_has_outputs(path):
    """The committed copy is executed (it reads on GitHub) at full size, without errors."""
    book = nbformat.read(path, as_version=4)
    nbformat.validate(book)
    code = [c for c in book.cells if c.cell_type == "code"]
    assert code and book.cells[0].cell_type == "markdown"
    for i, cell in enumerate(code):
        assert cell.get("execution_count") is not None, f"code cell {i} of {path.name} never ran"
        assert cell.get("outputs"), f"code cell {i} of {path.name} has no output"
        errors = [o for o in cell["outputs"] if o["output_type"] == "error"]
        assert not errors, f"code cell {i} of {path.name} failed: {errors[0].get('ename')}"
    counts = [c["execution_count"] for c in code]
    assert counts == list(range(1, len(code) + 1)), "run top to bottom in one kernel session"
    assert "size=full" in _text_of(code[0]) or path.stem == "00_environment"
