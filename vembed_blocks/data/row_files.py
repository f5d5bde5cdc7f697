"""The rows of a data file with their line numbers: JSONL, CSV (Excel's BOM and ``;``, JSON-array cells), Parquet.

``file_rows(path, delimiter)`` (``READERS[ext](path)`` by the extension) yields ``(line, row)`` pairs,
``row`` a dict as the file holds it, or a `RecordError` naming ``file:line`` for a row that cannot be read
(malformed JSON, invalid UTF-8), so the caller decides whether to raise or skip it. `records.read_records`
validates the rows into ``Record``s. A CSV is read with ``delimiter``; with None, with a comma, unless the
header is one column holding ``;``, a tab or ``|``: then with the delimiter sniffed from it, logged (Excel
writes ``;`` where the decimal mark is a comma). Random access by line: `IndexedRecords` (JSONL byte
offsets) and `load_records`, both also importable from `records`; `read_file` is a training file's records and reader
(the bad-row fraction checked).

Imports: standard library, numpy, `data.records`; `data.columns` when a CSV is read; pyarrow when a
Parquet file is read (the ``parquet`` extra).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from ..user_errors import UserError
from .records import Record, RecordError, RecordReader, read_records

__all__ = ["READERS", "IndexedRecords", "file_rows", "load_records", "load_task_dir", "read_file"]

log = logging.getLogger(__name__)

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


def _csv_delimiter(path: str, header: str) -> str:
    """A comma, or the delimiter the header line shows when a comma would leave it one column (logged)."""
    from .columns import sniff_delimiter

    found = sniff_delimiter(header)
    if found is None or found == ",":
        return ","
    log.info("%s: columns separated by %r", path, found)
    return found


def _csv_rows(
    path: str, delimiter: str | None = None, rename: Mapping[str, str] | None = None
) -> Iterator[tuple[int, Any]]:
    """``(line, row)`` of a CSV; ``rename`` (column -> field) says which columns hold the list fields."""
    # utf-8-sig drops the BOM Excel writes ("CSV UTF-8"); surrogateescape turns bad bytes into
    # lone surrogates so one bad row is reported at its own line and the rest still read.
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        if delimiter is None:
            delimiter = _csv_delimiter(path, f.readline())
            f.seek(0)  # the decoder is reset too: the BOM is dropped again
        reader = csv.DictReader(f, delimiter=delimiter)
        for row in reader:
            n, cells = reader.line_num, {k: v or "" for k, v in row.items() if k is not None}
            bad = next((k for k, v in cells.items() if _SURROGATE.search(k + v)), None)
            if bad is None:
                yield n, {k: _csv_cell(rename.get(k, k) if rename else k, v) for k, v in cells.items()}
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


def file_rows(
    path: str, delimiter: str | None = None, rename: Mapping[str, str] | None = None
) -> Iterator[tuple[int, Any]]:
    """``(line, row)`` pairs of ``path`` by its extension. CSV only: ``delimiter`` (see the module docstring)
    and ``rename`` (the file's column -> canonical field: a mapped ``negatives`` column is a JSON array too)."""
    ext = os.path.splitext(path)[1].lower()
    return _csv_rows(path, delimiter, rename) if ext == ".csv" else READERS[ext](path)


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


def load_records(
    path: str | os.PathLike,
    skip_bad: bool = False,
    *,
    columns: Mapping[str, str] | None = None,
    delimiter: str | None = None,
    **options: Any,
) -> "IndexedRecords | list[Record]":
    """Records with random access: `IndexedRecords` for JSONL (offsets only, the file stays on
    disk), a list for CSV/Parquet (no line offsets to seek to). Same options as `read_records`:
    ``columns`` (canonical field -> the file's column), ``delimiter`` (CSV), ``format``, ..."""
    path = os.fspath(path)
    if path.endswith((".jsonl", ".json")):
        return IndexedRecords(path, skip_bad, columns=columns, delimiter=delimiter, **options)  # (CSV only: unused)
    return list(read_records(path, skip_bad, columns=columns, delimiter=delimiter, **options))


def read_file(
    path: str, skip_bad: bool = False, max_bad_fraction: float = 1.0, **options: Any
) -> tuple[Sequence[Record], RecordReader]:
    """``(records, their RecordReader)`` of a training file: `load_records`' choice (JSONL indexed, others a
    list), keeping the reader, whose ``rows`` / ``skipped`` / ``errors`` say how many rows were bad.

    ``UserError`` for a folder that holds no data file the streams read (``path`` is then no stream spec),
    and when ``skip_bad`` skipped more than ``max_bad_fraction`` of the rows."""
    if os.path.isdir(path):
        raise UserError(_not_data_folder(path))
    if path.endswith((".jsonl", ".json")):
        indexed = IndexedRecords(path, skip_bad, **options)
        records, reader = indexed, indexed.reader
    else:
        reader = read_records(path, skip_bad, **options)
        records = list(reader)
    if reader.skipped and reader.skipped > max_bad_fraction * reader.rows:
        raise UserError(
            f"{path}: {reader.skipped} of {reader.rows} rows are bad ({100 * reader.skipped / reader.rows:.3g}% > "
            f"--max-bad-fraction {100 * max_bad_fraction:.3g}%); first errors:\n  " + "\n  ".join(reader.errors)
        )
    return records, reader


def _not_data_folder(path: str) -> str:
    """What a folder without .jsonl/.json/.parquet/.tar files holds, and what to give instead."""
    names = sorted(os.listdir(path))
    files = [n for n in names if os.path.isfile(os.path.join(path, n))]
    folders = [n + "/" for n in names if n + "/" not in files and os.path.isdir(os.path.join(path, n))]
    held = ", ".join((files + folders)[:20]) or "nothing"
    fix = "give a file or a folder of .jsonl / .json / .parquet / .tar files"
    if any(n.lower().endswith(".csv") for n in files):
        fix = "a CSV file is read on its own: give the file (or convert the files to JSONL to read them together)"
    return f"{path}: a folder with no .jsonl / .json / .parquet / .tar files (it holds {held}); {fix}"


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
