"""The rows of a data file with their line numbers: JSONL, CSV (Excel's BOM, JSON-array cells), Parquet.

``READERS[ext](path)`` yields ``(line, row)`` pairs, ``row`` a dict as the file holds it, or a
`RecordError` naming ``file:line`` for a row that cannot be read (malformed JSON, invalid
UTF-8), so the caller decides whether to raise or skip it. `records.read_records` validates
the rows into ``Record``s. Random access by line: `IndexedRecords` (JSONL byte offsets) and
`load_records`, both also importable from `records`.

Imports: standard library, numpy, `data.records`; pyarrow when a Parquet file is read (the
``parquet`` extra).
"""

from __future__ import annotations

import csv
import json
import os
import re
from typing import Any, Iterator, Sequence

import numpy as np

from .records import Record, RecordError, RecordReader, read_records

__all__ = ["READERS", "IndexedRecords", "load_records", "load_task_dir"]

_SURROGATE = re.compile("[\udc80-\udcff]")  # what errors="surrogateescape" makes of undecodable bytes


def _jsonl_rows(path: str) -> Iterator[tuple[int, Any]]:
    with open(path, "rb") as f:  # bytes: offsets stay exact and bad UTF-8 is reported per line
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                yield lineno, RecordError(f"{path}:{lineno}", f"malformed JSON ({e})")


def _csv_cell(name: str, value: str) -> Any:
    """CSV cells are strings; list-valued fields are written as JSON arrays (``["a.jpg", "b.jpg"]``)."""
    if value == "":
        return None
    if name in ("negatives", "source_image") and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value  # reported by the parser as "not a list" / bad path
    return value


def _csv_rows(path: str) -> Iterator[tuple[int, Any]]:
    # utf-8-sig drops the BOM Excel writes ("CSV UTF-8"); surrogateescape turns bad bytes into
    # lone surrogates so one bad row is reported at its own line and the rest still read.
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.DictReader(f)
        for row in reader:
            n, cells = reader.line_num, {k: v or "" for k, v in row.items() if k is not None}
            bad = next((k for k, v in cells.items() if _SURROGATE.search(k + v)), None)
            if bad is None:
                yield n, {k: _csv_cell(k, v) for k, v in cells.items()}
            else:
                raw = cells[bad].encode("utf-8", "surrogateescape")  # the bytes as they are in the file
                yield n, RecordError(f"{path}:{n}", f"invalid UTF-8 in column {bad!r}: {raw!r}; save the file as UTF-8")


def _parquet_rows(path: str) -> Iterator[tuple[int, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(f"reading {path} needs pyarrow: pip install vembed-blocks[parquet]") from e
    n = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):  # bounded memory
        for row in batch.to_pylist():
            n += 1
            yield n, row


READERS = {".jsonl": _jsonl_rows, ".json": _jsonl_rows, ".csv": _csv_rows, ".parquet": _parquet_rows}


class IndexedRecords(Sequence[Record]):
    """Random access to the records of a JSONL file without holding them in memory.

    Construction validates every row once (same options and ``skip_bad`` as
    ``read_records``) and keeps ~17 bytes per record: the byte offset of each line and which
    record of its line it is. ``records[i]`` seeks and re-parses that line. ``groups`` holds
    ``extra["num_source_images"]`` per record (-1 when absent) for the sampler's grouping.
    """

    def __init__(self, path: str | os.PathLike, skip_bad: bool = False, **options: Any) -> None:
        self.path = os.fspath(path)
        if not self.path.endswith((".jsonl", ".json")):
            raise ValueError(f"{self.path}: IndexedRecords needs JSONL; load CSV/Parquet with list(read_records(...))")
        self.reader = RecordReader(self.path, skip_bad, **options)
        offsets = [0]
        with open(self.path, "rb") as f:
            for line in f:
                offsets.append(offsets[-1] + len(line))
        self._offsets = np.asarray(offsets, dtype=np.int64)
        lines, subs, groups, prev = [], [], [], None
        for rec in self.reader:
            line = int(rec.source.rsplit(":", 1)[1])
            subs.append(subs[-1] + 1 if line == prev else 0)
            lines.append(line)
            groups.append(int(rec.extra.get("num_source_images", -1)))
            prev = line
        self._lines = np.asarray(lines, dtype=np.int64)
        self._subs = np.asarray(subs, dtype=np.int8)
        self.groups = np.asarray(groups, dtype=np.int16)
        self._base = os.path.dirname(os.path.abspath(self.path))

    def __len__(self) -> int:
        return len(self._lines)

    def __getitem__(self, i: int) -> Record:  # type: ignore[override]
        line = int(self._lines[i])
        with open(self.path, "rb") as f:
            f.seek(int(self._offsets[line - 1]))
            raw = json.loads(f.readline())
        return self.reader.parse(raw, f"{self.path}:{line}", self._base)[int(self._subs[i])]


def load_records(path: str | os.PathLike, skip_bad: bool = False, **options: Any) -> "IndexedRecords | list[Record]":
    """Records with random access: `IndexedRecords` for JSONL (offsets only, the file stays on
    disk), a list for CSV/Parquet (no line offsets to seek to). Same options as `read_records`."""
    path = os.fspath(path)
    if path.endswith((".jsonl", ".json")):
        return IndexedRecords(path, skip_bad, **options)
    return list(read_records(path, skip_bad, **options))


def load_task_dir(root: str | os.PathLike, skip_bad: bool = False, **read_options: Any) -> dict[str, Sequence[Any]]:
    """Seed-004 layout: every subdirectory of ``root`` is a task holding its data file(s).

    JSONL files become ``IndexedRecords`` (offsets only, lazy); CSV/Parquet are read into
    lists. A task with several files concatenates them (sorted by name). Records get
    ``task`` = the subdirectory name.
    """
    tasks: dict[str, Sequence[Any]] = {}
    for name in sorted(os.listdir(root)):
        sub = os.path.join(root, name)
        if not os.path.isdir(sub):
            continue
        parts: list[Sequence[Any]] = []
        for fname in sorted(os.listdir(sub)):
            path = os.path.join(sub, fname)
            if fname.endswith((".jsonl", ".json", ".csv", ".parquet")):
                parts.append(load_records(path, skip_bad, task=name, **read_options))
        if not parts:
            raise ValueError(f"task directory {sub} has no .jsonl/.csv/.parquet file")
        tasks[name] = parts[0] if len(parts) == 1 else _Concat(parts)
    if not tasks:
        raise ValueError(f"{root} has no task subdirectories")
    return tasks


class _Concat(Sequence[Any]):
    def __init__(self, parts: list[Sequence[Any]]) -> None:
        self.parts, self.ends = parts, np.cumsum([len(p) for p in parts])

    def __len__(self) -> int:
        return int(self.ends[-1])

    def __getitem__(self, i: int) -> Any:  # type: ignore[override]
        j = int(np.searchsorted(self.ends, i, side="right"))
        return self.parts[j][i - (int(self.ends[j - 1]) if j else 0)]
