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


def long_batch(length, dtype, value=None):
    """Two rows of ``length`` slots: row 0 all real, row 1 left-padded with 100 pad tokens.

    Pads hold 60000 (near the fp16 maximum) so any leak or overflow through them shows.
    """
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, length, 8, generator=g) if value is None else torch.full((2, length, 8), value)
    hidden[1, :100] = 60000.0
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, :100] = 0
    hidden = hidden.to(dtype)
    seqs = [hidden[0].double(), hidden[1, 100:].double()]  # the exact low-precision inputs, widened
    return hidden, mask, seqs


# Tolerance: one rounding to the output dtype (half an ulp, relative) plus a little slack;
# fp16 eps = 2**-10, bf16 eps = 2**-7. Before float32 accumulation fp16 gave 0, NaN and inf here.
EPS = {torch.float16: 2**-10, torch.bfloat16: 2**-7}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "method, length, value",
    [
        ("weighted_mean", 1000, None),  # fp16 weights 1..n sum past 65504: was all zeros
        ("weighted_mean", 4000, None),  # fp16 cumsum itself overflows: was NaN
        ("mean", 5000, 60.0),  # fp16 sum 300000 > 65504: was inf
        ("mean", 5000, None),
    ],
)
def test_low_precision_means_accumulate_in_float32(dtype, method, length, value):
    hidden, mask, seqs = long_batch(length, dtype, value)
    out = pool(hidden, mask, method)
    assert out.dtype == dtype and out.shape == (2, 8)
    want = torch.stack([reference(s, method) for s in seqs])  # float64
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), want, rtol=EPS[dtype], atol=1e-5)
    if value is not None:
        assert out.double().eq(value).all()  # a constant's mean is exactly that constant


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["max", "cls", "last"])
def test_selecting_methods_keep_low_precision_values_exactly(dtype, method):
    hidden, mask, seqs = long_batch(5000, dtype)
    out = pool(hidden, mask, method)
    assert out.dtype == dtype
    assert torch.equal(out.double(), torch.stack([reference(s, method) for s in seqs]))
