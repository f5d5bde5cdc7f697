"""The test watchdog (tests/_watchdog.py) kills a hung job after ``stall`` seconds without progress, but
never a job that is slow: busy, or starved of CPU by a loaded machine. Real processes, small stalls."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from _multiproc import run_ranks
from _watchdog import HAVE_PROC, WatchdogTimeout, run_watched

pytestmark = pytest.mark.skipif(not HAVE_PROC, reason="the watchdog reads /proc; elsewhere it is a wall clock")

PY = sys.executable

# A hang whose tree spans two sessions (as torchrun's workers do): the child starts a grandchild in a
# session of its own, prints its pid, and both sleep.
_HANG = """
import subprocess, sys, time
g = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1000)"], start_new_session=True)
print("grandchild", g.pid, flush=True)
print("still waiting", file=sys.stderr, flush=True)
time.sleep(1000)
"""


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in "ZX"  # a zombie whose reaper is not us
    except OSError:
        return True


def test_a_hang_is_killed_after_stall_seconds_with_its_tree_and_output() -> None:
    t0 = time.monotonic()
    with pytest.raises(WatchdogTimeout) as info:
        run_watched([PY, "-c", _HANG], stall=3)
    took = time.monotonic() - t0
    message = str(info.value)
    assert "no CPU progress for 3 s (hang?)" in message, message
    assert "grandchild" in message and "still waiting" in message, message  # the output tails
    assert 3 <= took < 60, took
    pid = int(info.value.output.split()[1])
    deadline = time.monotonic() + 10
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(pid), f"grandchild {pid} in its own session survived"


def _rank0_waits_for_a_send_rank1_never_makes(rank: int, world_size: int) -> None:
    import torch
    import torch.distributed as dist

    if rank == 0:
        dist.recv(torch.zeros(2), src=1)
    else:
        dist.barrier()


def test_a_gloo_hang_in_run_ranks_is_killed() -> None:
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"no CPU progress for 3 s \(hang\?\)"):
        run_ranks(_rank0_waits_for_a_send_rank1_never_makes, 2, stall=3)
    assert time.monotonic() - t0 < 120


def test_a_busy_child_that_outlives_stall_is_not_killed_and_returns_its_output() -> None:
    busy = "import sys, time\nt = time.monotonic() + 5\nwhile time.monotonic() < t: pass\nprint('done'); sys.exit(3)"
    done = run_watched([PY, "-c", busy], stall=3)
    assert (done.returncode, done.stdout) == (3, "done\n"), done


def test_a_child_starved_of_cpu_is_not_killed() -> None:
    """Beside one busy loop per core at normal priority, a child at nice 19 gets next to no CPU (here
    0.01-0.03 CPU-s in its 5 s): it crawls, but it is runnable, so it is never taken for a hang."""
    work = (  # starts at normal priority (a niced interpreter start-up alone would take many seconds here)
        "import os, time\nos.nice(19)\nw, c = time.monotonic(), time.process_time()\n"
        "while time.monotonic() - w < 5: pass\nprint(time.process_time() - c, time.monotonic() - w)"
    )
    hogs = [subprocess.Popen([PY, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    try:
        done = run_watched([PY, "-c", work], stall=3)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert done.returncode == 0, done.stderr
    cpu, wall = map(float, done.stdout.split())
    print(f"starved child: {cpu:.2f} CPU-s in {wall:.1f} s")
    assert cpu < 0.5 * wall, (cpu, wall)  # it really was starved (else this test shows nothing)


def test_the_cpu_budget_kills_a_spin() -> None:
    t0 = time.monotonic()
    with pytest.raises(WatchdogTimeout, match=r"over its budget of 1 \(a spin\?\)"):
        run_watched([PY, "-c", "while True: pass"], cpu_budget=1)
    assert time.monotonic() - t0 < 60
