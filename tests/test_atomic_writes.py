"""One atomic-write helper and one atomic-folder helper, and nothing else renames files into place."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from peftkit.checkpoint import (
    atomic_file,
    atomic_folder,
    atomic_write_text,
    replace_folder,
    save_tensors,
    temp_folder_for,
)

SRC = Path(__file__).resolve().parents[1] / "src" / "peftkit"


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_atomic_file_renames_into_place_with_the_usual_mode(tmp_path):
    path = tmp_path / "sub" / "a.txt"
    with atomic_file(path) as tmp:
        Path(tmp).write_text("new")
        assert not path.exists() and Path(tmp).parent == path.parent
    assert path.read_text() == "new"
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert os.listdir(path.parent) == ["a.txt"]


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    path = tmp_path / "a.safetensors"
    save_tensors(path, {"x": torch.ones(2)})
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="disk full"), atomic_file(path) as tmp:
        Path(tmp).write_bytes(b"half")
        raise RuntimeError("disk full")
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["a.safetensors"]
    atomic_write_text(tmp_path / "b.json", "{}\n")
    assert (tmp_path / "b.json").read_text() == "{}\n"


def test_atomic_folder_swaps_a_whole_folder_in(tmp_path):
    final = tmp_path / "best"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with atomic_folder(final) as tmp:
        (tmp / "new.txt").write_text("new")
        assert sorted(p.name for p in final.iterdir()) == ["old.txt"]  # untouched meanwhile
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert final.stat().st_mode & 0o777 == 0o777 & ~_umask()
    assert sorted(os.listdir(tmp_path)) == ["best"]  # no temporary or old folder left


def test_a_failed_folder_write_keeps_the_old_folder(tmp_path):
    final = tmp_path / "checkpoint"
    final.mkdir()
    (final / "state.json").write_text("{}")
    with pytest.raises(KeyError), atomic_folder(final) as tmp:
        (tmp / "partial").write_text("x")
        raise KeyError("crash")
    assert [p.name for p in final.iterdir()] == ["state.json"]
    assert os.listdir(tmp_path) == ["checkpoint"]


def test_shared_temp_folder_has_one_name_for_every_process(tmp_path):
    final = tmp_path / "checkpoints" / "step-00000002"
    other = temp_folder_for(final, shared=True, create=False)  # a second rank: name only
    assert not other.exists()
    tmp = temp_folder_for(final, shared=True)  # the main rank creates it (emptied)
    assert tmp == other and tmp.is_dir() and not any(tmp.iterdir())
    (tmp / "part").write_text("rank 1")
    replace_folder(tmp, final)
    assert (final / "part").read_text() == "rank 1" and not tmp.exists()


def test_no_module_renames_or_writes_files_around_the_helpers():
    # every file write is checkpoint.atomic_file / atomic_folder: a module that renames files
    # into place or writes a whole file in one call itself would bypass them
    pattern = re.compile(r"os\.replace\(|os\.rename\(|\.rename\(|\.write_text\(|\.write_bytes\(")
    found = [
        f"{path.relative_to(SRC)}:{i}: {line.strip()}"
        for path in SRC.rglob("*.py")
        if path.name != "checkpoint.py"
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if pattern.search(line)
    ]
    assert not found, "\n".join(found)
