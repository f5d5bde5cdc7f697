"""Learning-rate schedules shared by the recipes (``LambdaLR`` multipliers).

Every schedule warms up linearly over ``warmup`` steps, then ``cosine`` decays to 0 at
``total``, ``linear`` decays linearly to 0 at ``total``, and ``constant`` stays at 1 (seed
004 trains with constant-with-warmup). Step ``t`` is the number of ``scheduler.step()``
calls so far (0-based): the warmup gives ``(t + 1) / warmup`` while ``t < warmup``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

__all__ = ["SCHEDULES", "warmup_cosine", "lr_multiplier", "warmup_steps", "make_scheduler"]

SCHEDULES = ("cosine", "linear", "constant")


def lr_multiplier(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """The multiplier of schedule ``kind`` (one of `SCHEDULES`) with ``warmup`` of ``total`` steps."""
    if kind not in SCHEDULES:
        raise ValueError(f"lr schedule must be one of {SCHEDULES}, got {kind!r}")
    if warmup < 0 or total < 1:
        raise ValueError(f"lr schedule: need warmup >= 0 and total >= 1, got {warmup} and {total}")

    def multiplier(t: int) -> float:
        if t < warmup:
            return (t + 1) / warmup
        done = min(1.0, (t - warmup) / max(1, total - warmup))  # fraction of the decay phase
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * done))
        return 1.0 - done if kind == "linear" else 1.0

    return multiplier


def warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    """Linear warmup over ``warmup`` steps, then cosine decay to 0 at ``total``:
    ``0.5 * (1 + cos(pi * min(1, (t - warmup) / (total - warmup))))`` after the warmup."""
    return lr_multiplier("cosine", warmup, total)


def warmup_steps(steps: int, ratio: float, total: int) -> int:
    """Warmup length from ``--warmup-steps`` or ``--warmup-ratio`` (a fraction of ``total``, rounded); not both."""
    if steps and ratio:
        raise ValueError("give --warmup-steps or --warmup-ratio, not both")
    if steps < 0 or not 0 <= ratio <= 1:
        raise ValueError(f"need --warmup-steps >= 0 and 0 <= --warmup-ratio <= 1, got {steps} and {ratio}")
    return steps or round(ratio * total)


def make_scheduler(
    optimizer: torch.optim.Optimizer, kind: str, warmup: int, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR(optimizer, lr_multiplier(kind, warmup, total))``."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(kind, warmup, total))
