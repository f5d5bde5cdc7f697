"""`ShardReader`: one reader's share of one streamed source, in a seeded, resumable order.

Every DataLoader worker of every rank is one reader, ``R = world_size * max(1, num_workers)``
per source. Epoch ``e`` permutes the source's units (shards, each cut into ``k = ceil(R /
shards)`` slices by member index modulo ``k`` when there are fewer shards than readers) and
reader ``r`` takes every ``R``-th unit from ``r``: no sample is read twice in an epoch.

Shuffle: the reader cuts its stream into blocks of ``shuffle_buffer`` raw (undecoded)
samples and emits each block in a permuted order keyed by seed, source, reader, epoch and the
block's start. Resume: the state is ``(epoch, block start, position in block, records taken
of that sample, skipped)``; restoring seeks to the block start and re-reads one block.
"""

from __future__ import annotations

import dataclasses
import logging
import zlib
from typing import Any, Iterator, Mapping

import numpy as np

from .images import ImageLoadError, ShardImage, load_image
from .records import Item, Record, RecordError
from .shard_formats import DatasetSource, ShardError, ShardSet

__all__ = ["ShardReader", "decode_image", "source_key"]

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
    ) -> None:
        if not 0 <= reader < readers or shuffle_buffer < 1 or (epochs is not None and epochs < 1):
            raise ValueError(
                f"need 0 <= reader < readers, shuffle_buffer >= 1, epochs >= 1; got reader={reader}, "
                f"readers={readers}, shuffle_buffer={shuffle_buffer}, epochs={epochs}"
            )
        self.source, self.reader, self.readers, self.seed = source, reader, readers, int(seed)
        self.buffer, self.epochs, self.decode, self.name = shuffle_buffer, epochs, decode, name
        state = state or {"epoch": 0, "unit": 0, "token": None, "pos": 0, "sub": 0, "skipped": 0}
        self.epoch, self.skipped = int(state["epoch"]), int(state["skipped"])
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
            self._start = self._cursor
            self._read_block()
            if self._block:
                break
            if self.epochs is not None and self.epoch + 1 >= self.epochs:
                return False
            if self._start == (0, None):  # a whole epoch without one sample: endless would spin
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
            for token_after, index, label, raw in self._open[1]:
                self._cursor = (u, token_after)
                if index % parts == part:
                    self._block.append((label, raw))
                    if len(self._block) == self.buffer:
                        return
            self._open, self._cursor = None, (u + 1, None)

    def state(self) -> dict[str, Any]:
        """JSON-able: where the current block starts, how far into it this reader is, bad samples so far."""
        if self._pos >= len(self._block):  # block used up: "a fresh block at the cursor" says the same
            unit, token, pos = *self._cursor, 0
        else:
            unit, token, pos = *self._start, self._pos
        return {
            "epoch": self.epoch,
            "unit": unit,
            "token": token,
            "pos": pos,
            "sub": self._sub,
            "skipped": self.skipped,
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
