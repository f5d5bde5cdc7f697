"""Weighted multi-task batch sampler: every rank draws the same task, disjoint rows.

``WeightedTaskSampler`` yields ``(task, indices)`` forever. Step ``t``'s task (and group)
is a pure function of ``(seed, t)``, so all ranks agree without communicating and the whole
global batch (``batch_size * world_size`` rows; ``batch_size`` is per rank, one int or one per
task) comes from one task: in-batch and cross-rank negatives are then of the same kind. Rows come from a
per-(task, group) stream: pass ``p`` of the stream is a keyed permutation (a Feistel
bijection, never materialised for big streams) derived from ``(seed, task, group, p)``, with
the few rows at its start re-ordered so that a global batch straddling two passes never holds
a row twice (see ``_Stream``); a cursor walks it, so small tasks cycle (a fresh shuffle per
pass) and large ones are never enumerated up front. The state is the step plus one
``(pass, offset)`` cursor per stream: O(#streams) to save and to restore, no replay.
"""

from __future__ import annotations

import math
import warnings
import zlib
from typing import Any, Hashable, Iterator, Mapping, Sequence

import numpy as np

__all__ = ["WeightedTaskSampler", "parse_weights", "parse_group_weights"]

_MASK = (1 << 64) - 1


def _mix(*keys: int) -> int:
    """splitmix64 over a key tuple: a stateless, platform-independent 64-bit hash."""
    h = 0x9E3779B97F4A7C15
    for k in keys:
        h = (h ^ (k & _MASK)) * 0xBF58476D1CE4E5B9 & _MASK
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & _MASK
        h ^= h >> 31
    return h


def _uniform(*keys: int) -> float:
    return (_mix(*keys) >> 11) / float(1 << 53)  # 53 random bits -> [0, 1)


def _name_key(name: Any) -> int:
    return zlib.crc32(str(name).encode("utf-8"))  # stable across processes (unlike hash())


def parse_weights(spec: str, what: str = "weights") -> dict[str, float]:
    """Parse ``"dataset_a=0.5,dataset_b=1.2"`` into ``{"dataset_a": 0.5, "dataset_b": 1.2}``.

    Raises ``ValueError`` naming the bad entry on: a missing ``=``, an empty name, a
    duplicate name, a weight that is not a finite non-negative number, or an empty string.
    """
    out: dict[str, float] = {}
    entries = [e.strip() for e in spec.split(",")]
    if not spec.strip():
        raise ValueError(f"empty {what} string")
    for entry in entries:
        name, sep, value = entry.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name or not value:
            raise ValueError(f"bad {what} entry {entry!r} in {spec!r}: expected name=weight")
        try:
            weight = float(value)
        except ValueError:
            raise ValueError(f"bad {what} entry {entry!r} in {spec!r}: {value!r} is not a number") from None
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"bad {what} entry {entry!r} in {spec!r}: weight must be finite and >= 0")
        if name in out:
            raise ValueError(f"duplicate name {name!r} in {what} {spec!r}")
        out[name] = weight
    return out


def parse_group_weights(spec: str) -> dict[int, float]:
    """Parse ``"0=1,1=1,2=1,3=0"`` (weight per number of source images) into ``{0: 1.0, ...}``."""
    out: dict[int, float] = {}
    for name, weight in parse_weights(spec, "group weights").items():
        try:
            out[int(name)] = weight
        except ValueError:
            raise ValueError(f"bad group weights entry {name!r} in {spec!r}: group must be an integer") from None
    return out


def rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """``(rank, world_size)`` as given, each ``None`` read from the process group (0 / 1 without one)."""
    if rank is None or world_size is None:
        from ..distributed import get_rank, get_world_size

        rank = get_rank() if rank is None else rank
        world_size = get_world_size() if world_size is None else world_size
    return rank, world_size


def _feistel(x: np.ndarray, n: int, round_keys: list[int]) -> np.ndarray:
    """A keyed bijection of ``[0, n)`` applied to ``x`` without materialising it.

    A balanced Feistel network on the smallest even-bit domain >= n, with cycle-walking
    (re-encrypt values that land >= n) to stay inside ``[0, n)``; O(len(x)) time and memory,
    so a pass over a 10^9-row task costs nothing until its rows are drawn.
    """
    half = max(1, (max(n - 1, 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    shift, m1, m2 = np.uint64(half), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)

    def encrypt(v: np.ndarray) -> np.ndarray:
        left, right = v >> shift, v & mask
        for key in round_keys:
            h = (right ^ np.uint64(key)) * m1  # wraps mod 2^64, as intended
            h = (h ^ (h >> np.uint64(29))) * m2
            left, right = right, left ^ ((h ^ (h >> np.uint64(32))) & mask)
        return (left << shift) | right

    out = encrypt(x.astype(np.uint64))
    todo = out >= n
    while todo.any():
        out[todo] = encrypt(out[todo])
        todo = out >= n
    return out.astype(np.int64)


def _arrange(rows: np.ndarray, head: int, avoid: np.ndarray, tail: np.ndarray) -> np.ndarray:
    """``rows`` re-ordered: the first ``head`` rows in neither ``avoid`` nor ``tail``, then the
    other rows not in ``tail``, then the ``tail`` rows; each part keeps the input order."""
    last = np.isin(rows, tail)
    first = np.zeros(len(rows), dtype=bool)
    first[np.flatnonzero(~last & ~np.isin(rows, avoid))[:head]] = True
    return np.concatenate([rows[first], rows[~first & ~last], rows[last]])


class _Stream:
    """Rows of one (task, group), taken ``batch`` (the global batch) at a time by a cursor.

    ``members`` lists the rows of a group (``None``: the whole task, rows ``0..size-1``).
    Pass ``p`` is a keyed permutation ``P_p`` re-ordered so that, when ``size >= batch``, no
    global batch repeats a row. Takes are always ``batch`` rows, so the batch straddling the
    start of pass ``p`` is the last ``t_p = p * size % batch`` rows of pass ``p - 1`` (the set
    ``A_p``) plus the first ``h_p = batch - t_p`` of pass ``p``. Pass ``p`` therefore ends with
    ``A_{p+1}`` and keeps ``A_p`` out of its first ``h_p`` places (``_arrange``). Each ``A_p``
    must be known without replaying earlier passes: it is the last ``t_p`` rows of ``P_{a-1}``,
    where ``a <= p`` is the latest pass start with ``t_a <= size - batch``. Such a short tail
    leaves any head enough rows, so the sets start afresh there; between two such starts the
    head and tail of a pass cover nearly all of it and the tails must nest (for
    ``size = batch + 1`` each is the previous one plus a row), which suffixes of one
    permutation do. If ``size >= 2 * batch`` then ``a = p``: ``A_p`` is ``P_{p-1}``'s own tail
    and only the first ``h_p + t_p = batch`` places of a pass move, so big streams stay lazy.
    """

    _CACHE_ROWS = 1 << 20  # streams up to this size keep their current pass in memory (speed)

    def __init__(self, size: int, members: np.ndarray | None, keys: tuple[int, ...], batch: int) -> None:
        self.size, self.members, self.keys, self.batch = size, members, keys, batch
        self.pass_, self.offset = 0, 0
        self._lazy = size > max(self._CACHE_ROWS, 2 * batch)  # all of A_p comes from P_{p-1}
        self._cached: tuple[int, np.ndarray] | None = None  # (pass, the pass or its moved prefix)

    def _raw(self, p: int, start: int, stop: int) -> np.ndarray:
        """``P_p[start:stop]``."""
        return _feistel(np.arange(start, stop), self.size, [_mix(*self.keys, p, r) for r in range(4)])

    def _ends(self, p: int) -> tuple[int, int, np.ndarray]:
        """``(t_p, h_p, A_p)`` of the batch straddling the start of pass ``p``."""
        t = p * self.size % self.batch
        if t == 0 or self.size < self.batch:  # no straddling batch / rows repeat anyway (warned)
            return 0, 0, np.empty(0, dtype=np.int64)
        if not self._lazy and self._cached is not None and self._cached[0] == p - 1:
            return t, self.batch - t, self._cached[1][self.size - t :]  # pass p-1 ends with A_p
        # Going back a pass lowers t by size - batch (no wrap while t > size - batch): the
        # latest start a with t_a <= size - batch, in closed form (a = p if size >= 2 * batch).
        a = p - max(0, (t - 1) // (self.size - self.batch))
        return t, self.batch - t, self._raw(a - 1, self.size - t, self.size)

    def _build(self, p: int) -> np.ndarray:
        t, h, avoid = self._ends(p)
        if self._lazy:  # A_{p+1} is P_p's own tail: only P_p[:h + t] moves
            return _arrange(self._raw(p, 0, h + t), h, avoid, avoid[:0])
        return _arrange(self._raw(p, 0, self.size), h, avoid, self._ends(p + 1)[2])

    def _positions(self, start: int, stop: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != self.pass_:
            self._cached = (self.pass_, self._build(self.pass_))
        built = self._cached[1]
        if not self._lazy:
            return built[start:stop]
        out = self._raw(self.pass_, start, stop)
        if start < len(built):
            out[: len(built) - start] = built[start:stop]
        return out

    def __len__(self) -> int:
        return self.size

    def take(self) -> np.ndarray:
        """The next global batch."""
        out, n = [], self.batch
        while n > 0:
            k = min(n, self.size - self.offset)
            pos = self._positions(self.offset, self.offset + k)
            out.append(pos if self.members is None else self.members[pos])
            n -= k
            self.offset += k
            if self.offset == self.size:
                self.pass_, self.offset = self.pass_ + 1, 0
        return np.concatenate(out)

    def state(self) -> list[int]:
        return [self.pass_, self.offset]

    def restore(self, state: Sequence[int]) -> None:
        self.pass_, self.offset = int(state[0]), int(state[1])


class WeightedTaskSampler:
    """Infinite ``(task, indices)`` iterator; see the module docstring.

    Args:
        task_sizes: rows per task. Task names are sorted, so dict order never matters.
        batch_size: rows per rank per step; the global batch is ``batch_size * world_size``. A mapping
            ``{task: rows per rank}`` (one for every drawn task) gives each task its own: a step drawn
            from task ``T`` is ``batch_size[T]`` rows per rank, ``batch_size[T] * world_size`` in all.
            ``self.batch_size`` / ``self.global_batch`` are then dicts over the drawn tasks (else ints);
            ``drawn_rows`` is the global batch of the last draw (before any: ``global_batch``, or 0).
        weights: task -> weight; ``P(task) = w / sum(w)``. Tasks missing from it are excluded
            (a warning names them). ``None`` weights every task by its size (like one
            concatenated dataset).
        seed: everything (task draws, group draws, shuffles) derives from it.
        rank, world_size: this rank's slice; default from the process group (0 / 1 without one).
        group_of: task -> the group of each of its rows (``len == task_sizes[task]``), e.g. the
            number of source images; tasks not in it are not grouped.
        group_weights: group -> weight, drawn after the task among the groups that task has.
            Groups missing from it are excluded with a warning, and so (with a warning) are
            weighted groups that no task has. ``None``: all groups weigh 1.

    No global batch holds a row twice when its stream (task, or task and group) has at least
    its task's ``batch_size * world_size`` rows, even across a pass boundary; every pass still uses each
    row exactly once. A smaller stream repeats rows within a batch (a warning names it).

    Raises ``ValueError`` for weights naming unknown tasks, a zero total weight, an empty
    task with weight, a grouped task none of whose groups can be drawn (all would
    otherwise loop forever or sample nothing), or a per-task ``batch_size`` naming an unknown
    task or lacking / below 1 for a drawn one.
    """

    def __init__(
        self,
        task_sizes: Mapping[str, int],
        batch_size: int | Mapping[str, int],
        weights: Mapping[str, float] | None = None,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        *,
        group_of: Mapping[str, Sequence[Hashable]] | None = None,
        group_weights: Mapping[Hashable, float] | None = None,
    ) -> None:
        rank, world_size = rank_and_world(rank, world_size)
        per_task = isinstance(batch_size, Mapping)
        if (not per_task and batch_size < 1) or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, {world_size}")
        self.rank, self.world_size, self.seed = rank, world_size, int(seed)
        self.step = 0
        self.tasks, task_w = self._task_weights(dict(task_sizes), weights)
        self._task_cum = np.cumsum(task_w)
        self._per_rank = self._task_batches(batch_size, task_sizes)  # task -> rows per rank
        self.batch_size: int | dict[str, int] = dict(self._per_rank) if per_task else batch_size
        self.global_batch: int | dict[str, int] = (
            {t: b * world_size for t, b in self._per_rank.items()} if per_task else batch_size * world_size
        )
        self.drawn_rows = 0 if per_task else self.global_batch  # the last draw's rows, all ranks
        self._groups: dict[str, tuple[list[str], np.ndarray]] = {}  # task -> (group names, cumulative weights)
        self._streams: dict[str, _Stream] = {}
        self._build_streams(dict(task_sizes), group_of or {}, group_weights)
        small = sorted(k for k, s in self._streams.items() if len(s) < s.batch)
        if small:
            of = "" if isinstance(self.global_batch, int) else " of their task"
            warnings.warn(
                f"streams smaller than the global batch{of} ({self.global_batch}) repeat rows within a batch: {small}"
            )

    def _task_batches(self, batch_size: int | Mapping[str, int], sizes: Mapping[str, int]) -> dict[str, int]:
        """The per-rank batch of each drawn task (sorted), refusing unknown, missing or < 1 per-task ones."""
        if not isinstance(batch_size, Mapping):
            return dict.fromkeys(self.tasks, batch_size)
        unknown = sorted(set(batch_size) - set(sizes))
        if unknown:
            raise ValueError(f"batch_size names unknown tasks {unknown}; tasks are {sorted(sizes)}")
        for task in self.tasks:
            if task not in batch_size or int(batch_size[task]) < 1:
                raise ValueError(f"task {task!r} needs a batch_size >= 1, got {batch_size.get(task)}")
        return {t: int(batch_size[t]) for t in self.tasks}

    def _task_weights(
        self, sizes: dict[str, int], weights: Mapping[str, float] | None
    ) -> tuple[list[str], list[float]]:
        if weights is None:
            weights = {t: float(n) for t, n in sizes.items()}
        unknown = sorted(set(weights) - set(sizes))
        if unknown:
            raise ValueError(f"weights name unknown tasks {unknown}; tasks are {sorted(sizes)}")
        absent = sorted(set(sizes) - set(weights))
        if absent:
            warnings.warn(f"tasks without a weight are excluded from sampling: {absent}")
        if any(w < 0 or not math.isfinite(w) for w in weights.values()):
            raise ValueError(f"task weights must be finite and >= 0: {dict(weights)}")
        tasks = sorted(t for t, w in weights.items() if w > 0)
        if not tasks:
            raise ValueError(f"task weights sum to zero: {dict(weights)}")
        empty = [t for t in tasks if sizes[t] <= 0]
        if empty:
            raise ValueError(f"tasks with weight but no rows: {empty}")
        return tasks, [float(weights[t]) for t in tasks]

    def _build_streams(
        self,
        sizes: dict[str, int],
        group_of: Mapping[str, Sequence[Hashable]],
        group_weights: Mapping[Hashable, float] | None,
    ) -> None:
        gw = None if group_weights is None else {str(g): float(w) for g, w in group_weights.items()}
        seen: set[str] = set()
        for task in self.tasks:
            batch = self._per_rank[task] * self.world_size
            if task not in group_of:
                self._streams[task] = _Stream(sizes[task], None, (self.seed, _name_key(task)), batch)
                continue
            labels = np.asarray([str(g) for g in group_of[task]])
            if len(labels) != sizes[task]:
                raise ValueError(f"group_of[{task!r}] has {len(labels)} entries but the task has {sizes[task]} rows")
            names = sorted(set(labels.tolist()))
            seen.update(names)
            if gw is not None and set(names) - set(gw):
                warnings.warn(f"task {task!r}: groups without a weight are excluded: {sorted(set(names) - set(gw))}")
            drawn = [g for g in names if (1.0 if gw is None else gw.get(g, 0.0)) > 0]
            if not drawn:
                raise ValueError(f"task {task!r} has weight but none of its groups {names} has a positive group weight")
            for g in drawn:
                members = np.flatnonzero(labels == g)
                keys = (self.seed, _name_key(task), _name_key(g))
                self._streams[f"{task}/{g}"] = _Stream(len(members), members, keys, batch)
            self._groups[task] = (drawn, np.cumsum([1.0 if gw is None else gw[g] for g in drawn]))
        if gw is not None and group_of:
            orphans = sorted(g for g, w in gw.items() if w > 0 and g not in seen)
            if orphans:  # e.g. seed 004's "0=1,1=1,2=1,3=0" on data without 2-source rows
                warnings.warn(f"groups {orphans} have weight but no rows in any sampled task; they are never drawn")

    def draw_spec(self) -> str:
        """Everything ``draw`` and the row streams depend on (seed, global batch(es), tasks, weights, groups), as text:
        two samplers with equal specs draw the same tasks and rows at every step."""
        groups = {t: (names, [round(float(c), 9) for c in cum]) for t, (names, cum) in sorted(self._groups.items())}
        weights = [round(float(c), 9) for c in self._task_cum]
        return repr((self.seed, self.global_batch, self.tasks, weights, groups, sorted(self._streams)))

    def draw(self, step: int) -> tuple[str, str]:
        """The (task, stream key) of global step ``step``: a pure function of (seed, step)."""
        u = _uniform(self.seed, step, 0) * self._task_cum[-1]
        task = self.tasks[min(int(np.searchsorted(self._task_cum, u, side="right")), len(self.tasks) - 1)]
        if task not in self._groups:
            return task, task
        names, cum = self._groups[task]
        u = _uniform(self.seed, step, 1, _name_key(task)) * cum[-1]
        group = names[min(int(np.searchsorted(cum, u, side="right")), len(names) - 1)]
        return task, f"{task}/{group}"

    def __iter__(self) -> Iterator[tuple[str, list[int]]]:
        return self

    def __next__(self) -> tuple[str, list[int]]:
        task, key = self.draw(self.step)
        rows = self._streams[key].take()  # every rank advances the same cursor
        self.step, self.drawn_rows, b = self.step + 1, len(rows), self._per_rank[task]
        return task, rows[self.rank * b : (self.rank + 1) * b].tolist()

    def state_dict(self) -> dict[str, Any]:
        """Step + one ``[pass, offset]`` per stream + each stream's rows (plain types, JSON-serialisable).

        ``global_batch``: an int, or ``{task: its global batch}`` for a per-task ``batch_size``."""
        gb = self.global_batch
        return {
            "step": self.step,
            "seed": self.seed,
            "global_batch": gb if isinstance(gb, int) else dict(gb),
            "streams": {k: s.state() for k, s in self._streams.items()},
            "sizes": {k: len(s) for k, s in self._streams.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume: the next batches equal those an uninterrupted run would have drawn.

        The world size may change if the global batch(es) do not. A state of another seed, global
        batch (an int one for a per-task sampler or the reverse; for per-task ones the message names
        the task and both), set of streams or stream size (``sizes``: rows changed since the save) is refused.
        """
        saved, now = state["global_batch"], self.global_batch
        if state["seed"] == self.seed and isinstance(saved, Mapping) and isinstance(now, dict):
            for t in sorted(set(saved) | set(now)):
                if saved.get(t) != now.get(t):
                    raise ValueError(
                        f"task {t!r} had global batch {saved.get(t)} when the checkpoint was saved, now {now.get(t)}: "
                        "resume with the batch sizes it was saved with"
                    )
        elif state["seed"] != self.seed or saved != now:  # also an int state for a per-task sampler, or the reverse
            raise ValueError(
                f"sampler state is for seed {state['seed']} / global batch {saved}, "
                f"this sampler has {self.seed} / {now}"
            )
        if set(state["streams"]) != set(self._streams):
            raise ValueError(f"sampler state has streams {sorted(state['streams'])}, expected {sorted(self._streams)}")
        sizes = state.get("sizes") or {}  # older states have none
        for key, stream in sorted(self._streams.items()):
            if key in sizes and int(sizes[key]) != len(stream):
                kind = "task" if key in self.tasks else "stream"
                raise ValueError(
                    f"{kind} {key!r} had {sizes[key]} rows when the checkpoint was saved, now {len(stream)}: "
                    "resume with the data the checkpoint was trained on"
                )
        for key, cursor in state["streams"].items():
            self._streams[key].restore(cursor)
        self.step = int(state["step"])
