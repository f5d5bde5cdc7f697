"""Run a test body on W real processes with a gloo process group (CPU).

Usage from a test module (the body must be a module-level function so it pickles):

    def _body(rank, world_size, x):
        ...                      # process group is initialised; return anything picklable
        return value

    def test_something():
        results = run_ranks(_body, 2, x)   # [value_rank0, value_rank1]

A failure in any rank re-raises here with that rank's traceback. A rank that does not
finish within ``timeout`` seconds fails the test (all ranks are killed) instead of
hanging CI. Group many checks into one launch: each costs a few seconds of start-up.
"""

from __future__ import annotations

import io
import os
import queue
import socket
import traceback
from typing import Any, Callable

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank, world_size, port, args, out):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        try:
            # Serialise to bytes: tensors sent as-is go through shared memory that dies with this process.
            buf = io.BytesIO()
            torch.save(fn(rank, world_size, *args), buf)
            out.put((rank, True, buf.getvalue()))
        finally:
            dist.destroy_process_group()
    except BaseException:  # report everything, including assertion errors, to the parent
        out.put((rank, False, traceback.format_exc()))


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 240.0) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned gloo ranks; return results by rank."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(fn, r, world_size, port, args, out), daemon=True) for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        for _ in range(world_size):
            try:
                rank, ok, value = out.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"{fn.__name__}: a rank did not finish within {timeout:.0f} s (hang?)") from None
            if not ok:
                raise AssertionError(f"{fn.__name__} failed on rank {rank}:\n{value}")
            results[rank] = torch.load(io.BytesIO(value), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world_size)]
