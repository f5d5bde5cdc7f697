"""warmup_cosine against hand-computed multipliers, and through a real LambdaLR."""

import math

import pytest
import torch

from vembed_blocks.schedule import warmup_cosine


def test_values_by_hand():
    f = warmup_cosine(warmup=4, total=12)
    assert [f(t) for t in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and f(8) == pytest.approx(0.5) and f(12) == pytest.approx(0.0) and f(20) == pytest.approx(0.0)
    assert f(6) == pytest.approx(0.5 * (1 + math.cos(math.pi * 2 / 8)))
    assert warmup_cosine(0, 10)(0) == 1.0


def test_through_lambda_lr_and_errors():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(2, 6))
    lrs = []
    for _ in range(6):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == pytest.approx(
        [1.0, 2.0, 2.0, 2 * 0.5 * (1 + math.cos(math.pi / 4)), 1.0, 2 * 0.5 * (1 + math.cos(3 * math.pi / 4))]
    )
    with pytest.raises(ValueError, match="need warmup >= 0 and total >= 1"):
        warmup_cosine(-1, 10)


def test_linear_and_constant_by_hand_and_warmup_ratio():
    from vembed_blocks.schedule import lr_multiplier, make_scheduler, warmup_steps

    lin, const = lr_multiplier("linear", 2, 10), lr_multiplier("constant", 2, 10)
    assert [lin(t) for t in (0, 1, 2, 6, 10, 12)] == pytest.approx([0.5, 1.0, 1.0, 0.5, 0.0, 0.0])
    assert [const(t) for t in (0, 1, 2, 9, 50)] == [0.5, 1.0, 1.0, 1.0, 1.0]
    assert warmup_steps(0, 0.1, 95) == 10 and warmup_steps(7, 0.0, 95) == 7 and warmup_steps(0, 0.0, 95) == 0
    with pytest.raises(ValueError, match="not both"):
        warmup_steps(5, 0.1, 100)
    with pytest.raises(ValueError, match="must be one of"):
        lr_multiplier("step", 0, 10)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3.0)
    sched = make_scheduler(opt, "constant", 3, 10)
    lrs = []
    for _ in range(5):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1.0, 2.0, 3.0, 3.0, 3.0])
