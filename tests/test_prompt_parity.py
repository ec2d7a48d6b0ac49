"""Prompt-learning parity with HF PEFT (the oracle): the model x method x task matrix.

For every architecture, every task head it has and every method (prompt tuning, P-tuning with
MLP and LSTM heads, prefix tuning with and without projection), with the same encoder and head
weights:

1. peftkit's forward == PEFT's forward (training-mode encoders, fp32, rel. err <= 1e-5), losses too;
2. an adapter saved by peftkit loads in ``peft`` and gives the same outputs;
3. an adapter saved by ``peft`` loads in peftkit and gives the same outputs.

Inputs include a left-padded row. See ``peft_reference_forward`` for the one case where PEFT's
forward is unusable with transformers 5.24 (prefix tuning under classification heads).
"""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch

from conftest import assert_rel_close
from peftkit import PeftModel, get_peft_model
from test_prompt_common import (
    METHODS,
    REFUSED,
    TASK_ARCHS,
    one_thread,  # noqa: F401  (autouse fixture)
    ours_config,
    outputs_of,
    peft_config,
    peft_reference_forward,
    perturb_heads,
    task_labels,
    tiny_inputs,
    tiny_model,
)

MATRIX = [
    (arch, task, method)
    for task, archs in TASK_ARCHS.items()
    for arch in archs
    for method in METHODS
    if (arch, task, method) not in REFUSED
]
LOSS_TASKS = ("CAUSAL_LM", "SEQ_2_SEQ_LM", "SEQ_CLS")  # PEFT's loss is right for these


def _sync_peft_with_ours(theirs, ours) -> None:
    """Give PEFT's model our encoder weights and our trained head copies."""
    theirs.prompt_encoder["default"].load_state_dict(ours.prompt_encoder["default"].state_dict())
    own = ours.state_dict()
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if ".modules_to_save.default." in name:
                param.copy_(own[name])


@pytest.mark.parametrize(
    ("arch", "task", "method"), MATRIX, ids=[f"{a}-{t}-{m}" for a, t, m in MATRIX]
)
def test_parity_with_peft(arch, task, method, tmp_path):
    base = tiny_model(arch, task)
    bases = [copy.deepcopy(base) for _ in range(3)]
    inputs = tiny_inputs(task)
    with_labels = {**inputs, **task_labels(task, inputs)} if task in LOSS_TASKS else inputs

    ours = get_peft_model(base, ours_config(method, task)).eval()
    perturb_heads(ours)
    theirs = peft.get_peft_model(bases[0], peft_config(method, task)).eval()
    _sync_peft_with_ours(theirs, ours)
    with torch.no_grad():
        got = ours(**with_labels)
        want = peft_reference_forward(theirs, task, method, with_labels)
        plain = bases[1](**inputs)
    assert_rel_close(outputs_of(got), outputs_of(want))
    if task in LOSS_TASKS:
        assert_rel_close(got.loss, want.loss)
    if outputs_of(got).shape == outputs_of(plain).shape:  # the adapter changes the output
        assert not torch.allclose(outputs_of(got), outputs_of(plain), atol=1e-4)

    # peftkit -> peft
    ours.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded_theirs = peft.PeftModel.from_pretrained(bases[1], tmp_path / "ours").eval()
    with torch.no_grad():
        assert_rel_close(
            outputs_of(peft_reference_forward(loaded_theirs, task, method, inputs)), outputs_of(got)
        )

    # peft -> peftkit
    theirs.save_pretrained(tmp_path / "theirs")
    loaded_ours = PeftModel.from_pretrained(bases[2], tmp_path / "theirs")
    assert not any(p.requires_grad for p in loaded_ours.parameters())
    with torch.no_grad():
        assert_rel_close(outputs_of(loaded_ours(**inputs)), outputs_of(got))
