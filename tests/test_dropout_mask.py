"""LoRA's dropout keep-mask (methods/dropout_mask.py): the rate, every lane, the seed, any shape."""

from __future__ import annotations

import pytest
import torch

from peftkit.methods.dropout_mask import keep_mask


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_drop_rate_is_p_in_every_lane(p):
    torch.manual_seed(0)
    n = 1 << 22
    keep = keep_mask((n,), p, torch.device("cpu"))
    assert keep.dtype == torch.bool and keep.shape == (n,)
    # each of the four int16 lanes of a 64-bit word is its own uniform draw (a generator that
    # left one lane's top bit at 0 would drop half or none of that lane's elements)
    lanes = keep.view(-1, 4).float().mean(0)  # keep rate per lane position
    se = (p * (1 - p) / (n / 4)) ** 0.5
    assert torch.all((1 - lanes - p).abs() < 6 * se), (lanes, p)


def test_zero_drops_nothing_and_one_drops_everything():
    assert keep_mask((7, 9), 0.0, torch.device("cpu")).all()
    assert not keep_mask((7, 9), 1.0, torch.device("cpu")).any()


def test_seeded_and_shaped():
    torch.manual_seed(3)
    a = keep_mask((5, 3, 7), 0.3, torch.device("cpu"))  # 105 elements: not a multiple of 4
    torch.manual_seed(3)
    b = keep_mask((5, 3, 7), 0.3, torch.device("cpu"))
    torch.manual_seed(4)
    c = keep_mask((5, 3, 7), 0.3, torch.device("cpu"))
    assert a.shape == (5, 3, 7) and torch.equal(a, b) and not torch.equal(a, c)
