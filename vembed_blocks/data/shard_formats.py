"""Shard readers: one shard of a sharded data set -> raw samples, from a resumable position.

A *source* is an ordered list of shards of one kind plus the options that turn a raw sample
into ``Record``s (``columns``, ``format``, ``task``, ... as in ``read_records``):

- ``ShardSet(paths)``: webdataset-style tar shards (``key.jpg`` + ``key.txt`` / ``key.json``,
  read with the standard library's ``tarfile``), Parquet shards (row groups streamed with
  pyarrow; image bytes, HF ``{"bytes", "path"}`` structs or paths), or JSONL shards.
- ``DatasetSource(ds)``: a Hugging Face ``datasets.Dataset`` (units = row ranges) or
  ``IterableDataset`` (units = its own shards).

``source.read(unit, token)`` yields ``(token_after, member_index, label, raw)`` from ``token``
(``None`` = the start; else a short list of ints that ``read`` gave earlier: a byte offset,
a row number), so a reader resumes mid-shard by seeking, never by replaying the shard.
``source.records(label, raw)`` parses one raw sample; it raises ``RecordError`` for a bad one.
"""

from __future__ import annotations

import json
import math
import os
import tarfile
from typing import Any, Iterator, Mapping

from .images import ShardImage
from .records import IMAGE_EXTENSIONS, Record, RecordError, parse_row

__all__ = ["ShardError", "ShardImage", "ShardSet", "DatasetSource", "SHARD_KINDS"]

Sample = tuple[list[int], int, str, Any]  # (token after it, index in its shard, "shard:member", raw)
SHARD_KINDS = {".tar": "tar", ".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl"}
_TAR_DEFAULT_COLUMNS = {"query": "txt", "positive": "image"}  # img2dataset: caption in key.txt
_MAGIC = ((b"\xff\xd8", ".jpg"), (b"\x89PNG", ".png"), (b"GIF8", ".gif"), (b"BM", ".bmp"), (b"II*\x00", ".tif"))


class ShardError(OSError):
    """A shard that cannot be opened or read; the message names it (and the byte or row)."""


def _image_ext(data: bytes) -> str:
    """The file extension that the bytes' magic number says (``.jpg`` when unknown: it is an image field)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return next((ext for magic, ext in _MAGIC if data.startswith(magic)), ".jpg")


def _in_memory_images(value: Any, label: str) -> Any:
    """Turn bytes / ``{"bytes", "path"}`` structs / PIL images (lists too) into ``ShardImage``s."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        return ShardImage(label + _image_ext(data), data)
    if isinstance(value, Mapping) and "bytes" in value and set(value) <= {"bytes", "path"}:
        if value["bytes"] is None:
            return value.get("path")  # an HF Image struct that only references a file
        data, name = bytes(value["bytes"]), value.get("path") or ""
        return ShardImage(f"{label}:{name}" if os.path.splitext(name)[1] else label + _image_ext(data), data)
    if isinstance(value, list):
        return [_in_memory_images(v, f"{label}[{i}]") for i, v in enumerate(value)]
    if type(value).__module__.startswith("PIL."):
        return ShardImage(label + ".png", None, value)  # already decoded (a datasets Image with decode=True)
    return value


class _Parser:
    """``raw row -> list[Record]`` with a column mapping and ``read_records``' options."""

    def __init__(
        self,
        columns: Mapping[str, str] | None,
        format: str | None,
        base_dir: str,
        options: Mapping[str, Any],
    ) -> None:
        from .columns import check_record_options  # here: `import shard_formats` stays at 3 package modules

        bad = set(options) - {"task", "t2i_mode", "inverse", "language"}
        if bad:
            raise TypeError(f"unknown record options {sorted(bad)}")
        self.rename = check_record_options(columns, format, options)
        self.format, self.base_dir, self.options = format, base_dir, dict(options)

    def __call__(self, raw: Mapping[str, Any], label: str, base_dir: str | None = None) -> list[Record]:
        row = {self.rename.get(k, k): _in_memory_images(v, f"{label}:{k}") for k, v in raw.items()}
        # Images are checked when the reader decodes them (bad ones are skipped there), not by a stat here.
        base = base_dir or self.base_dir
        return parse_row(row, label, base, format=self.format, check_images=False, **self.options)


class ShardSet:
    """Shards of one kind (``"tar" | "parquet" | "jsonl"``, from the extension) as one source.

    ``columns``: canonical field -> the sample's key (tar samples have ``txt``, ``image``, each
    member's extension, and the keys of ``key.json``; default ``{"query": "txt", "positive":
    "image"}``). Relative image paths resolve against each shard's directory.
    """

    def __init__(
        self,
        shards: list[str],
        *,
        columns: Mapping[str, str] | None = None,
        format: str | None = None,
        **options: Any,
    ) -> None:
        if not shards:
            raise ValueError("a shard set needs at least one shard")
        kinds = {SHARD_KINDS.get(os.path.splitext(p)[1].lower()) for p in shards}
        if None in kinds or len(kinds) != 1:
            raise ValueError(f"shards must all be one of {sorted(SHARD_KINDS)}: got {sorted(kinds, key=str)}")
        self.kind = kinds.pop()
        self.shards = [os.path.abspath(p) for p in shards]
        if self.kind == "tar":
            columns = {**_TAR_DEFAULT_COLUMNS, **(columns or {})}
        self.parse = _Parser(columns, format, ".", options)
        self._read = {"tar": _read_tar, "parquet": _read_parquet, "jsonl": _read_jsonl}[self.kind]
        if self.kind == "parquet":
            _pyarrow()

    def __len__(self) -> int:
        return len(self.shards)

    def describe(self, unit: int) -> str:
        return self.shards[unit]

    def read(self, unit: int, token: list[int] | None) -> Iterator[Sample]:
        return self._read(self.shards[unit], token)

    def records(self, label: str, raw: Any) -> list[Record]:
        base = os.path.dirname(label.rsplit(":", 1)[0])
        if self.kind == "tar":
            raw = _tar_row(raw, label)
        elif self.kind == "jsonl":
            try:
                raw = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise RecordError(label, f"malformed JSON ({e})") from None
        if not isinstance(raw, Mapping):
            raise RecordError(label, f"expected a JSON object, got {type(raw).__name__}")
        return self.parse(raw, label, base)


def _tar_key(name: str) -> tuple[str, str]:
    """webdataset's convention: the key is the path up to the first dot of the file name."""
    folder, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return os.path.join(folder, stem), ext.lower()


def _tar_row(members: Mapping[str, bytes], label: str) -> dict[str, Any]:
    """One tar sample (extension -> bytes) -> a row: ``txt`` text, ``image`` the first image, json keys."""
    row: dict[str, Any] = {}
    shard = label.rsplit(":", 1)[0]
    for ext, data in members.items():
        if ("." + ext.rsplit(".", 1)[-1]) in IMAGE_EXTENSIONS:
            img = ShardImage(f"{label}.{ext}", data)
            row[ext] = img
            row.setdefault("image", img)
        elif ext == "json":
            try:
                meta = json.loads(data)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise RecordError(f"{label}.json", f"malformed JSON ({e})") from None
            if isinstance(meta, Mapping):
                row.update({k: v for k, v in meta.items() if k not in row})
        else:
            try:
                row[ext] = data.decode("utf-8")
            except UnicodeDecodeError:
                raise RecordError(f"{label}.{ext}", f"not UTF-8 text (shard {shard})") from None
    return row


def _read_tar(path: str, token: list[int] | None) -> Iterator[Sample]:
    """Samples (consecutive members sharing a key) of a tar shard; the token is (byte offset, index)."""
    offset, index = token or (0, 0)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ShardError(f"cannot open tar shard {path}: {e}") from e
    with f:
        f.seek(offset)
        key, members, start = None, {}, offset
        try:
            tf = tarfile.open(fileobj=f, mode="r:")
            while True:
                info = tf.next()
                tf.members.clear()  # tarfile keeps every header it read; we only go forward
                if info is not None and not info.isfile():
                    continue
                k, ext = _tar_key(info.name) if info is not None else (None, "")
                if members and k != key:
                    next_at = info.offset if info is not None else tf.offset
                    yield [next_at, index + 1], index, f"{path}:{key}", members
                    index, members = index + 1, {}
                if info is None:
                    break
                if not members:
                    key, start = k, info.offset
                members[ext] = tf.extractfile(info).read()
        except (tarfile.TarError, EOFError) as e:
            raise ShardError(f"cannot read tar shard {path} (sample {index} at byte {start}): {e}") from e
        f.seek(tf.offset)
        if f.read(1024).strip(b"\0"):  # tarfile stops silently at a bad header after the first
            raise ShardError(f"cannot read tar shard {path}: corrupt member header at byte {tf.offset}")


def _read_jsonl(path: str, token: list[int] | None) -> Iterator[Sample]:
    """Non-blank lines of a JSONL shard; the token is (byte offset, line number)."""
    offset, lineno = token or (0, 0)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ShardError(f"cannot open JSONL shard {path}: {e}") from e
    with f:
        f.seek(offset)
        for line in f:
            offset, lineno = offset + len(line), lineno + 1
            if line.strip():
                yield [offset, lineno], lineno - 1, f"{path}:{lineno}", line


def _pyarrow() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError('Parquet shards need pyarrow: pip install "vembed-blocks[parquet]"') from e
    return pq


def _read_parquet(path: str, token: list[int] | None) -> Iterator[Sample]:
    """Rows of a Parquet shard, row group by row group from the one holding row ``token[0]``."""
    pq = _pyarrow()
    row = token[0] if token else 0
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for unreadable files
        raise ShardError(f"cannot open Parquet shard {path}: {e}") from e
    first, group, sizes = 0, 0, [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
    while group < len(sizes) and first + sizes[group] <= row:
        first, group = first + sizes[group], group + 1
    if group == len(sizes):
        return
    n = first
    for batch in pf.iter_batches(batch_size=1024, row_groups=range(group, len(sizes))):
        for raw in batch.to_pylist():
            n += 1
            if n > row:
                yield [n], n - 1, f"{path}:{n}", raw


class DatasetSource:
    """A Hugging Face ``datasets.Dataset`` (units of ``rows_per_unit`` rows) or ``IterableDataset``
    (units = its shards; resuming inside one skips rows, which ``datasets`` reads through).

    Image features are read undecoded (``Image(decode=False)``) so workers decode and check them
    like tar members. ``image_root``: where relative image paths resolve (default: the cwd).
    """

    def __init__(
        self,
        dataset: Any,
        *,
        columns: Mapping[str, str] | None = None,
        format: str | None = None,
        image_root: str | None = None,
        rows_per_unit: int = 10_000,
        name: str = "dataset",
        **options: Any,
    ) -> None:
        try:
            import datasets
        except ImportError as e:
            raise ImportError('datasets sources need datasets: pip install "vembed-blocks[streaming]"') from e
        for col, feature in (dataset.features or {}).items():
            if isinstance(feature, datasets.Image) and feature.decode:
                dataset = dataset.cast_column(col, datasets.Image(decode=False))
        self.dataset, self.name = dataset, name
        self.iterable = isinstance(dataset, datasets.IterableDataset)
        self.rows_per_unit = rows_per_unit
        self.units = dataset.num_shards if self.iterable else max(1, math.ceil(len(dataset) / rows_per_unit))
        self.parse = _Parser(columns, format, os.path.abspath(image_root or "."), options)

    def __len__(self) -> int:
        return self.units

    def describe(self, unit: int) -> str:
        return f"{self.name} unit {unit}"

    def read(self, unit: int, token: list[int] | None) -> Iterator[Sample]:
        start = token[0] if token else 0
        if self.iterable:
            part = self.dataset.shard(num_shards=self.units, index=unit)
            for n, raw in enumerate(part.skip(start) if start else part, start):
                yield [n + 1], n, f"{self.name}[{unit}:{n}]", raw
            return
        lo, hi = unit * self.rows_per_unit, min(len(self.dataset), (unit + 1) * self.rows_per_unit)
        for a in range(lo + start, hi, 256):
            cols = self.dataset[a : min(a + 256, hi)]
            for i, raw in enumerate(dict(zip(cols, vals)) for vals in zip(*cols.values())):
                yield [a - lo + i + 1], a - lo + i, f"{self.name}[{a + i}]", raw

    def records(self, label: str, raw: Any) -> list[Record]:
        return self.parse(raw, label)
