"""Weights memory-mapped from a checkpoint (``peftkit.file_pages``): recognised as such, their
pages handed back without changing a value, and nothing else touched."""

from __future__ import annotations

import mmap

import torch
import transformers

from peftkit.file_pages import drop_pages, is_file_backed
from tiny_models import tiny_model


def _resident_pages(tensor: torch.Tensor) -> int:
    """Pages of ``tensor`` resident in memory (mincore via /proc/self/pagemap is root-only;
    reading smaps for the mapping is enough: its Rss line)."""
    lo = tensor.data_ptr()
    with open("/proc/self/smaps") as fh:
        inside = False
        for line in fh:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:
                a, b = (int(x, 16) for x in fields[0].split("-"))
                inside = a <= lo < b
            elif inside and fields[0] == "Rss:":
                return int(fields[1]) * 1024 // mmap.PAGESIZE
    return 0


def test_a_loaded_weight_is_file_backed_and_its_pages_go_back_unchanged(tmp_path):
    tiny_model("llama", "CAUSAL_LM", hidden=256, ffn=1024).save_pretrained(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    weight = model.model.layers[0].mlp.up_proj.weight.detach()
    assert is_file_backed(weight)
    before = weight.clone()  # reads every page
    resident = _resident_pages(weight)
    dropped = drop_pages([weight])
    assert dropped >= weight.numel() * 4 - 2 * mmap.PAGESIZE  # whole pages inside the tensor
    assert _resident_pages(weight) < resident
    assert torch.equal(weight, before)  # faulted back in from the file


def test_memory_that_is_not_a_file_map_is_left_alone():
    t = torch.arange(1 << 16, dtype=torch.float32)
    assert not is_file_backed(t)
    assert drop_pages([t]) == 0
    assert torch.equal(t, torch.arange(1 << 16, dtype=torch.float32))
