"""The rows of a data file with their line numbers: JSONL, CSV (Excel's BOM, JSON-array cells), Parquet.

``READERS[ext](path)`` yields ``(line, row)`` pairs, ``row`` a dict as the file holds it, or a
`RecordError` naming ``file:line`` for a row that cannot be read (malformed JSON, invalid
UTF-8), so the caller decides whether to raise or skip it. `records.read_records` validates
the rows into ``Record``s.

Imports: standard library, `data.records` (for `RecordError`); pyarrow when a Parquet file is read
(the ``parquet`` extra).
"""

from __future__ import annotations

import csv
import json
import re
from typing import Any, Iterator

from .records import RecordError

__all__ = ["READERS"]

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
