"""Learning-rate schedule shared by the recipes (as a LambdaLR multiplier)."""

from __future__ import annotations

import math
from typing import Callable

__all__ = ["warmup_cosine"]


def warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier for ``LambdaLR``: linear warmup over ``warmup`` steps, then cosine decay to 0 at ``total``.

    Step t (0-based, the number of ``scheduler.step()`` calls so far) gives ``(t + 1) / warmup``
    while ``t < warmup``, then ``0.5 * (1 + cos(pi * min(1, (t - warmup) / (total - warmup))))``.
    """
    if warmup < 0 or total < 1:
        raise ValueError(f"warmup_cosine: need warmup >= 0 and total >= 1, got {warmup} and {total}")

    def multiplier(t: int) -> float:
        if t < warmup:
            return (t + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (t - warmup) / max(1, total - warmup))))

    return multiplier
