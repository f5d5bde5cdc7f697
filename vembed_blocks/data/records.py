"""Read training data files (JSONL, CSV, Parquet) into typed ``Record``s, streaming.

One record = one training example: a query, one positive, zero or more hard negatives,
each an ``Item`` (optional text + zero or more image paths). ``read_records`` iterates the
file line by line (a 10 GB JSONL costs one line of memory), validates every row and
either raises ``RecordError`` naming ``file:line`` or, with ``skip_bad=True``, skips the
row and counts it (``reader.skipped``; a summary is logged at the end).

Formats (detected per row from its keys, see ``_detect``)::

    t2i  {"query": text, "positive": image, "negatives": [image, ...]}
    i2i  {"query_image": image, "positive": image, "negatives": [...]}
    i2t  {"query_image": image, "positive": text}
    m2i  {"query_image": image, "query": text, "positive": image}
    t2t  {"query": text, "positive": text, "negatives": [text, ...]}
    edit {"source_image": image | [image, ...] | null, "target_image": image,
          "instruction": text, "instruction_cn": text,
          "inverse_instruction": text, "inverse_instruction_cn": text}
    swift {"messages": [turn, ...], "positive_messages": [[turn, ...], ...], ...}  (`data.swift_format`)

plus an optional ``label`` (an int or a string, ``_Row.label``; missing, null or blank: no label)
and ``task`` on every format. CSV may start with a UTF-8 BOM.
An edit row (it has ``target_image``) is turned into records by the edit wing,
`vembed_blocks.edit.records`, imported on the first such row: the seed-004 rules (missing
instruction, inverse records, ``t2i_mode``, ``language``) live there.

Imports: standard library, `user_errors`; `data.row_files` (rows with line numbers; home of ``IndexedRecords``
/ ``load_records``, re-exported here) and `data.columns` (column mapping, hints) on first use; `data.images`
(Pillow) only when ``verify_images`` decodes, `vembed_blocks.edit.records` only for edit rows,
`data.swift_format` only for ms-swift rows.

THE IMAGE-VS-TEXT RULE (the only place it is decided, ``_is_image``):
fields whose name ends in ``_image`` are always images; ``query`` and the instruction
fields are always text; ``positive`` and ``negatives`` follow the declared ``format``
(``"t2i" | "i2i" | "m2i"`` -> images, ``"i2t" | "t2t"`` -> text) and, when no format is
declared, are images iff the string ends with one of ``IMAGE_EXTENSIONS``
(case-insensitive). Paths without such an extension are text unless you declare the format.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from ..user_errors import UserError

if TYPE_CHECKING:
    from .row_files import IndexedRecords, load_records

__all__ = [
    "IMAGE_EXTENSIONS",
    "FORMATS",
    "FIELDS",
    "Item",
    "Record",
    "RecordError",
    "RecordReader",
    "IndexedRecords",
    "load_records",
    "read_records",
    "parse_row",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
FORMATS = ("t2i", "i2i", "i2t", "m2i", "t2t", "edit", "swift")
_IMAGE_DOC_FORMATS = {"t2i": True, "i2i": True, "m2i": True, "i2t": False, "t2t": False}
# Canonical field names a column mapping may rename (the last six are the edit format's).
FIELDS = (
    "query",
    "query_image",
    "positive",
    "negatives",
    "label",
    "task",
    "source_image",
    "target_image",
    "instruction",
    "instruction_cn",
    "inverse_instruction",
    "inverse_instruction_cn",
)


class RecordError(UserError):
    """A bad input row; ``str(err)`` starts with ``file:line`` (a `UserError`, so a ``ValueError``)."""

    def __init__(self, source: str, message: str) -> None:
        super().__init__(f"{source}: {message}")
        self.source = source


@dataclass(frozen=True)
class Item:
    """One side of a pair: optional text and zero or more (resolved) image paths."""

    text: str | None = None
    images: tuple[str, ...] = ()

    @property
    def is_image(self) -> bool:
        return bool(self.images)


@dataclass
class Record:
    """One example. ``negatives`` may be empty; ``source`` is ``"file:line"`` for messages."""

    query: Item
    positive: Item
    negatives: list[Item] = field(default_factory=list)
    label: Any = None
    task: str | None = None
    format: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    source: str = ""


def _is_image(name: str, value: str, fmt: str | None) -> bool:
    """The image-vs-text rule (see module docstring). ``name`` is the canonical field name."""
    if name.endswith("_image"):
        return True
    if name in ("positive", "negatives") and fmt in _IMAGE_DOC_FORMATS:
        return _IMAGE_DOC_FORMATS[fmt]
    if name in ("positive", "negatives"):
        return value.lower().endswith(IMAGE_EXTENSIONS)
    return False


class _Row:
    """Typed accessors over one raw row that raise ``RecordError`` naming the row."""

    def __init__(
        self, raw: Mapping[str, Any], source: str, base_dir: str, check_images: bool, verify_images: bool
    ) -> None:
        self.raw, self.source, self.base_dir = raw, source, base_dir
        self.check_images, self.verify_images = check_images, verify_images

    def fail(self, message: str) -> RecordError:
        return RecordError(self.source, message)

    def has(self, name: str) -> bool:
        # present-but-empty is reported by the field check, not as "unknown format"
        return self.raw.get(name) is not None

    def text(self, name: str, required: bool = True) -> str | None:
        value = self.raw.get(name)
        if value is None:
            if required:
                raise self.fail(f"missing field {name!r} (row keys: {sorted(self.raw)})")
            return None
        if not isinstance(value, str):
            raise self.fail(f"field {name!r} must be a string, got {type(value).__name__}")
        if not value.strip():
            if required:
                raise self.fail(f"empty text in field {name!r}")
            return None
        return value

    def image(self, name: str, value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(f"field {name!r}: expected an image path, got {value!r}")
        if value.startswith(("http://", "https://")):
            raise self.fail(f"field {name!r}: URLs are not fetched ({value}); download the images first")
        path = value if os.path.isabs(value) else os.path.join(self.base_dir, value)
        if self.check_images and not os.path.isfile(path):
            raise self.fail(f"field {name!r}: image file not found: {path}")
        if self.verify_images:  # full decode: catches truncated/corrupt files up front (slow)
            from .images import ImageLoadError, load_image

            try:
                load_image(path)
            except ImageLoadError as e:
                raise self.fail(f"field {name!r}: {e}") from e
        return path

    def item(self, name: str, value: Any, fmt: str | None) -> Item:
        """A positive/negative entry: image or text by the rule."""
        if not isinstance(value, str):
            raise self.fail(f"field {name!r}: expected a string, got {type(value).__name__}")
        if _is_image(name, value, fmt):
            return Item(images=(self.image(name, value),))
        if not value.strip():
            raise self.fail(f"empty text in field {name!r}")
        return Item(text=value)

    def images(self, name: str) -> tuple[str, ...]:
        """An ``*_image`` field that may be a path, a list of paths, or null."""
        value = self.raw.get(name)
        if value is None or value == "":
            return ()
        values = value if isinstance(value, list) else [value]
        return tuple(self.image(name, v) for v in values)

    def label(self) -> int | str | None:
        """The row's ``label``: an int or a string; a missing key, null, NaN or blank string mean no label."""
        value = self.raw.get("label")
        # "" is how CSV writes an empty cell, NaN how pandas writes a gap in a numeric (Parquet) column
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return None
        if isinstance(value, str):
            return value if value.strip() else None
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)  # numpy ints as plain ints: equal labels then compare and hash alike
        got = f"got {type(value).__name__} {value!r:.80}"
        # a float is refused here, at its row: later the loss would fail on a float tensor with no file:line
        if isinstance(value, float) and value.is_integer():
            got += f' (write {int(value)}, or "{value}" as a string label)'
        elif isinstance(value, float) and math.isfinite(value):
            got += f' (write "{value}" as a string label; a gold score for CoSENT goes in a "score" field)'
        raise self.fail(f"label must be an int or a string, {got}")


def _detect(row: _Row, declared: str | None) -> str:
    if declared is not None:
        return declared
    if row.has("target_image"):
        return "edit"
    if row.has("query_image"):
        if row.has("query"):
            return "m2i"
        pos = row.raw.get("positive")
        return "i2i" if isinstance(pos, str) and _is_image("positive", pos, None) else "i2t"
    if row.has("query"):
        pos = row.raw.get("positive")
        return "t2i" if isinstance(pos, str) and _is_image("positive", pos, None) else "t2t"
    if row.has("messages") or row.has("positive_messages"):  # ms-swift's rows; one without messages is told so
        return "swift"
    from .columns import unknown_format_hint  # the fix: --columns / --csv-delimiter with this file's values

    raise row.fail(f"unknown format: row keys {sorted(row.raw)} match none of {FORMATS}" + unknown_format_hint(row.raw))


def _pair(row: _Row, fmt: str) -> Record:
    if fmt == "m2i":
        query = Item(text=row.text("query"), images=row.images("query_image"))
    elif fmt in ("i2i", "i2t"):
        query = Item(images=row.images("query_image"))
    else:
        query = Item(text=row.text("query"))
    if fmt in ("i2i", "i2t", "m2i") and not query.images:
        raise row.fail("missing field 'query_image'")
    if "positive" not in row.raw or row.raw["positive"] is None:
        raise row.fail(f"missing field 'positive' (row keys: {sorted(row.raw)})")
    doc_fmt = fmt if fmt in _IMAGE_DOC_FORMATS else None
    positive = row.item("positive", row.raw["positive"], doc_fmt)
    raw_negs = row.raw.get("negatives")
    if raw_negs is None:
        raw_negs = []
    if not isinstance(raw_negs, list):
        raise row.fail(f"'negatives' must be a list, got {type(raw_negs).__name__}")
    negatives = [row.item("negatives", v, doc_fmt) for v in raw_negs]
    for i, neg in enumerate(negatives):
        if neg.is_image != positive.is_image:  # mixed modalities would silently feed the wrong tower
            kind = "image" if neg.is_image else "text"
            raise row.fail(f"negative {i} is {kind} but the positive is not; declare format= to force one")
    return Record(query=query, positive=positive, negatives=negatives, format=fmt)


def parse_row(
    raw: Any,
    source: str,
    base_dir: str = ".",
    *,
    format: str | None = None,
    task: str | None = None,
    t2i_mode: bool = False,
    inverse: bool = True,
    language: str = "en",
    check_images: bool = True,
    verify_images: bool = False,
) -> list[Record]:
    """Validate one already-renamed row and turn it into records (edit rows may give two)."""
    if not isinstance(raw, Mapping):
        raise RecordError(source, f"expected a JSON object, got {type(raw).__name__}")
    row = _Row(raw, source, base_dir, check_images, verify_images)
    fmt = _detect(row, format)
    used = set(FIELDS)
    if fmt == "swift":
        from .swift_format import SWIFT_FIELDS, swift_records  # ms-swift's messages rows, several positives

        records, used = swift_records(row), used.union(SWIFT_FIELDS)
    elif fmt == "edit":
        from ..edit.records import edit_records  # the edit wing owns the seed-004 format

        records = edit_records(row, t2i_mode=t2i_mode, inverse=inverse, language=language)
    else:
        records = [_pair(row, fmt)]
    extra = {k: v for k, v in raw.items() if k not in used}
    # ms-swift's "label" is a score or a 0/1 pair flag, not a class: kept in extra, never a grouping label
    label = None if fmt == "swift" else row.label()
    if fmt == "swift" and raw.get("label") is not None:
        extra["swift_label"] = raw["label"]
    for rec in records:
        rec.label = rec.label if label is None else label  # swift: siblings of several positives share one
        rec.task = task if task is not None else raw.get("task")
        rec.extra = {**extra, **rec.extra}
        rec.source = source
    return records


class RecordReader:
    """Iterator over the records of one file; ``skipped`` counts rows dropped by ``skip_bad``. After a full
    pass, ``one_label`` is the label every record shares when no record is unlabelled or has negatives
    (then a contrastive loss has no negative at all), else None."""

    def __init__(
        self,
        path: str,
        skip_bad: bool = False,
        *,
        columns: Mapping[str, str] | None = None,
        format: str | None = None,
        delimiter: str | None = None,
        **options: Any,
    ) -> None:
        from .columns import check_record_options, parse_csv_delimiter
        from .row_files import READERS, file_rows  # here, not at import: naming Record loads no reader

        ext = os.path.splitext(path)[1].lower()
        if ext not in READERS:
            raise UserError(f"{path}: unsupported file type {ext!r} (expected one of {sorted(READERS)})")
        # canonical name -> name in the file; reversed once so each row is renamed cheaply
        self._rename = check_record_options(columns, format, options)
        self.path, self.skip_bad, self.format, self.options = path, skip_bad, format, options
        # CSV only: None = a comma, or what the header shows (row_files); "tab" and "\\t" read as a tab
        self.delimiter = None if delimiter is None else parse_csv_delimiter(delimiter)
        self.rows = 0
        self.skipped = 0
        self.errors: list[str] = []  # the first few skip messages, for the summary
        self._labels: set = set()  # up to 2 distinct (None: unlabelled or with negatives): enough for one_label
        self._it: Iterator[Record] | None = self._records(file_rows)

    @property
    def one_label(self) -> Any:
        return next(iter(self._labels)) if len(self._labels) == 1 else None

    def __iter__(self) -> RecordReader:
        return self

    def __next__(self) -> Record:
        if self._it is None:
            raise StopIteration  # an unpickled copy only parses (IndexedRecords in DataLoader workers)
        return next(self._it)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_it": None}  # generators do not pickle

    def parse(self, raw: Any, source: str, base_dir: str) -> list[Record]:
        """One raw row -> its records, with this reader's column mapping and options."""
        if self._rename and isinstance(raw, Mapping):
            raw = {self._rename.get(k, k): v for k, v in raw.items()}
        return parse_row(raw, source, base_dir, format=self.format, **self.options)

    def _records(self, rows_of) -> Iterator[Record]:
        base = os.path.dirname(os.path.abspath(self.path))
        seen_format: str | None = None
        for lineno, raw in rows_of(self.path, self.delimiter, self._rename):
            self.rows += 1
            source = f"{self.path}:{lineno}"
            try:
                if isinstance(raw, RecordError):
                    raise raw
                records = self.parse(raw, source, base)
                fmt = records[0].format
                if seen_format is not None and fmt != seen_format:  # e.g. one path without extension
                    raise RecordError(
                        source,
                        f"format {fmt!r} differs from {seen_format!r} of earlier rows; "
                        "declare format= if this is intended",
                    )
            except RecordError as e:
                if not self.skip_bad:
                    raise
                self.skipped += 1
                if len(self.errors) < 5:
                    self.errors.append(str(e))
                continue
            seen_format = fmt
            if len(self._labels) < 2:
                self._labels.update(None if r.negatives else r.label for r in records)
            yield from records
        if self.skipped:
            log.warning(
                "%s: skipped %d of %d rows; first errors:\n  %s",
                self.path,
                self.skipped,
                self.rows,
                "\n  ".join(self.errors),
            )


def read_records(path: str | os.PathLike, skip_bad: bool = False, **options: Any) -> RecordReader:
    """Stream the records of a JSONL / CSV / Parquet file.

    Options: ``columns`` (canonical name -> the file's column name, e.g. ``{"query": "caption", "positive":
    "image"}``; `columns.parse_columns` reads the flag form), ``delimiter`` (CSV: None reads commas, or the
    ``;`` / tab / ``|`` the header shows), ``format`` (one of ``FORMATS``; forces the modality of
    positive/negatives), ``task`` (overrides a row's ``task`` field), ``check_images`` (stat every image path,
    default True), ``verify_images`` (also decode every image to catch corrupt files, slow, default False),
    and for edit rows ``t2i_mode`` (drop source images), ``inverse`` (emit inverse rows, default True) and
    ``language`` (``"en"`` or ``"cn"``). Relative image paths resolve against the file's directory. Raises
    ``RecordError`` (``file:line: what``) on the first bad row, or with ``skip_bad=True`` skips it and counts
    it in the returned reader's ``skipped``.
    """
    return RecordReader(os.fspath(path), skip_bad, **options)


def __getattr__(name: str) -> Any:
    """``IndexedRecords`` and ``load_records`` live in `row_files` (PEP 562: loaded on first use)."""
    if name in ("IndexedRecords", "load_records"):
        from . import row_files

        return getattr(row_files, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
