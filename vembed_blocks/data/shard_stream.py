"""`ShardReader`: one reader's share of one streamed source, in a seeded, resumable order; the
worker side of a `StreamLoader` (`StreamPlan`, `StreamBatches`); what a checkpoint records of a source.

Every DataLoader worker of every rank is one reader, ``R = world_size * max(1, num_workers)``
per source. Epoch ``e`` permutes the source's units (shards, each cut into ``k = ceil(R /
shards)`` slices by member index modulo ``k`` when there are fewer shards than readers) and
reader ``r`` takes every ``R``-th unit from ``r``: no sample is read twice in an epoch.

Shuffle: the reader cuts its stream into blocks of ``shuffle_buffer`` raw (undecoded)
samples and emits each block in a permuted order keyed by seed, source, reader, epoch and the
block's start. Resume: the state is ``(epoch, block start, position in block, records taken
of that sample, skipped, bad shards)``; restoring seeks to the block start and re-reads one block.

Bad shards: a shard that cannot be opened or breaks off mid-way (``ShardError``, a tar, OS or
pyarrow error) stops the run, or with ``skip_bad_shards=True`` is logged, counted and left at the
samples read before the break; the reader goes on with its next unit. A shard that fails the same
way every time keeps the order a pure function of the seed, so a resume stays exact.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import tarfile
import zlib
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from .images import ImageLoadError, ShardImage, load_image
from .records import Item, Record, RecordError

if TYPE_CHECKING:
    from .sampler import WeightedTaskSampler
    from .shard_formats import DatasetSource, ShardSet

__all__ = [
    "ShardReader",
    "StreamBatches",
    "StreamPlan",
    "decode_image",
    "listing_changes",
    "source_listing",
    "source_key",
]

log = logging.getLogger(__name__)
_LOG_FIRST = 10  # bad samples logged one by one per reader; after that every 1000th
_UNITS, _BLOCK = 0, 1  # what a seed is for: the epoch's unit order, a block's shuffle


def source_key(name: str) -> int:
    """A source name as an int that is the same in every process and run (``hash()`` is salted)."""
    return zlib.crc32(str(name).encode("utf-8"))


def _rng(*keys: int) -> np.random.Generator:
    """A generator seeded by an int tuple; each key as two 32-bit words, so distinct tuples
    never share their seed words (SeedSequence would read ``(1, 2)`` and ``(1, 2, 0)`` alike)."""
    words = [w for k in keys for w in (k & 0xFFFFFFFF, (k >> 32) & 0xFFFFFFFF)]
    return np.random.default_rng([len(keys), *words])


def _shard_errors() -> tuple[type[BaseException], ...]:
    """What an unreadable or corrupt shard raises: ``ShardError`` (an ``OSError``), tarfile's and, once
    pyarrow is loaded (a Parquet source), pyarrow's errors (``ArrowInvalid`` for a truncated file)."""
    errors: tuple[type[BaseException], ...] = (OSError, EOFError, tarfile.TarError)
    pyarrow = sys.modules.get("pyarrow")
    return errors + (pyarrow.ArrowException,) if hasattr(pyarrow, "ArrowException") else errors


def decode_image(image: str) -> ShardImage:
    """``image`` (a path or `ShardImage`) with its decoded upright RGB picture attached.

    Decodes through `load_image` (EXIF, RGB, full decode), so a collator's own ``load_image``
    call later returns the same picture without decoding again. Raises ``ImageLoadError``.
    """
    return ShardImage(str(image), getattr(image, "data", None), load_image(image))


def _decoded(item: Item) -> Item:
    if not item.images:
        return item
    return dataclasses.replace(item, images=tuple(decode_image(p) for p in item.images))


class ShardReader:
    """One reader's share of one source: records in a seeded, resumable order (module docstring).

    ``next_record()`` returns the next ``Record`` or ``None`` after ``epochs`` epochs (never,
    with ``epochs=None``). ``state()`` / ``ShardReader(..., state=...)`` resume exactly.
    ``decode=True`` decodes every image as it is emitted (bad ones skipped and counted); the
    decoded picture rides on the record's ``ShardImage`` so the collator need not decode again.
    ``skip_bad_shards=True`` skips a shard that cannot be read (module docstring; ``bad_shards`` counts them).
    """

    def __init__(
        self,
        source: ShardSet | DatasetSource,
        reader: int,
        readers: int,
        *,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        epochs: int | None = None,
        decode: bool = True,
        name: str = "train",
        state: Mapping[str, Any] | None = None,
        skip_bad_shards: bool = False,
    ) -> None:
        if not 0 <= reader < readers or shuffle_buffer < 1 or (epochs is not None and epochs < 1):
            raise ValueError(
                f"need 0 <= reader < readers, shuffle_buffer >= 1, epochs >= 1; got reader={reader}, "
                f"readers={readers}, shuffle_buffer={shuffle_buffer}, epochs={epochs}"
            )
        self.source, self.reader, self.readers, self.seed = source, reader, readers, int(seed)
        self.buffer, self.epochs, self.decode, self.name = shuffle_buffer, epochs, decode, name
        self.skip_bad_shards = skip_bad_shards
        state = state or {"epoch": 0, "unit": 0, "token": None, "pos": 0, "sub": 0, "skipped": 0}
        self.epoch, self.skipped = int(state["epoch"]), int(state["skipped"])
        # The bad shards of the block that restoring re-reads are counted again by that read.
        self.bad_shards = int(state.get("bad_shards", 0)) - int(state.get("block_bad", 0))
        self._bad_before = self.bad_shards  # the count when the current block's read began
        self._units = self._assign(self.epoch)
        self._cursor: tuple[int, list[int] | None] = (int(state["unit"]), state["token"])
        self._open: tuple[int, Iterator] | None = None  # the unit being read and its sample iterator
        self._block: list[tuple[str, Any]] = []
        self._pos, self._sub, self._pending = 0, 0, None
        self._done = not self._fill()
        self._pos, self._sub = int(state["pos"]), int(state["sub"])

    def _assign(self, epoch: int) -> list[tuple[int, int, int]]:
        """This reader's ``(shard, slice, slices)`` units in epoch ``epoch``."""
        n = len(self.source)
        if n < 1:
            raise ValueError(f"source {self.name!r} has no shards")
        k = -(-self.readers // n)
        order = _rng(self.seed, source_key(self.name), _UNITS, epoch).permutation(n * k)
        return [(int(u) // k, int(u) % k, k) for u in order[self.reader :: self.readers]]

    def _fill(self) -> bool:
        """Read the next block from the cursor (moving to the next epoch at an epoch's end)."""
        self._block, self._pos, self._sub, self._pending = [], 0, 0, None
        while True:
            self._start, self._bad_before = self._cursor, self.bad_shards
            self._read_block()
            if self._block:
                break
            if self.epochs is not None and self.epoch + 1 >= self.epochs:
                return False
            if self._start == (0, None):  # a whole epoch without one sample: endless would spin
                from .shard_formats import ShardError  # here: importing this module loads 3 package modules

                units = [self.source.describe(u[0]) for u in self._units]
                raise ShardError(
                    f"source {self.name!r}, reader {self.reader} of {self.readers}: epoch {self.epoch} has no samples "
                    f"(units {units[:5]}{'...' if len(units) > 5 else ''}); use fewer readers or more shards"
                )
            self.epoch += 1
            self._units, self._cursor = self._assign(self.epoch), (0, None)
        unit, token = self._start
        keys = (
            self.seed,
            source_key(self.name),
            _BLOCK,
            self.reader,
            self.epoch,
            unit,
            len(token or ()),
            *(token or ()),
        )
        self._block = [self._block[i] for i in _rng(*keys).permutation(len(self._block))]
        return True

    def _read_block(self) -> None:
        while len(self._block) < self.buffer and self._cursor[0] < len(self._units):
            u, token = self._cursor
            shard, part, parts = self._units[u]
            if self._open is None or self._open[0] != u:
                self._open = (u, self.source.read(shard, token))
            try:
                for token_after, index, label, raw in self._open[1]:
                    self._cursor = (u, token_after)
                    if index % parts == part:
                        self._block.append((label, raw))
                        if len(self._block) == self.buffer:
                            return
            except _shard_errors() as e:
                if not self.skip_bad_shards:
                    raise
                self._skip_shard(shard, e)
            self._open, self._cursor = None, (u + 1, None)

    def state(self) -> dict[str, Any]:
        """JSON-able: where the current block starts, how far into it this reader is, bad samples and
        shards so far (``block_bad``: those of the bad shards that restoring re-reads, so it counts them once)."""
        if self._pos >= len(self._block):  # block used up: "a fresh block at the cursor" says the same
            unit, token, pos, block_bad = *self._cursor, 0, 0
        else:
            unit, token, pos, block_bad = *self._start, self._pos, self.bad_shards - self._bad_before
        return {
            "epoch": self.epoch,
            "unit": unit,
            "token": token,
            "pos": pos,
            "sub": self._sub,
            "skipped": self.skipped,
            "bad_shards": self.bad_shards,
            "block_bad": block_bad,
        }

    def next_record(self) -> Record | None:
        """The next record of this reader's share; ``None`` once its ``epochs`` are read."""
        while not self._done:
            if self._pending is not None:
                rec = self._pending[self._sub]
                self._sub += 1
                if self._sub >= len(self._pending):
                    self._pending, self._pos, self._sub = None, self._pos + 1, 0
                return rec
            if self._pos >= len(self._block):
                self._done = not self._fill()
                continue
            label, raw = self._block[self._pos]
            try:
                self._pending = self._parse(label, raw)
            except (RecordError, ImageLoadError) as e:
                self._skip(label, e)
                self._pos += 1
        return None

    def _parse(self, label: str, raw: Any) -> list[Record]:
        records = self.source.records(label, raw)
        if not self.decode:
            return records
        return [
            dataclasses.replace(
                r, query=_decoded(r.query), positive=_decoded(r.positive), negatives=[_decoded(n) for n in r.negatives]
            )
            for r in records
        ]

    def _skip(self, label: str, error: Exception) -> None:
        self.skipped += 1
        if self.skipped <= _LOG_FIRST or self.skipped % 1000 == 0:
            log.warning(
                "skipped bad sample %s (%s); %d skipped by reader %d of source %r",
                label,
                error,
                self.skipped,
                self.reader,
                self.name,
            )

    def _skip_shard(self, shard: int, error: BaseException) -> None:
        self.bad_shards += 1
        log.warning(
            "bad shard %s: skipped the rest of it (%s); %d bad shards for reader %d of source %r",
            self.source.describe(shard),
            error,
            self.bad_shards,
            self.reader,
            self.name,
        )


@dataclasses.dataclass
class StreamPlan:
    """Everything a `StreamLoader`'s worker needs to build its micro-batches (pickled into DataLoader workers)."""

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
    skip_bad_shards: bool

    def reader(self, name: str, worker: int, state: Mapping[str, Any] | None) -> ShardReader:
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
            skip_bad_shards=self.skip_bad_shards,
        )

    def collate(self, records: list[Record]) -> Any:
        return records if self.collate_fn is None else self.collate_fn(records)


class StreamBatches(IterableDataset):
    """A `StreamLoader`'s micro-steps ``start .. start + steps - 1`` as a DataLoader dataset (items: dicts
    with ``step``, ``source``, ``batch``, ``worker`` and the readers' ``state``; ``end`` once a reader runs
    out); DataLoader worker ``i`` builds those with
    ``(t - start) % W == i``, i.e. it plays logical worker ``t % W`` (the same for a resumed run)."""

    def __init__(self, plan: StreamPlan, start: int, steps: int, states: list[dict[str, Any]]) -> None:
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


def source_listing(source: ShardSet | DatasetSource) -> dict[str, Any]:
    """What fixes a source's data, in plain types: a `ShardSet`'s ``{"shards": [[name, bytes], ...]}``
    in order (names relative to the shards' common folder, so a moved copy matches; sizes, not content
    hashes: shards can be TBs), a `DatasetSource`'s ``{"rows", "units", "fingerprint"}`` (``rows`` None
    for an ``IterableDataset``; ``fingerprint`` the ``datasets`` one, when it has one)."""
    from .shard_formats import ShardSet  # loaded already: the source is one of its classes

    if isinstance(source, ShardSet):
        root = os.path.commonpath([os.path.dirname(p) for p in source.shards])
        return {"shards": [[os.path.relpath(p, root), os.path.getsize(p)] for p in source.shards]}
    fingerprint = getattr(source.dataset, "_fingerprint", None)
    return {
        "rows": None if source.iterable else len(source.dataset),
        "units": len(source),
        "fingerprint": fingerprint if isinstance(fingerprint, str) else None,
    }


def _few(names: list[str], k: int = 5) -> str:
    return ", ".join(names[:k]) + (f", ... ({len(names)} in all)" if len(names) > k else "")


def listing_changes(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """How the sources' listings (`source_listing` per name) differ, one line per changed source;
    shard sets name the shards added, removed or resized. Empty when the data is the same."""
    if set(saved) != set(now):
        return [f"sources {sorted(saved)} when saved, now {sorted(now)}"]
    out = []
    for name in sorted(now):
        old, new = saved[name], now[name]
        if old == new:
            continue
        if "shards" not in old or "shards" not in new:  # a dataset (or a dataset became shards)
            out.append(f"source {name!r} was {old}, now {new}")
            continue
        was, is_ = {n: int(b) for n, b in old["shards"]}, {n: int(b) for n, b in new["shards"]}
        parts = [
            f"{what} {_few(names)}"
            for what, names in (
                ("added", [n for n in is_ if n not in was]),
                ("removed", [n for n in was if n not in is_]),
                ("changed", [f"{n} ({was[n]} -> {is_[n]} bytes)" for n in is_ if n in was and was[n] != is_[n]]),
            )
            if names
        ]
        out.append(f"source {name!r}: shards " + ("; ".join(parts) if parts else "in another order"))
    return out
