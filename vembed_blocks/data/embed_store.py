"""Precomputed embeddings on disk: a resumable shard writer and a lazy, memory-mapped reader.

Layout of one store (= one task directory of seed 004; an offline extraction writes it)::

    root/
      meta.json                          how it was made (model, options, world size, shard size)
      index-00000.jsonl                  rank 0's records, one JSON line each:
                                         {"id", "n", "shard", "row", "rows", "num_source_images", "inverse", "source"}
      index-00001.jsonl                  rank 1's ...
      shard-00000-000000.safetensors     rank 0's first shard: one tensor per side, rows in index order
      shard-00000-000001.safetensors ...

A shard holds a fixed number of records (the last one of a rank may hold fewer). Per side
(``query``, ``positive``): pooled embeddings are one ``[rows, D]`` tensor; per-token
embeddings are ragged: ``<side>`` ``[tokens, D]`` plus ``<side>.offsets`` ``[rows + 1]``
(record ``i`` is ``<side>[offsets[i]:offsets[i+1]]``). The shard's metadata repeats its ids.

Crash safety (why a rerun never loses or duplicates a row): a shard is written under a
temporary name and renamed into place; only then are its index lines appended (flushed and
fsynced). An index therefore never names a shard that is not complete. A crash between the
rename and the append leaves an unindexed shard, which the rerun recomputes and replaces; a
crash mid-append leaves a short or truncated tail, which `EmbedWriter` drops on start.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter, OrderedDict
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

__all__ = ["EmbedStore", "EmbedWriter", "StoreError", "collate_embeddings", "ensure_meta", "shard_name", "index_name"]

log = logging.getLogger(__name__)

META = "meta.json"
_OFFSETS = ".offsets"
_INDEX_RE = re.compile(r"^index-(\d{5})\.jsonl$")


def shard_name(rank: int, shard: int) -> str:
    return f"shard-{rank:05d}-{shard:06d}.safetensors"


def index_name(rank: int) -> str:
    return f"index-{rank:05d}.jsonl"


class StoreError(ValueError):
    """A store that is incomplete or inconsistent; the message names the file and what to do."""


_KEYS = {"id", "shard", "row", "rows"}


def _read_index(path: str) -> tuple[list[dict], list[str]]:
    """Parsed lines of an index file (each with its byte ``_offset``), and a description of
    each line that could not be parsed."""
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    offsets = np.cumsum([0] + [len(line) + 1 for line in lines[:-1]]).tolist()
    keep = [k for k, line in enumerate(lines) if line.strip()]
    try:  # fast path: the whole file as one JSON array (one decoder call instead of one per line)
        rows = json.loads(b"[" + b",".join(lines[k] for k in keep) + b"]")
        if all(isinstance(r, dict) and _KEYS <= r.keys() for r in rows):
            for r, k in zip(rows, keep):
                r["_offset"] = offsets[k]
            return rows, []
    except ValueError:
        pass
    rows, bad = [], []
    for k in keep:  # slow path: find and describe the bad lines
        try:
            row = json.loads(lines[k])
            if not isinstance(row, dict) or not _KEYS <= row.keys():
                raise ValueError("missing keys")
        except ValueError as e:
            tail = k == len(lines) - 1  # the last line has no newline: an interrupted append
            bad.append(f"{path}:{k + 1}: {'truncated line' if tail else 'bad line'} ({e})")
            continue
        row["_offset"] = offsets[k]
        rows.append(row)
    return rows, bad


def _complete_shards(root: str, rows: list[dict]) -> tuple[list[dict], set[str]]:
    """Keep the rows of shards whose every line is present and whose file exists."""
    count: dict[str, int] = {}
    declared: dict[str, set[int]] = {}
    for r in rows:
        count[r["shard"]] = count.get(r["shard"], 0) + 1
        declared.setdefault(r["shard"], set()).add(r["rows"])
    ok = {s for s, n in count.items() if declared[s] == {n} and os.path.isfile(os.path.join(root, s))}
    return [r for r in rows if r["shard"] in ok], set(count) - ok


# ----------------------------------------------------------------------------- writing


class EmbedWriter:
    """Write one rank's shards and index lines; resumable (see the module docstring).

    ``EmbedWriter(root, rank)`` reads ``index-<rank>.jsonl``, drops the lines of any shard that
    is not completely indexed (rewriting the index atomically) and removes stale temp files.
    Then ``is_done(k)`` says whether shard ``k`` needs no work and ``write(k, rows, embeddings)``
    stores it.
    """

    def __init__(self, root: str | os.PathLike, rank: int = 0) -> None:
        self.root, self.rank = os.fspath(root), rank
        os.makedirs(self.root, exist_ok=True)
        self.index_path = os.path.join(self.root, index_name(rank))
        prefix = f".shard-{rank:05d}-"
        for name in os.listdir(self.root):
            if name.startswith(prefix) and name.endswith(".tmp"):  # a shard that was being written at a crash
                os.remove(os.path.join(self.root, name))
        self.done: dict[str, int] = {}
        if os.path.exists(self.index_path):
            self._repair()

    def _repair(self) -> None:
        rows, bad = _read_index(self.index_path)
        kept, dropped = _complete_shards(self.root, rows)
        if bad or dropped:
            log.warning(
                "%s: dropping %d unreadable line(s) and incomplete shard(s) %s; they are recomputed",
                self.index_path,
                len(bad),
                sorted(dropped),
            )
            tmp = self.index_path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(json.dumps({k: v for k, v in r.items() if k != "_offset"}) + "\n" for r in kept)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.index_path)
        for r in kept:
            self.done[r["shard"]] = r["rows"]

    def is_done(self, shard: int) -> bool:
        return shard_name(self.rank, shard) in self.done

    @property
    def records_done(self) -> int:
        return sum(self.done.values())

    def write(
        self, shard: int, rows: Sequence[Mapping[str, Any]], embeddings: Mapping[str, Sequence[torch.Tensor]]
    ) -> str:
        """Store shard ``shard``: ``rows[i]`` (a dict with at least ``"id"``) and ``embeddings[side][i]``.

        Each embedding is ``[D]`` (pooled; the side becomes ``[rows, D]``) or ``[L_i, D]``
        (per token; stored ragged with offsets). Returns the shard's file name.
        """
        name = shard_name(self.rank, shard)
        if name in self.done:
            raise ValueError(
                f"{self.root}/{name} is already written and indexed; skip it (is_done) to avoid duplicate rows"
            )
        n = len(rows)
        tensors: dict[str, torch.Tensor] = {}
        for side, values in embeddings.items():
            if len(values) != n:
                raise ValueError(f"{name}: {len(values)} {side!r} embeddings for {n} rows")
            values = [v.detach().cpu().contiguous() for v in values]
            if values[0].dim() == 1:
                tensors[side] = torch.stack(values)
            else:
                tensors[side] = torch.cat(values)
                tensors[side + _OFFSETS] = torch.tensor(np.cumsum([0] + [len(v) for v in values]), dtype=torch.int64)
        ids = [str(r["id"]) for r in rows]
        tmp = os.path.join(self.root, f".{name}.tmp")
        save_file(tensors, tmp, metadata={"ids": json.dumps(ids)})
        os.replace(tmp, os.path.join(self.root, name))  # the shard is complete before anything names it
        lines = "".join(
            json.dumps({**r, "id": i, "shard": name, "row": j, "rows": n}) + "\n"
            for j, (i, r) in enumerate(zip(ids, rows))
        )
        with open(self.index_path, "a") as f:
            f.write(lines)
            f.flush()
            os.fsync(f.fileno())
        self.done[name] = n
        return name


def ensure_meta(root: str | os.PathLike, meta: Mapping[str, Any]) -> None:
    """Write ``meta.json``, or check that the existing one matches ``meta`` (a rerun must not mix settings)."""
    path = os.path.join(os.fspath(root), META)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        diff = {k: (old.get(k), v) for k, v in json.loads(json.dumps(meta)).items() if old.get(k) != v}
        if diff:
            raise StoreError(
                f"{path} was written with other settings {diff} (old, new): "
                "use another output directory or delete this one"
            )
        return
    os.makedirs(os.fspath(root), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------- reading


class EmbedStore(Sequence[dict[str, torch.Tensor]]):
    """Lazy random access to a store written by `EmbedWriter` (any number of ranks).

    Records are ordered by their ordinal ``n`` in the source file (so a store made by one
    process and by eight compare equal position by position). ``store[i]`` and
    ``store.get(id)`` return ``{side: Tensor}``: ``[D]`` pooled or ``[L, D]`` per token, read
    through memory-mapped safetensors (only the requested rows are touched). Works as a task's
    records sequence for `TaskBatches` (it pickles without its open files).

    Attributes: ``ids`` (list of str), ``groups`` (``int16[N]``: ``num_source_images`` per
    record, ``-1`` when the format has none), ``sides`` (tensor names), ``meta`` (``meta.json``).

    Construction checks every index line and every shard header. With ``strict=True``
    (default) an unreadable index line, a missing/truncated/corrupt shard, a shard whose ids
    disagree with its index, or a duplicate id raise `StoreError` naming the file; with
    ``strict=False`` the affected shards are skipped with a warning.
    """

    def __init__(self, root: str | os.PathLike, strict: bool = True, max_open: int = 64) -> None:
        self.root, self.strict, self.max_open = os.fspath(root), strict, max_open
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"embedding store {self.root} does not exist")
        self.meta: dict[str, Any] = {}
        if os.path.exists(os.path.join(self.root, META)):
            with open(os.path.join(self.root, META)) as f:
                self.meta = json.load(f)
        self._index_files = sorted(n for n in os.listdir(self.root) if _INDEX_RE.match(n))
        rows = self._load_index()
        rows.sort(key=lambda r: (r.get("n", 0), r["shard"], r["row"]))
        # Per-record state is kept in numpy arrays (a few dozen bytes a record, one buffer each when
        # pickled into DataLoader workers); index lines are re-read on demand by `info`.
        self._ids = np.asarray([str(r["id"]) for r in rows], dtype=str)
        if len(np.unique(self._ids)) != len(self._ids):
            dup = sorted(k for k, c in Counter(self._ids.tolist()).items() if c > 1)[:5]
            raise StoreError(f"{self.root}: duplicate record ids {dup} (two extractions into one directory?)")
        self._pos: dict[str, int] | None = None  # id -> position, built on the first lookup by id
        self._where = np.asarray([(r["_file"], r["_offset"]) for r in rows], dtype=np.int64).reshape(-1, 2)
        self._shards = sorted({r["shard"] for r in rows})
        shard_no = {s: k for k, s in enumerate(self._shards)}
        self._shard = np.asarray([shard_no[r["shard"]] for r in rows], dtype=np.int32)
        self._row = np.asarray([r["row"] for r in rows], dtype=np.int32)
        self.groups = np.asarray([r.get("num_source_images", -1) for r in rows], dtype=np.int16)
        self._handles: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self.sides: tuple[str, ...] = tuple(sorted(self._handle(0))) if self._shards else ()

    def _fail(self, message: str) -> None:
        if self.strict:
            raise StoreError(
                f"{message}; rerun the extraction with the same arguments to repair, "
                "or open with EmbedStore(..., strict=False) to skip it"
            )
        log.warning("%s: skipped", message)

    def _load_index(self) -> list[dict]:
        names = self._index_files
        if not names:
            raise StoreError(f"{self.root}: no index-*.jsonl files (not an embedding store, or nothing extracted yet)")
        out: list[dict] = []
        for file_no, name in enumerate(names):
            rows, bad = _read_index(os.path.join(self.root, name))
            for r in rows:
                r["_file"] = file_no
            for msg in bad:
                self._fail(msg)
            kept, dropped = _complete_shards(self.root, rows)
            for shard in sorted(dropped):
                self._fail(f"{self.root}/{name}: shard {shard} is missing or incompletely indexed")
            by_shard: dict[str, list[dict]] = {}
            for r in kept:
                by_shard.setdefault(r["shard"], []).append(r)
            for shard, shard_rows in by_shard.items():
                if self._check_shard(shard, shard_rows):
                    out.extend(shard_rows)
        return out

    def _check_shard(self, shard: str, rows: list[dict]) -> bool:
        path = os.path.join(self.root, shard)
        try:
            with safe_open(path, "pt") as f:
                ids = json.loads((f.metadata() or {}).get("ids", "null"))
                lengths = {k: f.get_slice(k).get_shape()[0] for k in f.keys() if not k.endswith(_OFFSETS)}
                lengths.update(
                    {k[: -len(_OFFSETS)]: f.get_slice(k).get_shape()[0] - 1 for k in f.keys() if k.endswith(_OFFSETS)}
                )
        except Exception as e:  # safetensors raises its own error type for truncated/corrupt files
            self._fail(f"{path}: unreadable shard ({type(e).__name__}: {e})")
            return False
        by_row = [r["id"] for r in sorted(rows, key=lambda r: r["row"])]
        if ids != by_row or any(n != len(rows) for n in lengths.values()):
            self._fail(f"{path}: shard content does not match its index lines (ids or row counts differ)")
            return False
        return True

    # -- access

    @property
    def ids(self) -> list[str]:
        """Record ids in store order (``"<line>.<k>"`` for stores of a records file)."""
        return self._ids.tolist()

    def __len__(self) -> int:
        return len(self._ids)

    def _handle(self, shard: int) -> dict[str, Any]:
        """Open slices of one shard, ``{side: (slice, offsets or None)}``; an LRU bounds open files."""
        h = self._handles.get(shard)
        if h is None:
            f = safe_open(os.path.join(self.root, self._shards[shard]), "pt")
            keys = f.keys()
            h = {
                k: (f.get_slice(k), f.get_tensor(k + _OFFSETS) if k + _OFFSETS in keys else None)
                for k in keys
                if not k.endswith(_OFFSETS)
            }
            self._handles[shard] = h
            if len(self._handles) > self.max_open:
                self._handles.popitem(last=False)
        else:
            self._handles.move_to_end(shard)
        return h

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:  # type: ignore[override]
        if not -len(self) <= i < len(self):
            raise IndexError(f"record {i} out of range for {self.root} ({len(self)} records)")
        row = int(self._row[i])
        out: dict[str, torch.Tensor] = {}
        for key, (sl, off) in self._handle(int(self._shard[i])).items():
            if off is None:
                out[key] = sl[row : row + 1][0]  # reads one row of the memory map
            else:
                out[key] = sl[int(off[row]) : int(off[row + 1])]
        return out

    def position(self, record_id: str) -> int:
        """Index of ``record_id`` in this store; ``KeyError`` naming the id and the store if absent."""
        if self._pos is None:
            self._pos = {i: k for k, i in enumerate(self._ids.tolist())}
        try:
            return self._pos[str(record_id)]
        except KeyError:
            raise KeyError(
                f"record id {record_id!r} is not in embedding store {self.root} ({len(self)} records)"
            ) from None

    def get(self, record_id: str) -> dict[str, torch.Tensor]:
        """``{side: Tensor}`` of one record by id (see `position` for the error)."""
        return self[self.position(record_id)]

    def info(self, i: int) -> dict[str, Any]:
        """The index line of record ``i`` (``id``, ``source`` file:line, ``inverse``, ...)."""
        file_no, offset = (int(x) for x in self._where[i])
        with open(os.path.join(self.root, self._index_files[file_no]), "rb") as f:
            f.seek(offset)
            return json.loads(f.readline())

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return (self[i] for i in range(len(self)))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handles": OrderedDict(), "_pos": None}  # open files do not pickle

    def __repr__(self) -> str:
        return f"EmbedStore({self.root!r}, {len(self)} records, {len(self._shards)} shards)"


def collate_embeddings(items: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack store items into a batch: ``[B, D]`` per pooled side; per-token sides are right-padded
    to ``[B, L, D]`` with a ``<side>_mask`` ``BoolTensor[B, L]`` (True = real token)."""
    if not items:
        raise ValueError("cannot collate an empty batch")
    out: dict[str, torch.Tensor] = {}
    for key in items[0]:
        values = [it[key] for it in items]
        if values[0].dim() <= 1:
            out[key] = torch.stack(values)
            continue
        longest = max(len(v) for v in values)
        out[key] = values[0].new_zeros(len(values), longest, *values[0].shape[1:])
        out[key + "_mask"] = torch.zeros(len(values), longest, dtype=torch.bool)
        for b, v in enumerate(values):
            out[key][b, : len(v)] = v
            out[key + "_mask"][b, : len(v)] = True
    return out
