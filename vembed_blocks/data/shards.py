"""Stream sharded data sets (tar / Parquet / JSONL shards, ``datasets`` objects) into training steps.

``open_stream(spec, batch_size, collate_fn)`` returns a `StreamLoader`, a drop-in for
`TaskLoader` (``steps(end)``, ``step``, ``state_dict``, ``load_state_dict``)::

    loader = open_stream("shards/{00000..01023}.tar", 64, collator, num_workers=4)
    start = load_checkpoint(ckpt, model=..., optimizer=..., sampler=loader)
    for step, batches, sources in loader.steps(end):
        ...

Everything is a pure function of ``seed``:

- Split and shuffle: each DataLoader worker of each rank is one `ShardReader` per source
  (data/shard_stream.py: disjoint shares of the shards, a bounded block shuffle).
- Mixing: the source of micro-step ``t`` is ``WeightedTaskSampler.draw(t)`` over the source
  weights: the same on every rank; step ``t`` is built by worker ``t % W`` from its own readers.
- Resume: the loader's state is the micro-step plus each worker's reader states: O(workers x
  sources), never O(data).
- ``epochs=n`` on several ranks: ranks agree on the last step with one tiny all-reduce per
  step, so no rank runs a step (and its collectives) that another rank skips.

Bad samples (undecodable image, missing caption, malformed JSON) are skipped, counted
(``loader.skipped``) and logged with their ``shard:member``; a shard that cannot be opened
raises ``ShardError`` naming it. See docs/streaming.md.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import re
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .shard_formats import SHARD_KINDS, DatasetSource, ShardSet

if TYPE_CHECKING:
    from .records import Record
    from .sampler import WeightedTaskSampler
    from .shard_stream import ShardReader

__all__ = ["StreamLoader", "open_stream", "is_stream_spec", "expand_shards"]

log = logging.getLogger(__name__)
_BRACES = re.compile(r"\{[^{}]*(\.\.|,)[^{}]*\}")


def _is_dataset(obj: Any) -> bool:
    return type(obj).__module__.startswith("datasets.")


def is_stream_spec(spec: Any) -> bool:
    """Whether ``spec`` names sharded data for `open_stream` rather than one file for ``load_records``.

    True for: a brace pattern (``data/{00000..01023}.tar``, ``{a,b}.parquet``), a glob
    (``data/*.tar``), a ``.tar`` file, a directory holding ``.tar`` / ``.parquet`` / ``.jsonl``
    files directly, a ``datasets`` object, or a mapping of such (several weighted sources).
    """
    if isinstance(spec, Mapping):
        return bool(spec) and all(is_stream_spec(v) for v in spec.values())
    if _is_dataset(spec) or isinstance(spec, (ShardSet, DatasetSource)):
        return True
    if not isinstance(spec, (str, os.PathLike)):
        return False
    path = os.fspath(spec)
    if _BRACES.search(path) or glob.has_magic(path) or path.lower().endswith(".tar"):
        return True
    return os.path.isdir(path) and any(os.path.splitext(f)[1].lower() in SHARD_KINDS for f in os.listdir(path))


def expand_shards(spec: str | os.PathLike) -> list[str]:
    """The shard paths a spec names: brace patterns expanded (in order), globs and directories
    sorted. Raises ``FileNotFoundError`` naming a shard that does not exist or a pattern that
    matches nothing."""
    path = os.fspath(spec)
    if os.path.isdir(path):
        found = sorted(os.path.join(path, f) for f in os.listdir(path) if os.path.splitext(f)[1].lower() in SHARD_KINDS)
        if not found:
            raise FileNotFoundError(f"{path}: no {sorted(SHARD_KINDS)} shards in this directory")
        return found
    patterns = [path]
    if _BRACES.search(path):
        try:
            from braceexpand import braceexpand
        except ImportError as e:
            raise ImportError(
                f'brace patterns ({path}) need braceexpand: pip install "vembed-blocks[streaming]"'
            ) from e
        patterns = list(braceexpand(path))
    out: list[str] = []
    for p in patterns:
        matches = sorted(glob.glob(p)) if glob.has_magic(p) else [p]
        if not matches:
            raise FileNotFoundError(f"{p}: the pattern matches no shard")
        missing = next((m for m in matches if not os.path.isfile(m)), None)
        if missing is not None:
            raise FileNotFoundError(f"shard not found: {missing} (from {path})")
        out += matches
    return out


def _as_source(spec: Any, name: str, options: Mapping[str, Any]) -> ShardSet | DatasetSource:
    if isinstance(spec, (ShardSet, DatasetSource)):
        return spec
    if _is_dataset(spec):
        return DatasetSource(spec, name=name, **options)
    return ShardSet(expand_shards(spec), **options)


@dataclasses.dataclass
class _Plan:
    """Everything a worker needs to build its micro-batches (pickled into DataLoader workers)."""

    sources: dict[str, Any]
    draw: WeightedTaskSampler
    batch_size: int
    collate_fn: Callable[[list[Record]], Any] | None
    rank: int
    world_size: int
    workers: int
    seed: int
    shuffle_buffer: int
    epochs: int | None
    decode: bool

    def reader(self, name: str, worker: int, state: Mapping[str, Any] | None) -> ShardReader:
        # Imported where readers are made (the DataLoader worker): `import shards` stays light.
        from .shard_stream import ShardReader

        return ShardReader(
            self.sources[name],
            self.rank * self.workers + worker,
            self.world_size * self.workers,
            seed=self.seed,
            shuffle_buffer=self.shuffle_buffer,
            epochs=self.epochs,
            decode=self.decode,
            name=name,
            state=state,
        )

    def collate(self, records: list[Record]) -> Any:
        return records if self.collate_fn is None else self.collate_fn(records)


class _StreamBatches(IterableDataset):
    """Micro-steps ``start .. start + steps - 1``; DataLoader worker ``i`` builds those with
    ``(t - start) % W == i``, i.e. it plays logical worker ``t % W`` (the same for a resumed run)."""

    def __init__(self, plan: _Plan, start: int, steps: int, states: list[dict[str, Any]]) -> None:
        self.plan, self.start, self.steps, self.states = plan, start, steps, states

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        first = self.start + (info.id if info is not None else 0)
        plan, worker = self.plan, first % self.plan.workers
        readers: dict[str, ShardReader] = {}
        for t in range(first, self.start + self.steps, plan.workers):
            name = plan.draw.draw(t)[0]
            if name not in readers:
                readers[name] = plan.reader(name, worker, self.states[worker].get(name))
            records = []
            while len(records) < plan.batch_size:
                rec = readers[name].next_record()
                if rec is None:
                    yield {"end": True, "step": t, "source": name}
                    return
                records.append(rec)
            state = {**self.states[worker], **{n: r.state() for n, r in readers.items()}}
            yield {"step": t, "source": name, "batch": plan.collate(records), "worker": worker, "state": state}


class StreamLoader:
    """`TaskLoader`'s interface over streamed sources: ``steps(end)`` yields ``(step, micro_batches,
    their_sources)`` for optimizer steps ``self.step + 1 .. end``, ``grad_accum_steps`` micro-batches
    of ``batch_size`` records (per rank) each, collated by ``collate_fn`` (records without one).

    ``sources``: name -> `ShardSet` / `DatasetSource`. ``weights``: name -> weight (or
    ``"a=0.7,b=0.3"``); ``None`` weighs them equally. ``epochs=None`` streams forever (the
    run's length is ``end``); with ``epochs=n`` ``steps`` ends before the first optimizer step
    that some reader (on any rank: they agree through one all-reduce per step, which needs the
    process group) cannot fill. ``state_dict()`` is the state after the last step
    yielded (JSON-able); resuming needs the same world size, ``num_workers`` and batch size.
    """

    def __init__(
        self,
        sources: Mapping[str, ShardSet | DatasetSource],
        batch_size: int,
        collate_fn: Callable[[list[Record]], Any] | None = None,
        *,
        weights: Mapping[str, float] | str | None = None,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        num_workers: int = 0,
        grad_accum_steps: int = 1,
        shuffle_buffer: int = 1000,
        epochs: int | None = None,
        decode_images: bool = True,
    ) -> None:
        if rank is None or world_size is None:
            from ..distributed import get_rank, get_world_size

            rank = get_rank() if rank is None else rank
            world_size = get_world_size() if world_size is None else world_size
        if batch_size < 1 or grad_accum_steps < 1 or num_workers < 0 or not 0 <= rank < world_size:
            raise ValueError(
                "need batch_size >= 1, grad_accum_steps >= 1, num_workers >= 0, 0 <= rank < world_size; got "
                f"{batch_size}, {grad_accum_steps}, {num_workers}, rank={rank}, world_size={world_size}"
            )
        from .sampler import WeightedTaskSampler, parse_weights

        if isinstance(weights, str):
            weights = parse_weights(weights)
        draw = WeightedTaskSampler({n: 1 for n in sources}, 1, weights, seed, rank=0, world_size=1)
        self.sources = {n: sources[n] for n in draw.tasks}
        workers = max(1, num_workers)
        self.plan = _Plan(
            self.sources,
            draw,
            batch_size,
            collate_fn,
            rank,
            world_size,
            workers,
            int(seed),
            shuffle_buffer,
            epochs,
            decode_images,
        )
        self.num_workers, self.seed, self.accum = num_workers, int(seed), grad_accum_steps
        self._state: dict[str, Any] = {
            "kind": "stream",
            "step": 0,
            "seed": self.seed,
            "world_size": world_size,
            "workers": workers,
            "batch_size": batch_size,
            "readers": [{} for _ in range(workers)],
        }

    @property
    def step(self) -> int:
        """Optimizer steps done: the next is ``self.step + 1``."""
        return int(self._state["step"]) // self.accum

    @property
    def skipped(self) -> dict[str, int]:
        """Bad samples skipped so far on this rank, per source (as of the last step yielded)."""
        return {n: sum(int(w[n]["skipped"]) for w in self._state["readers"] if n in w) for n in self.sources}

    def state_dict(self) -> dict[str, Any]:
        return self._state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key in ("kind", "seed", "world_size", "workers", "batch_size"):
            if state.get(key) != self._state[key]:
                raise ValueError(
                    f"stream state has {key}={state.get(key)!r} but this loader has {self._state[key]!r}; "
                    "resume with the same seed, world size, num_workers and batch size"
                )
        unknown = sorted({n for w in state["readers"] for n in w} - set(self.sources))
        if unknown:
            raise ValueError(f"stream state has readers of sources {unknown}; this loader has {sorted(self.sources)}")
        self._state = {**state, "readers": [dict(w) for w in state["readers"]]}

    def steps(self, end: int) -> Iterator[tuple[int, list[Any], list[str]]]:
        """``(step, micro_batches, their_sources)`` for optimizer steps ``self.step + 1 .. end`` (1-based).

        ``micro_batches``: ``grad_accum_steps`` collated batches of ``batch_size`` records each;
        ``their_sources``: the source name of each micro-batch (the same on every rank).
        """
        start = int(self._state["step"])
        if start % self.accum:
            raise ValueError(f"stream state at micro-step {start} is not a multiple of {self.accum}")
        agree = self.plan.epochs is not None and self.plan.world_size > 1
        if agree:
            _check_process_group(self.plan.world_size, self.plan.epochs)
        data = _StreamBatches(self.plan, start, max(0, end - self.step) * self.accum, self._state["readers"])
        generator = torch.Generator().manual_seed(self.seed)  # never draws from the global RNG
        loader = DataLoader(data, batch_size=None, num_workers=self.num_workers, generator=generator)
        batches, names = [], []
        readers = [dict(w) for w in self._state["readers"]]
        for item in loader:
            if item.get("end"):
                log.warning(
                    "source %r ran out at micro-step %d (epochs=%s)", item["source"], item["step"], self.plan.epochs
                )
                if agree:
                    _every_rank_has(False)  # the others are waiting on this step's vote
                return
            readers[item["worker"]] = item["state"]
            batches.append(item["batch"])
            names.append(item["source"])
            if len(batches) == self.accum:
                if agree and not _every_rank_has(True):
                    log.warning("another rank's data ran out at step %d (epochs=%s)", self.step + 1, self.plan.epochs)
                    return
                self._state = {**self._state, "step": item["step"] + 1, "readers": [dict(w) for w in readers]}
                yield (item["step"] + 1) // self.accum, batches, names
                batches, names = [], []


def _check_process_group(world_size: int, epochs: int) -> None:
    from ..distributed import get_world_size, is_dist

    if not is_dist() or get_world_size() != world_size:
        raise ValueError(
            f"epochs={epochs} with world_size={world_size} needs the process group of those ranks (they agree "
            "on the last step with one all-reduce per step, since their shares can run out at different "
            "steps); initialise it before steps(), or stream endlessly with epochs=None"
        )


def _every_rank_has(ok: bool) -> bool:
    """Whether ``ok`` holds on every rank: one all-reduce of one int, on the backend's device."""
    import torch.distributed as dist

    from ..distributed import any_rank

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    return not any_rank([not ok], device)[0]


def open_stream(
    spec: Any,
    batch_size: int,
    collate_fn: Callable[[list[Record]], Any] | None = None,
    *,
    weights: Mapping[str, float] | str | None = None,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    num_workers: int = 0,
    grad_accum_steps: int = 1,
    shuffle_buffer: int = 1000,
    epochs: int | None = None,
    decode_images: bool = True,
    **record_options: Any,
) -> StreamLoader:
    """A `StreamLoader` over ``spec``: a shard spec (see `is_stream_spec`), a ``datasets`` object,
    a `ShardSet` / `DatasetSource`, or a mapping name -> any of those (mixed by ``weights``).

    ``record_options`` go to every source: ``columns``, ``format``, ``task``, ``t2i_mode``,
    ``inverse``, ``language`` (as ``read_records``) and, for ``datasets`` objects, ``image_root``.
    Nothing is read here: the first shard is opened by the first ``steps`` call.
    """
    specs = dict(spec) if isinstance(spec, Mapping) else {"train": spec}
    sources = {name: _as_source(s, name, record_options) for name, s in specs.items()}
    return StreamLoader(
        sources,
        batch_size,
        collate_fn,
        weights=weights,
        seed=seed,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        grad_accum_steps=grad_accum_steps,
        shuffle_buffer=shuffle_buffer,
        epochs=epochs,
        decode_images=decode_images,
    )
