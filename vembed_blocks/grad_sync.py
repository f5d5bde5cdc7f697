"""Gradient synchronisation for a training step made of several forwards and micro-batches.

An embedding step is not "one forward, one backward": it encodes queries, documents and, on
some ranks only, a batch of hard negatives, possibly over several accumulated micro-batches.
DDP's bookkeeping assumes one forward per backward (a second forward of a tower with
``find_unused_parameters`` fails with "Expected to mark a variable ready only once", and
ranks with different forward counts pair the wrong collectives). So the recipes use no DDP
wrapper: `defer_gradient_sync` lets FSDP2 reduce-scatter its sharded gradients on the last
micro-batch only, and the loop then calls `distributed.average_gradients` once, itself, for
the plain ones (bucketed all-reduce): the step's one gradient sync is a line of the loop, not
a side effect of finishing an iterator. `clip_gradients` then clips over both kinds.

Imports: torch; nothing else of the package.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterable, Iterator, Sequence, TypeVar

import torch
from torch import nn

__all__ = ["defer_gradient_sync", "clip_gradients"]

T = TypeVar("T")


def defer_gradient_sync(module: nn.Module, micro_batches: Sequence[T]) -> Iterator[T]:
    """Yield each micro-batch of one optimizer step with the wrappers' gradient sync deferred to the last.

    While iterating: DDP wrappers inside ``module`` run under ``no_sync``, and FSDP2 modules skip
    their reduce-scatter except on the last micro-batch (``set_requires_gradient_sync``; `GradCache`
    honours that); both are restored however the loop ends. It does not touch the plain
    (non-DTensor) gradients: average them after the loop, once, with
    ``average_gradients(p for p in module.parameters() if p.requires_grad)``::

        for batch in defer_gradient_sync(model, batches):
            (loss(batch) / len(batches)).backward()
        average_gradients(p for p in model.parameters() if p.requires_grad)

    Every rank must run the same number of micro-batches.
    """
    from torch.distributed.fsdp import FSDPModule

    fsdp = [m for m in module.modules() if isinstance(m, FSDPModule)]
    ddp = [m for m in module.modules() if isinstance(m, nn.parallel.DistributedDataParallel)]
    with contextlib.ExitStack() as stack:
        for m in ddp:
            stack.enter_context(m.no_sync())
        try:
            for k, batch in enumerate(micro_batches):
                for m in fsdp:
                    m.set_requires_gradient_sync(k == len(micro_batches) - 1, recurse=False)
                yield batch
        finally:
            for m in fsdp:
                m.set_requires_gradient_sync(True, recurse=False)


def clip_gradients(parameters: Iterable[nn.Parameter], max_norm: float) -> float:
    """Scale gradients so their global L2 norm is at most ``max_norm``; ``0`` = off. Returns the norm.

    The rule of ``torch.nn.utils.clip_grad_norm_`` (coefficient ``max_norm / (norm + 1e-6)``,
    capped at 1), over FSDP2-sharded (DTensor) and plain gradients together, which one torch
    call cannot mix. ``max_norm=0`` leaves gradients as they are (the seeds' convention; passed
    to ``clip_grad_norm_`` it would zero them all). Sharded norms are collectives: call it on
    every rank. A NaN/inf norm leaves the gradients as they are and raises nothing: hand the norm
    to `step_guard.StepGuard.check`, which skips that step on every rank.
    """
    if max_norm < 0 or not math.isfinite(max_norm):
        raise ValueError(f"max_norm must be >= 0 (0 = no clipping), got {max_norm}")
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in parameters if p.grad is not None]
    squares = 0.0
    for group in ([g for g in grads if isinstance(g, DTensor)], [g for g in grads if not isinstance(g, DTensor)]):
        if group:
            norm = torch.nn.utils.get_total_norm(group)
            squares += float(norm.full_tensor() if isinstance(norm, DTensor) else norm) ** 2
    total = math.sqrt(squares)
    coef = max_norm / (total + 1e-6)
    if max_norm > 0 and coef < 1.0:
        for g in grads:
            g.mul_(coef)
    return total
