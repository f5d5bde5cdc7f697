"""StepGuard on 2 real gloo ranks: a NaN on ONE rank skips the step on both (weights as a plain float64 reference
that leaves the step out), too many in a row stop both ranks with the steps and ranks named, bad rows are summed
over ranks and a fraction beyond the limit stops the run; counts survive state_dict."""

from __future__ import annotations

import math

import pytest
import torch
from _multiproc import run_ranks

from vembed_blocks.distributed import average_gradients
from vembed_blocks.grad_sync import clip_gradients
from vembed_blocks.step_guard import BadDataError, NonFiniteTrainingError, StepGuard

D, B, LR, STEPS, NAN_STEP = 3, 4, 0.1, 5, 3


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(2 * B, D, generator=g, dtype=torch.float64), torch.randn(2 * B, generator=g, dtype=torch.float64)


def _train(rank: int, world: int, nan_steps: set[int], guard: StepGuard) -> tuple[torch.Tensor, list[bool]]:
    """SGD on a least-squares loss; rank r trains on rows r*B..(r+1)*B of each step's global batch."""
    w = torch.nn.Parameter(torch.zeros(D, dtype=torch.float64))
    applied = []
    for step in range(1, STEPS + 1):
        x, y = _data(step)
        x, y = x[rank * B : (rank + 1) * B], y[rank * B : (rank + 1) * B]
        if rank == world - 1 and step in nan_steps:
            x = x.clone()
            x[0, 0] = math.nan  # one row of one rank
        loss = ((x @ w - y) ** 2).mean()
        loss.backward()
        average_gradients([w])
        norm = clip_gradients([w], 0)  # NaN here clips nothing, and nothing raises: the guard decides
        ok = guard.check(step, loss, norm, rows=2 * B, bad_rows=rank + 1)
        applied.append(ok)
        if ok:
            with torch.no_grad():
                w -= LR * w.grad
        w.grad = None
    return w.detach(), applied


def _body(rank: int, world: int) -> dict:
    out: dict = {}
    guard = StepGuard(max_bad_steps=3, max_bad_fraction=1.0)
    out["w"], out["applied"] = _train(rank, world, {NAN_STEP}, guard)
    out["counts"], out["state"] = guard.counts(), guard.state_dict()
    try:  # three NaN steps in a row: both ranks stop at the third
        _train(rank, world, {2, 3, 4}, StepGuard(max_bad_steps=3, max_bad_fraction=1.0))
    except NonFiniteTrainingError as e:
        out["stop"] = str(e)
    try:  # 3 bad rows (1 + 2) of 3 + 8 seen: 3 > 0.2% of 1000 (the floor) stops at the first step
        StepGuard(max_bad_fraction=0.002).check(1, torch.tensor(1.0), 1.0, rows=8, bad_rows=rank + 1)
    except BadDataError as e:
        out["bad_data"] = str(e)
    out["few_bad_ok"] = StepGuard(max_bad_fraction=0.01).check(1, torch.tensor(1.0), 1.0, rows=8, bad_rows=rank + 1)
    return out


def _reference(skip: set[int]) -> torch.Tensor:
    """The one-process float64 run on the concatenated batches, leaving the skipped steps out."""
    w = torch.zeros(D, dtype=torch.float64)
    for step in range(1, STEPS + 1):
        if step in skip:
            continue
        x, y = _data(step)
        grad = 2 * x.T @ (x @ w - y) / (2 * B)
        w = w - LR * grad
    return w


def test_nan_on_one_rank_skips_the_step_on_every_rank_and_too_many_stop_the_run():
    r0, r1 = run_ranks(_body, 2, timeout=120)
    expected = [step != NAN_STEP for step in range(1, STEPS + 1)]
    assert r0["applied"] == r1["applied"] == expected
    ref = _reference({NAN_STEP})
    for r in (r0, r1):
        assert torch.isfinite(r["w"]).all()
        torch.testing.assert_close(r["w"], ref, rtol=1e-12, atol=1e-12)
        assert r["counts"] == {"skipped_steps": 1, "bad_rows": 3}  # rank 0's 1 + rank 1's 2
        assert r["state"] == {"skipped_steps": 1, "in_a_row": 0, "rows": STEPS * 2 * B}
        assert "steps 2..4: 3 steps in a row" in r["stop"] and "loss on ranks [1]" in r["stop"]
        assert "3 of 11 rows seen were bad" in r.get("bad_data", "")  # 3 > 0.2% of 1000 (the floor)
        assert r["few_bad_ok"]
    # the reference differs from the run that took the NaN step: the skip is what keeps it finite
    assert not torch.allclose(ref, _reference(set()))


def test_single_process_guard_state_round_trip_and_bad_arguments():
    guard = StepGuard(max_bad_steps=3)
    assert guard.check(1, torch.tensor([1.0, 2.0]), 0.5, rows=4)
    assert not guard.check(2, torch.tensor(float("inf")), 0.5, rows=4)
    assert not guard.check(3, 1.0, float("nan"), rows=4)  # a finite loss with a NaN gradient norm is skipped too
    resumed = StepGuard(max_bad_steps=3)
    resumed.load_state_dict(guard.state_dict())  # a resume goes on counting: the third in a row stops it
    assert resumed.counts() == {"skipped_steps": 2, "bad_rows": 0}
    with pytest.raises(NonFiniteTrainingError, match=r"steps 2\.\.4: 3 steps in a row .*gradient norm on ranks \[0\]"):
        resumed.check(4, torch.tensor(1.0), float("inf"), rows=4)
    with pytest.raises(ValueError, match="max_bad_steps"):
        StepGuard(max_bad_steps=0)
    with pytest.raises(ValueError, match="max_bad_fraction"):
        StepGuard(max_bad_fraction=1.5)
