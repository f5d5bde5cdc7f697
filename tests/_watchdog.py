"""Kill a test's child processes when they stop making progress, not when a wall clock runs out.

A fixed wall-clock ``timeout`` fails a test on a loaded machine (the same work just takes longer),
yet the only thing a timeout is for is turning a *hang* (a gloo rank waiting forever on a collective
the others never join, a deadlock) into a failure instead of a stalled CI job. A hang is idle; a slow
job is not. So the :class:`Watchdog` samples the process tree of a job (the launched processes and
all their descendants, found through the ``ppid`` links in ``/proc``; a process once seen stays
tracked when it is re-parented, and children started in their own session, as torchrun starts its
workers, are still descendants) and fails the job only when either

* **stall**: over the last ``stall`` wall seconds (default 120) the tree was *busy* less than
  ``busy_fraction`` (default 25 %) of that time, where busy time is CPU time (``utime + stime`` from
  ``/proc/<pid>/stat``, reaped children included) plus the time its threads sat runnable waiting
  for a CPU (``run_delay`` from ``/proc/<pid>/task/<tid>/schedstat``) plus time in uninterruptible
  I/O wait (state ``D``). A job starved by a loaded machine is runnable, so its waiting counts as
  progress and it is never killed, however slow: any thread with work to do is busy ~100 % of the
  time. A hung job neither runs nor waits to run, bar housekeeping: measured on the 2-core CI
  machine at load 6, a hung 2-rank torchrun job (gloo's 100 Hz TCP loop in each worker, the
  launcher's 10 Hz monitor) is busy 2.5-4 % of the time, ~0.8 % of it CPU. (CPU time alone cannot
  tell the two apart: that 0.8 % is more than a ``nice -n 19`` job beside busy loops gets.) Or
* **budget**: the tree has used more than ``cpu_budget`` CPU-seconds (a spin; ``None``: no budget).
  :func:`budget_for` sizes it from the wall-clock ``timeout`` the helpers used to take:
  ``CPU_BUDGET_FACTOR`` (4) x ``timeout`` CPU-seconds, twice what two fully busy cores (this CI
  machine) can burn within the old wall limit, which itself had headroom over the unloaded run.
  CPU-seconds barely grow with load, so a loaded machine does not bring a job nearer its budget.

On failure the whole tree is frozen (``SIGSTOP``, re-scanned until no new process appears) and
killed (``SIGKILL``). Without ``/proc`` (not Linux) it falls back to a plain wall-clock limit of
``cpu_budget`` seconds (no limit without a budget) and kills only the launched processes.

Entry points: :func:`run_watched` (a drop-in for ``subprocess.run(..., capture_output=True,
text=True)``), :func:`wait_for` (a started ``Popen`` or multiprocessing processes) and
:class:`Watchdog` itself (``poll()`` between short waits, ``kill()``), which ``_multiproc.run_ranks``
and ``_recipes.torchrun`` use.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

STALL = 120.0
"""Default seconds without progress after which a job counts as hung."""
BUSY_FRACTION = 0.25
"""Below this share of the ``stall`` window spent running, runnable or in I/O wait, the tree is stalled."""
CPU_BUDGET_FACTOR = 4.0
"""CPU-seconds of budget per second of the old wall-clock ``timeout`` (see :func:`budget_for`)."""

HAVE_PROC = sys.platform.startswith("linux") and os.path.exists("/proc/self/stat")
_TICK = os.sysconf("SC_CLK_TCK") if HAVE_PROC else 100


def budget_for(timeout: float | None) -> float | None:
    """The CPU-seconds budget for a job that used to get a wall-clock ``timeout`` (``None``: no budget)."""
    return None if timeout is None else CPU_BUDGET_FACTOR * float(timeout)


def _text(data: Any) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else str(data)


class WatchdogTimeout(subprocess.TimeoutExpired):
    """The job made no progress for ``stall`` seconds, or spent its CPU budget; it has been killed.

    ``reason`` says which; ``output``/``stderr`` hold what it printed (``str(e)`` shows their tails).
    """

    def __init__(self, cmd: Any, reason: str, output: Any = None, stderr: Any = None, timeout: float = 0.0):
        super().__init__(cmd, timeout, output=output, stderr=stderr)
        self.reason = reason

    def __str__(self) -> str:
        cmd = " ".join(map(str, self.cmd)) if isinstance(self.cmd, (list, tuple)) else str(self.cmd or "")
        parts = [self.reason] + ([f"command: {cmd}"] if cmd else [])
        for name, data, keep in (("stdout", self.output, 4000), ("stderr", self.stderr, 6000)):
            text = _text(data)
            if text:
                parts.append(f"--- {name} (last {keep} characters) ---\n{text[-keep:]}")
        return "\n".join(parts)


@dataclass
class _Stat:
    ppid: int
    state: str
    self_cpu: float  # utime + stime, seconds
    child_cpu: float  # cutime + cstime: reaped descendants, seconds
    start: int  # starttime in ticks since boot: tells a reused pid apart


@dataclass
class _Tracked:
    stat: _Stat
    delays: dict[int, float] = field(default_factory=dict)  # tid -> run_delay seconds


def _read_stat(pid: int) -> _Stat | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    f = raw[raw.rfind(b")") + 2 :].split()  # the command name may hold spaces and parentheses
    try:
        return _Stat(
            ppid=int(f[1]),
            state=f[0].decode(),
            self_cpu=(int(f[11]) + int(f[12])) / _TICK,
            child_cpu=(int(f[13]) + int(f[14])) / _TICK,
            start=int(f[19]),
        )
    except (IndexError, ValueError):
        return None


def _scan() -> dict[int, _Stat]:
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _read_stat(int(name))
            if st is not None:
                out[int(name)] = st
    return out


def _run_delays(pid: int) -> dict[int, float]:
    """Seconds each thread of ``pid`` has spent runnable but waiting for a CPU."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                out[int(tid)] = int(f.read().split()[1]) / 1e9
        except (OSError, IndexError, ValueError):
            pass
    return out


class Watchdog:
    """Watches the process tree rooted at ``pids()``, children of this process (``pids`` is called at
    each sample: processes may start late; a pid whose parent is not this process is ignored).

    Call :meth:`poll` between short waits (at most ``interval`` seconds apart); it samples when one
    is due and returns why the job must be killed, or ``None``. Then :meth:`kill` kills the tree.
    ``cpu`` (CPU-seconds used so far) and ``waited`` (seconds runnable but not running) are public.
    """

    def __init__(
        self,
        pids: Callable[[], Iterable[int]],
        *,
        stall: float = STALL,
        cpu_budget: float | None = None,
        busy_fraction: float = BUSY_FRACTION,
        interval: float | None = None,
        what: str = "the job",
    ) -> None:
        self.pids, self.stall, self.cpu_budget, self.busy_fraction, self.what = (
            pids,
            float(stall),
            cpu_budget,
            busy_fraction,
            what,
        )
        self.interval = interval if interval is not None else min(1.0, max(0.05, self.stall / 20))
        self.cpu = self.waited = self.io = 0.0
        self._tracked: dict[int, _Tracked] = {}
        self._pending: dict[int, float] = collections.defaultdict(float)  # CPU of tracked children a parent reaps
        self._history: collections.deque[tuple[float, float, float, float]] = collections.deque()
        self._started = self._last = time.monotonic()
        self._next = 0.0

    # -- tree discovery -------------------------------------------------------------------------
    def _members(self, snapshot: dict[int, _Stat]) -> dict[int, _Stat]:
        me = os.getpid()
        members = {}
        for pid in self.pids():  # our children: a reaped root's pid, reused by a stranger, is not
            if pid in snapshot and snapshot[pid].ppid == me:
                members[pid] = snapshot[pid]
        for pid, tracked in self._tracked.items():  # sticky: re-parented orphans stay in the tree
            st = snapshot.get(pid)
            if st is not None and st.start == tracked.stat.start and pid != me:
                members[pid] = st
        children: dict[int, list[int]] = collections.defaultdict(list)
        for pid, st in snapshot.items():
            children[st.ppid].append(pid)
        stack = list(members)
        while stack:
            for child in children.get(stack.pop(), ()):
                if child not in members and child != me:
                    members[child] = snapshot[child]
                    stack.append(child)
        return members

    # -- sampling -------------------------------------------------------------------------------
    def sample(self) -> None:
        now = time.monotonic()
        elapsed, self._last = now - self._last, now
        members = self._members(_scan())
        for pid, old in list(self._tracked.items()):
            st = members.get(pid)
            if st is None or st.start != old.stat.start:  # gone: its parent's cutime will absorb what we counted
                del self._tracked[pid]
                if old.stat.ppid in members:
                    self._pending[old.stat.ppid] += old.stat.self_cpu + old.stat.child_cpu
        for pid, st in members.items():
            old = self._tracked.get(pid)
            if old is None:
                d_self, d_child, old_delays = st.self_cpu, st.child_cpu, {}
            else:
                d_self = max(0.0, st.self_cpu - old.stat.self_cpu)
                d_child = max(0.0, st.child_cpu - old.stat.child_cpu)
                old_delays = old.delays
            absorbed = min(d_child, self._pending.get(pid, 0.0))
            if absorbed:
                self._pending[pid] -= absorbed
            self.cpu += d_self + d_child - absorbed
            delays = _run_delays(pid)
            for tid, d in delays.items():
                self.waited += max(0.0, d - old_delays.get(tid, 0.0))
            if st.state == "D" and old is not None:
                self.io += elapsed
            self._tracked[pid] = _Tracked(st, delays)
        for pid in [p for p in self._pending if p not in self._tracked]:
            del self._pending[pid]
        self._history.append((now, self.cpu, self.waited, self.io))

    def poll(self) -> str | None:
        """Sample if one is due; return why the job must be killed (stall or budget), else ``None``."""
        now = time.monotonic()
        if not HAVE_PROC:
            limit = self.cpu_budget
            if limit is not None and now - self._started > limit:
                return f"{self.what}: still running after {limit:.0f} s of wall clock (no /proc here to watch its CPU)"
            return None
        if now < self._next:
            return None
        self._next = now + self.interval
        self.sample()
        if self.cpu_budget is not None and self.cpu > self.cpu_budget:
            return (
                f"{self.what}: used {self.cpu:.1f} CPU-seconds, over its budget of {self.cpu_budget:.0f} "
                "(a spin?); killed its process tree"
            )
        hist = self._history
        while len(hist) >= 2 and hist[1][0] <= now - self.stall:
            hist.popleft()
        t0, cpu0, waited0, io0 = hist[0]
        window = now - t0
        cpu, waited, io = self.cpu - cpu0, self.waited - waited0, self.io - io0
        if window >= self.stall and cpu + waited + io < self.busy_fraction * window:
            return (
                f"{self.what}: no CPU progress for {self.stall:.0f} s (hang?): in the last {window:.1f} s its "
                f"{len(self._tracked)} processes ran {cpu:.2f} CPU-s and waited {waited:.2f} s for a CPU "
                f"(under {self.busy_fraction:.0%} busy); killed its process tree"
            )
        return None

    # -- killing --------------------------------------------------------------------------------
    def kill(self) -> None:
        """``SIGKILL`` the whole tree: freeze it first (``SIGSTOP``) so that nothing forks past the scan."""
        if not HAVE_PROC:
            for pid in self.pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except (OSError, TypeError):
                    pass
            return
        frozen: dict[int, int] = {}
        for _ in range(10):
            members = self._members(_scan())
            for pid, st in members.items():
                self._tracked.setdefault(pid, _Tracked(st))
            new = [pid for pid in members if pid not in frozen]
            if not new:
                break
            for pid in new:
                frozen[pid] = members[pid].start
                try:
                    os.kill(pid, signal.SIGSTOP)
                except OSError:
                    pass
        for pid, start in frozen.items():
            st = _read_stat(pid)
            if st is not None and st.start == start:  # not a reused pid
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass


def wait_for(
    target: subprocess.Popen | Sequence[Any],
    watchdog: Watchdog | None = None,
    *,
    stall: float = STALL,
    cpu_budget: float | None = None,
    what: str | None = None,
    input: str | bytes | None = None,
) -> tuple[Any, Any]:
    """Wait for a started ``Popen`` (returns ``communicate()``'s ``(stdout, stderr)``) or for
    multiprocessing processes (joins them; returns ``(None, None)``) under a watchdog.

    On a stall or a spent budget the tree is killed and :class:`WatchdogTimeout` raised, with the
    output so far. Any other exception while waiting (Ctrl-C, pytest-timeout) also kills the tree.
    """
    procs = [target] if isinstance(target, subprocess.Popen) else list(target)
    if watchdog is None:
        name = what or (" ".join(map(str, target.args)) if isinstance(target, subprocess.Popen) else "processes")
        watchdog = Watchdog(lambda: [p.pid for p in procs if p.pid], stall=stall, cpu_budget=cpu_budget, what=name)
    try:
        if isinstance(target, subprocess.Popen):
            while True:
                try:
                    return target.communicate(input, timeout=watchdog.interval)
                except subprocess.TimeoutExpired:
                    input = None  # sent on the first call; communicate() keeps the rest of its state
                    reason = watchdog.poll()
                    if reason is not None:
                        watchdog.kill()
                        try:
                            out, err = target.communicate(timeout=30)
                        except subprocess.TimeoutExpired as e:  # a process we could not see holds the pipes
                            target.kill()
                            out, err = e.output, e.stderr
                        raise WatchdogTimeout(target.args, reason, out, err) from None
        while any(p.is_alive() for p in procs):
            for p in procs:
                p.join(timeout=watchdog.interval / len(procs))
            reason = watchdog.poll()
            if reason is not None:
                watchdog.kill()
                raise WatchdogTimeout(None, reason)
        return None, None
    except WatchdogTimeout:
        raise
    except BaseException:
        watchdog.kill()
        raise


def run_watched(
    cmd: Sequence[str],
    *,
    stall: float = STALL,
    cpu_budget: float | None = None,
    timeout: float | None = None,
    capture_output: bool = True,
    text: bool = True,
    check: bool = False,
    input: str | bytes | None = None,
    **popen_kwargs: Any,
) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True, ...)`` under a :class:`Watchdog`.

    No wall-clock limit: the job is killed (its whole tree) and :class:`WatchdogTimeout` raised only
    when it makes no progress for ``stall`` seconds or uses more than ``cpu_budget`` CPU-seconds.
    ``timeout``, kept so that a ``subprocess.run`` call converts by its name alone, is the old
    wall-clock estimate and only sizes the budget when none is given: ``budget_for(timeout)``.
    """
    if cpu_budget is None:
        cpu_budget = budget_for(timeout)
    if capture_output:
        popen_kwargs.setdefault("stdout", subprocess.PIPE)
        popen_kwargs.setdefault("stderr", subprocess.PIPE)
    if input is not None:
        popen_kwargs.setdefault("stdin", subprocess.PIPE)
    with subprocess.Popen(list(cmd), text=text, **popen_kwargs) as proc:
        out, err = wait_for(proc, stall=stall, cpu_budget=cpu_budget, input=input)
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if check:
        done.check_returncode()
    return done
