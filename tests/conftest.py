"""Shared fixtures: tiny randomly initialised transformers models built from configs (no downloads)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*kernels.*")

import tiny_models  # noqa: E402 (after the offline switches)
from tiny_models import VOCAB  # noqa: E402

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
