"""Process-group helpers and an all-gather that carries gradient.

`gather_with_grad` is the one piece of distributed logic the losses need: each rank
scores its own rows against candidates gathered from every rank. Its backward sums the
incoming gradients over ranks and returns each rank its own slice, so that with
DDP/FSDP gradient averaging the parameter gradients equal those of one process on the
concatenated global batch (the loss averages over local rows; averaging over W ranks
turns that into the global mean).

Everything here is the identity / a constant at world size 1 or without an initialised
process group, so single-process code needs no branches.
"""

from __future__ import annotations

import gc
import os
import time
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

__all__ = [
    "is_dist",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "gather_with_grad",
    "gather_with_offset",
    "all_gather_ints",
    "all_gather_sizes",
    "any_rank",
    "pad_dim",
    "ring_shift",
    "average_gradients",
    "mean_over_ranks",
    "shutdown_distributed",
]


def is_dist(group: dist.ProcessGroup | None = None) -> bool:
    """True when a process group is initialised and ``group`` (default: the world) has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def get_rank(group: dist.ProcessGroup | None = None) -> int:
    """This process's rank in ``group`` (default: the world; 0 without a process group)."""
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def get_world_size(group: dist.ProcessGroup | None = None) -> int:
    """Number of ranks in ``group`` (default: the world; 1 without a process group)."""
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


_groups_created = 0  # process groups this process created (each after the first gets its own store prefix)


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0) -> tuple[int, int, torch.device]:
    """Initialise the default process group from torchrun's environment.

    Reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. Without them
    (plain ``python script.py``) nothing is initialised and ``(0, 1, device)`` is
    returned. Backend: nccl when CUDA is available, else gloo. On CUDA the local
    device is selected. Calling it twice is harmless, and so is calling it again after
    `shutdown_distributed` in the same processes (a recipe's ``main`` run in-process by another).

    Returns ``(rank, world_size, device)``.
    """
    use_cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return get_rank(), get_world_size(), device
    global _groups_created
    if not dist.is_initialized():
        backend = backend or ("nccl" if use_cuda else "gloo")
        kwargs: dict = {"device_id": device} if backend == "nccl" else {}
        if _groups_created:  # torchrun's store outlives a destroyed group: a fresh key prefix, or the new group
            # reads the old one's keys (dead peer addresses) and fails or hangs
            store, rank, world = next(dist.rendezvous("env://", timeout=timedelta(seconds=timeout_s)))
            store = dist.PrefixStore(f"vembed-group-{_groups_created}", store)
            kwargs.update(store=store, rank=rank, world_size=world)
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s), **kwargs)
        _groups_created += 1
    return dist.get_rank(), dist.get_world_size(), device


def shutdown_distributed() -> None:
    """End a run: destroy the process group safely.

    The recipes hold no DDP wrapper (`average_gradients` syncs instead), so there
    is nothing to free first. If your own loop keeps a `wrap_ddp` model, ``del`` it before
    calling this. Why: with torch 2.13 and gloo, freeing a DDP wrapper or the group joins gloo's worker thread
    while the main thread holds the GIL; if that thread is still freeing the Python tensors
    of the last collective (which needs the GIL) both wait forever. It was seen about once in
    ten 2-rank runs. So: give the worker a moment to finish, collect garbage (a `wrap_ddp`
    wrapper sits in a reference cycle through its routed encode methods, so ``del`` alone does
    not free it), then destroy the group. No extra barrier: it would start the very race
    this avoids. Call it after the last collective of the run. No-op without a process group.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    time.sleep(0.2)
    gc.collect()
    dist.destroy_process_group()


def all_gather_ints(
    values: list[int] | torch.Tensor, device: torch.device | str = "cpu", group=None
) -> list[list[int]]:
    """Every rank's short list of integers, in rank order: one all-gather and one read back to the host.

    ``values`` (the same length on every rank) may be a 1-D integer tensor, so a count computed
    on the device (e.g. rows failing a check) travels without a sync of its own. At world size
    1 (of ``group``): ``[values]``. How the losses agree, in one round, on sizes and on which
    optional inputs exist.
    """
    t = values.to(device, torch.long).reshape(-1) if torch.is_tensor(values) else torch.tensor(values, device=device)
    if not is_dist(group):
        return [t.tolist()] if torch.is_tensor(values) else [[int(v) for v in values]]
    out = torch.empty(get_world_size(group) * t.numel(), dtype=torch.long, device=t.device)
    _all_gather_flat(out, t, group)
    return out.view(-1, t.numel()).tolist()


def all_gather_sizes(n: int, device: torch.device | str = "cpu", group=None) -> list[int]:
    """Gather one integer from every rank of ``group`` (e.g. a local batch size). ``[n]`` at world size 1."""
    return [row[0] for row in all_gather_ints([int(n)], device, group)]


def any_rank(flags: list[bool], device: torch.device | str = "cpu", group=None) -> list[bool]:
    """For each flag, whether it is True on at least one rank (one all-reduce of ``len(flags)`` ints).

    How ranks agree on which optional inputs exist before the collectives that depend on it.
    ``flags`` unchanged at world size 1.
    """
    if not is_dist(group):
        return [bool(f) for f in flags]
    t = torch.tensor([int(bool(f)) for f in flags], device=device, dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return [bool(v) for v in t.tolist()]


def pad_dim(x: torch.Tensor, dim: int, size: int, value: float = 0.0) -> torch.Tensor:
    """Pad ``x`` with ``value`` along ``dim`` up to ``size`` (no copy when already that size)."""
    extra = size - x.shape[dim]
    if extra < 0:
        raise ValueError(f"cannot pad dim {dim} of size {x.shape[dim]} down to {size}")
    if extra == 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, x.new_full(shape, value)], dim=dim)


def _all_gather_flat(out: torch.Tensor, x: torch.Tensor, group) -> None:
    """Every rank's ``x`` end to end along dim 0 of ``out`` (one collective, no list of buffers)."""
    # torch 2.13 renamed all_gather_into_tensor (now deprecated) to all_gather_single.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x, group=group)


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
        ctx.sizes, ctx.rank, ctx.group = sizes, dist.get_rank(group), group
        padded = pad_dim(x.contiguous(), 0, max(sizes))
        buf = torch.empty((len(sizes) * padded.shape[0], *padded.shape[1:]), dtype=padded.dtype, device=padded.device)
        _all_gather_flat(buf, padded, group)
        return torch.cat([b[:n] for b, n in zip(buf.split(padded.shape[0]), sizes)], dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Every rank's loss depends on every rank's rows: sum the gradients over ranks,
        # then keep this rank's slice (a reduce-scatter; all_reduce works on every backend).
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None


def gather_with_grad(x: torch.Tensor, group=None, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate ``x[n_r, ...]`` from all ranks of ``group`` (default: the world) along dim 0, differentiably.

    Ranks may hold different numbers of rows (trailing dims must match). Returns
    ``[sum_r n_r, ...]`` in rank order. The backward pass sums gradients over ranks.
    ``sizes``: every rank's ``n_r`` when the caller already knows them (skips one collective).
    Identity at world size 1 or without a process group. Every rank of the group must call it
    (it is a collective).
    """
    return gather_with_offset(x, group, sizes)[0]


def gather_with_offset(x: torch.Tensor, group=None, sizes: list[int] | None = None) -> tuple[torch.Tensor, int]:
    """`gather_with_grad`, also returning where this rank's rows start in the result.

    Returns ``(gathered[sum_r n_r, ...], offset)``; ``(x, 0)`` at world size 1.
    """
    if not is_dist(group):
        return x, 0
    sizes = all_gather_sizes(x.shape[0], x.device, group) if sizes is None else sizes
    offset = sum(sizes[: dist.get_rank(group)])
    if max(sizes) == 0:  # nothing anywhere: skip the collective on empty buffers
        return x, offset
    if x.dtype == torch.bool:  # not every backend gathers bool
        return _GatherWithGrad.apply(x.to(torch.uint8), sizes, group).bool(), offset
    return _GatherWithGrad.apply(x, sizes, group), offset


def ring_shift(tensors: list[torch.Tensor], group=None) -> tuple[list[torch.Tensor], Callable[[], None]]:
    """Post a ring exchange: send each tensor to rank+1, receive same-shaped ones from rank-1 (ranks of ``group``).

    Every rank must call it with tensors of the same shapes and dtypes (pad first). Returns
    ``(received, wait)``: the receive buffers are valid only after ``wait()``; the sends keep
    reading ``tensors`` until then, so do not modify them in between (computing on them is
    fine, which is what lets the caller overlap the transfer with work). Bool tensors travel
    as uint8 (not every backend sends bool). Without a process group: ``(tensors, no-op)``.
    """
    if not is_dist(group):
        return list(tensors), lambda: None
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    after, before = ((rank + 1) % world, (rank - 1) % world)
    if group is not None:  # P2POp takes global ranks
        after, before = dist.get_global_rank(group, after), dist.get_global_rank(group, before)
    send = [t.contiguous().view(torch.uint8) if t.dtype == torch.bool else t.contiguous() for t in tensors]
    recv = [torch.empty_like(t) for t in send]
    ops = [dist.P2POp(dist.isend, t, after, group) for t in send]
    ops += [dist.P2POp(dist.irecv, t, before, group) for t in recv]
    works = dist.batch_isend_irecv(ops)
    out = [r.view(torch.bool) if t.dtype == torch.bool else r for r, t in zip(recv, tensors)]

    def wait() -> None:
        for w in works:
            w.wait()
        send.clear()  # the sends are done: drop the references that kept the buffers alive

    return out, wait


def average_gradients(params, bucket_bytes: int = 32 << 20) -> None:
    """Average ``.grad`` over ranks for the plain (not FSDP-sharded) parameters in ``params``.

    For parameters no wrapper syncs (a loss's temperature, a projection outside the sharded
    model), or all of a model trained without DDP: call it once after the micro-batches of a step
    (`grad_sync.defer_gradient_sync`), as the recipes do. Sharded
    (DTensor) parameters are skipped: FSDP2 has reduced their gradients already. A parameter
    with a gradient on some rank but none here gets zeros first (one small all-reduce of
    flags), so every rank all-reduces the same tensors. Gradients travel in flat buckets of at
    most ``bucket_bytes``, bounding the extra memory. No-op at world size 1.
    """
    from torch.distributed.tensor import DTensor

    params = [p for p in params if not isinstance(p, DTensor)]
    if not params or not is_dist():
        return
    present = any_rank([p.grad is not None for p in params], params[0].device)
    grads = []
    for p, some_rank_has_it in zip(params, present):
        if some_rank_has_it and p.grad is None:
            p.grad = torch.zeros_like(p)
        if some_rank_has_it:
            grads.append(p.grad)
    bucket: list[torch.Tensor] = []
    size = 0  # bytes in the bucket
    for g in grads:
        if bucket and (g.dtype != bucket[0].dtype or size >= bucket_bytes):
            _all_reduce_mean(bucket)
            bucket, size = [], 0
        bucket.append(g)
        size += g.numel() * g.element_size()
    if bucket:
        _all_reduce_mean(bucket)


def _all_reduce_mean(grads: list[torch.Tensor]) -> None:
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    for g, chunk in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(chunk.view_as(g))


def mean_over_ranks(x: torch.Tensor | float) -> float:
    """The mean of a scalar over ranks (one all-reduce; ``float(x)`` at world size 1).

    A rank's loss averages over its own rows, so with equal local batch sizes this is the loss
    of the global batch: what a recipe should log. Every rank must call it.
    """
    t = x.detach().reshape(()).double() if torch.is_tensor(x) else torch.tensor(float(x), dtype=torch.float64)
    if not is_dist():
        return float(t)
    t = t.cpu() if dist.get_backend() == "gloo" else t
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t) / dist.get_world_size()
