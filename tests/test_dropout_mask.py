"""LoRA's dropout keep-masks (methods/dropout_mask.py): PEFT's draw by default, the fast draw's
rate in every lane, seeds and shapes, and the switch between them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftkit
from peftkit.methods import dropout_mask
from peftkit.methods.dropout_mask import fast_keep_mask, keep_mask

CPU = torch.device("cpu")


@pytest.fixture
def fast_masks():
    peftkit.set_dropout_mask("fast")
    yield
    peftkit.set_dropout_mask("bernoulli")


def test_default_mask_is_the_one_nn_dropout_draws():
    """Same RNG state -> the same elements dropped as HF PEFT's nn.Dropout (what makes a
    peftkit run follow a PEFT run step for step)."""
    assert dropout_mask.dropout_mask_kind() == "bernoulli"
    torch.manual_seed(5)
    ours = keep_mask((64, 48), 0.1, CPU)
    torch.manual_seed(5)
    theirs = nn.Dropout(0.1).train()(torch.ones(64, 48)) != 0
    assert torch.equal(ours, theirs)


def test_switch_selects_the_fast_draw_and_refuses_unknown_kinds(fast_masks):
    torch.manual_seed(5)
    a = keep_mask((64, 48), 0.1, CPU)
    torch.manual_seed(5)
    assert torch.equal(a, fast_keep_mask((64, 48), 0.1, CPU))
    with pytest.raises(ValueError, match="unknown dropout mask 'coin'.*bernoulli"):
        peftkit.set_dropout_mask("coin")


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_fast_drop_rate_is_p_in_every_lane(p):
    torch.manual_seed(0)
    n = 1 << 22
    keep = fast_keep_mask((n,), p, CPU)
    assert keep.dtype == torch.bool and keep.shape == (n,)
    # each of the four int16 lanes of a 64-bit word is its own uniform draw (a generator that
    # left one lane's top bit at 0 would drop half or none of that lane's elements)
    lanes = keep.view(-1, 4).float().mean(0)  # keep rate per lane position
    se = (p * (1 - p) / (n / 4)) ** 0.5
    assert torch.all((1 - lanes - p).abs() < 6 * se), (lanes, p)


def test_fast_zero_drops_nothing_and_one_drops_everything():
    assert fast_keep_mask((7, 9), 0.0, CPU).all()
    assert not fast_keep_mask((7, 9), 1.0, CPU).any()


def test_fast_seeded_and_shaped():
    torch.manual_seed(3)
    a = fast_keep_mask((5, 3, 7), 0.3, CPU)  # 105 elements: not a multiple of 4
    torch.manual_seed(3)
    b = fast_keep_mask((5, 3, 7), 0.3, CPU)
    torch.manual_seed(4)
    c = fast_keep_mask((5, 3, 7), 0.3, CPU)
    assert a.shape == (5, 3, 7) and torch.equal(a, b) and not torch.equal(a, c)
