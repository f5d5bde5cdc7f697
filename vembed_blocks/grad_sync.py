"""Gradient synchronisation for a training step made of several forwards and micro-batches.

An embedding step is not "one forward, one backward": it encodes queries, documents and, on
some ranks only, a batch of hard negatives, possibly over several accumulated micro-batches.
DDP's bookkeeping assumes one forward per backward (a second forward of a tower with
``find_unused_parameters`` fails with "Expected to mark a variable ready only once", and
ranks with different forward counts pair the wrong collectives). So the recipes use no DDP
wrapper; `accumulate_gradients` averages the gradients of the plain parameters once per
optimizer step instead (bucketed all-reduce), and lets FSDP2 reduce-scatter its sharded ones
on the last micro-batch only. `clip_gradients` then clips over both kinds.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterable, Iterator, Sequence, TypeVar

import torch
from torch import nn

from .distributed import average_gradients

__all__ = ["accumulate_gradients", "clip_gradients"]

T = TypeVar("T")


def accumulate_gradients(module: nn.Module, micro_batches: Sequence[T]) -> Iterator[T]:
    """Yield each micro-batch of one optimizer step, with gradient sync done once, after the last.

    Use as ``for batch in accumulate_gradients(state, batches): (loss(batch) / len(batches)).backward()``.
    While iterating: DDP wrappers inside ``module`` run under ``no_sync``, and FSDP2 modules
    skip their reduce-scatter except on the last micro-batch (``set_requires_gradient_sync``;
    `GradCache` honours that). After the last: every plain (non-DTensor) gradient of a
    trainable parameter of ``module`` is averaged over ranks (`average_gradients`), so a loss's
    temperature or a projection outside the sharded model needs nothing of its own. At world
    size 1 it only yields. Every rank must run the same number of micro-batches.
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
    average_gradients([p for p in module.parameters() if p.requires_grad])


def clip_gradients(parameters: Iterable[nn.Parameter], max_norm: float) -> float:
    """Scale gradients so their global L2 norm is at most ``max_norm``; ``0`` = off. Returns the norm.

    The rule of ``torch.nn.utils.clip_grad_norm_`` (coefficient ``max_norm / (norm + 1e-6)``,
    capped at 1), over FSDP2-sharded (DTensor) and plain gradients together, which one torch
    call cannot mix. ``max_norm=0`` leaves gradients as they are (the seeds' convention; passed
    to ``clip_grad_norm_`` it would zero them all). Sharded norms are collectives: call it on
    every rank.
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
