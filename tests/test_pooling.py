"""pool() against per-row references, under left and right padding."""

import pytest
import torch

from vembed_blocks.pooling import pool

LENGTHS = [5, 2, 1, 4]
L, D = 6, 3


def sequences():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(n, D, generator=g, dtype=torch.float64) for n in LENGTHS]


def padded(seqs, side):
    hidden = torch.full((len(seqs), L, D), 7.0, dtype=torch.float64)  # pad value must never matter
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(L - len(s), L)
        hidden[i, sl], mask[i, sl] = s, 1
    return hidden, mask


def reference(s, method):
    n = len(s)
    if method == "mean":
        return s.mean(0)
    if method == "cls":
        return s[0]
    if method == "last":
        return s[-1]
    if method == "max":
        return s.max(0).values
    w = torch.arange(1, n + 1, dtype=s.dtype)
    return (s * w[:, None]).sum(0) / w.sum()


@pytest.mark.parametrize("method", ["mean", "cls", "last", "max", "weighted_mean"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_pool_matches_reference(method, side):
    seqs = sequences()
    out = pool(*padded(seqs, side), method)
    want = torch.stack([reference(s, method) for s in seqs])
    assert torch.allclose(out, want, atol=1e-12)


def test_last_token_is_the_same_under_left_and_right_padding():
    seqs = sequences()
    left = pool(*padded(seqs, "left"), "last")
    right = pool(*padded(seqs, "right"), "last")
    assert torch.equal(left, right)
    assert torch.equal(left[1], seqs[1][-1])


@pytest.mark.parametrize(
    "args, message",
    [
        ((torch.zeros(2, 3), torch.ones(2, 3), "mean"), "hidden must be [B, L, D]"),
        ((torch.zeros(2, 3, 4), torch.ones(2, 4), "mean"), "does not match hidden"),
        ((torch.zeros(2, 3, 4), torch.ones(2, 3), "median"), "unknown method 'median'"),
        ((torch.zeros(2, 3, 4), torch.tensor([[1, 1, 0], [0, 0, 0]]), "last"), "rows [1] have no real token"),
    ],
)
def test_pool_bad_input(args, message):
    with pytest.raises(ValueError) as err:
        pool(*args)
    assert message in str(err.value)
