"""Run a test body on W real processes with a gloo process group (CPU).

Usage from a test module (the body must be a module-level function so it pickles):

    def _body(rank, world_size, x):
        ...                      # process group is initialised; return anything picklable
        return value

    def test_something():
        results = run_ranks(_body, 2, x)   # [value_rank0, value_rank1]

A failure in any rank re-raises here with that rank's traceback. A hang fails the test instead
of stalling CI, but a slow machine never does: a watchdog (``_watchdog.Watchdog``) kills all ranks
(and their children) when they make no progress for ``stall`` seconds or spend their CPU budget;
see ``run_ranks``. Group many checks into one launch: each costs a few seconds of start-up.
"""

from __future__ import annotations

import io
import os
import queue
import socket
import time
import traceback
from typing import Any, Callable

import torch
import torch.multiprocessing as mp
from _watchdog import STALL, Watchdog, budget_for


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


def run_ranks(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 240.0, stall: float = STALL
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned gloo ranks; return results by rank.

    There is no wall-clock limit. The ranks (with any processes they start) are killed and
    ``TimeoutError`` raised when they make no progress for ``stall`` seconds (they neither ran nor
    waited for a CPU for 75 % of that time: a rank blocked on a collective that the others never
    join), or when together they used more than ``budget_for(timeout)`` = 4 x ``timeout``
    CPU-seconds (a spin). ``timeout`` is the old wall-clock estimate for the job on an idle
    machine, kept at the call sites; it only sizes that budget. A rank that dies without a result
    (a crash, the OOM killer) fails the test about 10 s later, without waiting for the stall.
    """
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(fn, r, world_size, port, args, out), daemon=True) for r in range(world_size)
    ]
    watchdog = Watchdog(
        lambda: [p.pid for p in procs if p.pid],
        stall=stall,
        cpu_budget=budget_for(timeout),
        what=f"{fn.__name__} on {world_size} ranks",
    )
    results: dict[int, Any] = {}
    dead_since: float | None = None
    try:
        for p in procs:
            p.start()
        while len(results) < world_size:
            try:
                rank, ok, value = out.get(timeout=watchdog.interval)
            except queue.Empty:
                reason = watchdog.poll()
                if reason is not None:
                    watchdog.kill()
                    raise TimeoutError(reason) from None
                dead = {r: p.exitcode for r, p in enumerate(procs) if r not in results and p.exitcode not in (None, 0)}
                if dead:  # give a result already in the queue's pipe time to arrive, then fail
                    dead_since = dead_since or time.monotonic()
                    if time.monotonic() - dead_since > 10:
                        raise AssertionError(f"{fn.__name__}: ranks died without a result (rank: exit code): {dead}")
                continue
            if not ok:
                raise AssertionError(f"{fn.__name__} failed on rank {rank}:\n{value}")
            results[rank] = torch.load(io.BytesIO(value), weights_only=False)
    except BaseException:
        watchdog.kill()  # the ranks' children too (a hung rank's DataLoader workers, ...)
        raise
    finally:
        for p in procs:
            if p.pid is not None:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
    return [results[r] for r in range(world_size)]
