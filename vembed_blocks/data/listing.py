"""The files a folder or a glob pattern names as training data: listed, logged, and refused when they are no one set.

A folder (or ``data/*.jsonl``) is read whole, as the shards of one source (`shards.open_stream`), so every
file in it trains: a ``val.jsonl`` beside ``train.jsonl`` would leak the evaluation rows into the model, and
text-to-image rows beside image-to-image rows would be mixed in one batch. `check_listed_files` therefore
logs (at info, logger ``vembed_blocks.data``) one line per file: its name, kind, rows when cheap (a JSONL's
lines up to 64 MiB, a Parquet file's footer; never a tar's) and the row format of its first readable row
(t2i / i2i / t2t / ...), and raises `UserError`, listing the files, when

- the files are of different kinds (tar and JSONL): one source reads one kind;
- a file's name looks like a validation or test split (`eval_split_word`), or the files' row formats
  differ, unless ``allow_mixed`` (the recipes' ``--allow-mixed-data``);
- a file has no readable row among its first few (capitalised columns, say): streams skip bad samples, so
  every sample of it would be skipped, one warning at a time.

Cost: up to ``MAX_OPENED`` files each have their first rows parsed; a larger set (thousands of shards, as
img2dataset writes them) has only its first file opened and is taken as uniform, so start-up stays cheap.
Files named one by one (a brace pattern, one ``.tar``) are taken as named and not checked.

Imports: standard library, `user_errors`; `data.shard_formats` when a listing is checked.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping

from ..user_errors import UserError

__all__ = ["EVAL_SPLIT_WORDS", "FileSummary", "MAX_OPENED", "check_listed_files", "eval_split_word", "summarize_file"]

log = logging.getLogger("vembed_blocks.data")
EVAL_SPLIT_WORDS = ("val", "valid", "validation", "dev", "test", "eval")
MAX_OPENED = 64  # files whose first rows are parsed; beyond this only the first one is
_COUNT_UP_TO = 64 << 20  # bytes: a larger JSONL is not counted (a stream reads nothing up front)
_FIRST_ROWS = 5  # rows tried for a format before a file counts as unreadable
_SHOWN = 20  # files listed in an error message
_UNREADABLE, _EMPTY = "cannot read it: ", "the file has no rows"  # not errors of its rows


def eval_split_word(name: str) -> str | None:
    """The word that makes a file name look like a validation/test split, or None.

    The name without its extension is cut into runs of letters and of digits; a run equal to one of
    ``EVAL_SPLIT_WORDS`` counts: ``val.jsonl``, ``train_val_3.jsonl``, ``data-test.parquet``,
    ``coco_val2017.jsonl`` do, ``interval.jsonl`` and ``trainval.jsonl`` (a merged split, on purpose) do not.
    """
    stem = os.path.splitext(os.path.basename(name))[0].lower()
    return next((w for w in re.findall(r"[a-z]+|[0-9]+", stem) if w in EVAL_SPLIT_WORDS), None)


@dataclass
class FileSummary:
    """What one listed file holds: ``rows`` None when not counted, ``format`` None when not opened or
    unreadable (``error`` says why)."""

    name: str
    path: str
    kind: str
    size: int
    rows: int | None = None
    format: str | None = None
    error: str | None = None

    def line(self) -> str:
        """``train.jsonl: jsonl, 120 rows, t2i`` (the size where rows are not counted)."""
        amount = f"{self.rows} rows" if self.rows is not None else _size(self.size)
        if self.format or self.error is None:
            what = self.format or "not opened"
        else:
            what = "empty" if self.error == _EMPTY else f"no readable row: {self.error}"
        return f"{self.name}: {self.kind}, {amount}, {what}"


def _size(n: float) -> str:
    """``1234567`` -> ``1.2 MB`` (decimal units, as a file manager shows them)."""
    if n < 1000:
        return f"{int(n)} bytes"
    for unit in ("KB", "MB", "GB"):
        n /= 1000
        if n < 1000 or unit == "GB":
            break
    return f"{n:.1f} {unit}"


def _count_rows(path: str, kind: str, size: int) -> int | None:
    """Rows when cheap: a JSONL's non-blank lines up to ``_COUNT_UP_TO`` bytes, a Parquet footer's count."""
    if kind == "jsonl" and size <= _COUNT_UP_TO:
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    if kind == "parquet":
        from .shard_formats import _pyarrow

        try:
            return int(_pyarrow().ParquetFile(path).metadata.num_rows)
        except Exception:  # pyarrow's own errors: the reader reports an unreadable shard properly
            return None
    return None


def _first_format(path: str, record_options: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """``(format, None)`` of the first of the first ``_FIRST_ROWS`` rows that parses, else ``(None, error)``,
    parsed the way the stream will (a one-shard `ShardSet` with the same options)."""
    from .records import RecordError
    from .shard_formats import ShardSet
    from .shard_stream import _shard_errors

    source, error = ShardSet([path], **record_options), _EMPTY
    try:
        for n, (_token, _index, label, raw) in enumerate(source.read(0, None)):
            if n == _FIRST_ROWS:
                break
            try:
                return source.records(label, raw)[0].format, None
            except RecordError as e:
                error = str(e) if n == 0 else error  # the first row's error: the one a user looks at
    except _shard_errors() as e:  # the stream raises ShardError for it (or skips it: skip_bad_shards)
        error = f"{_UNREADABLE}{e}"
    return None, error


def summarize_file(path: str, name: str, record_options: Mapping[str, Any], open_it: bool = True) -> FileSummary:
    """One listed file's `FileSummary`; ``open_it=False`` only stats it (no rows counted, no format)."""
    from .shard_formats import SHARD_KINDS

    kind = SHARD_KINDS.get(os.path.splitext(path)[1].lower(), "?")
    summary = FileSummary(name, path, kind, os.path.getsize(path))
    if open_it:
        summary.rows = _count_rows(path, kind, summary.size)
        summary.format, summary.error = _first_format(path, record_options)
    return summary


def _has(names: list[str]) -> str:
    return "has" if len(names) == 1 else "have"


def _listing(summaries: list[FileSummary]) -> str:
    lines = [s.line() for s in summaries[:_SHOWN]]
    more = f"\n  ... and {len(summaries) - _SHOWN} more" if len(summaries) > _SHOWN else ""
    return "\n  " + "\n  ".join(lines) + more


def _by(summaries: list[FileSummary], key: str) -> dict[str, list[str]]:
    """Names grouped by ``kind`` or ``format`` (files without one left out)."""
    groups: dict[str, list[str]] = {}
    for s in summaries:
        if getattr(s, key) is not None:
            groups.setdefault(getattr(s, key), []).append(s.name)
    return groups


def _log(spec: str, summaries: list[FileSummary], ignored: list[str]) -> None:
    opened = sum(s.format is not None or s.error is not None for s in summaries)
    note = "" if opened == len(summaries) else f"; formats from the first file only (over {MAX_OPENED} files)"
    log.info("%s: reading %d data files%s:", spec, len(summaries), note)
    if len(summaries) <= MAX_OPENED:
        for s in summaries:
            (log.warning if s.error else log.info)("  %s", s.line())
    else:
        size = sum(s.size for s in summaries)
        log.info("  %s, %s .. %s, %s in all", summaries[0].line(), summaries[1].name, summaries[-1].name, _size(size))
    if ignored:
        log.info("  not read (not .jsonl/.json/.parquet/.tar): %s", ", ".join(ignored[:_SHOWN]))


def _refuse(spec: str, what: str, summaries: list[FileSummary], allow_mixed: bool) -> None:
    """``UserError`` for the cases in the module docstring (or, with ``allow_mixed``, a warning)."""
    kinds, formats = _by(summaries, "kind"), _by(summaries, "format")
    groups = lambda g: "; ".join(f"{k}: {', '.join(v[:5])}{' ...' if len(v) > 5 else ''}" for k, v in g.items())
    if len(kinds) > 1:
        raise UserError(
            f"{spec}: the files are of different kinds ({groups(kinds)}); one source reads one kind: point at the "
            f"files of one kind.{_listing(summaries)}"
        )
    bad_rows = [s.name for s in summaries if s.error is not None and not s.error.startswith((_UNREADABLE, _EMPTY))]
    if bad_rows:  # an unreadable shard is the stream's to report (ShardError) or skip (skip_bad_shards)
        raise UserError(
            f"{spec}: {', '.join(bad_rows[:5])} {_has(bad_rows)} no readable row among its first {_FIRST_ROWS}, so "
            f"every sample of it would be skipped; fix the file or the options (see its error):{_listing(summaries)}"
        )
    splits = [(s.name, eval_split_word(s.name)) for s in summaries if eval_split_word(s.name)]
    if splits and not allow_mixed:
        names = ", ".join(f"{n} ('{w}')" for n, w in splits[:5])
        raise UserError(
            f"{spec}: {names} {'looks' if len(splits) == 1 else 'look'} like a validation or test split by its name, "
            f"and {what}, so the evaluation rows would leak into training. Move the file out, point at the training "
            f"file(s), or pass --allow-mixed-data (allow_mixed=True) to train on every file:{_listing(summaries)}"
        )
    if len(formats) > 1 and not allow_mixed:
        raise UserError(
            f"{spec}: the files hold different row formats ({groups(formats)}), and {what}, as one data set, "
            "so batches would mix them. Point at the files of one format, or pass --allow-mixed-data "
            f"(allow_mixed=True) to read them together:{_listing(summaries)}"
        )
    for name, word in splits:
        log.warning("%s: training on %s although its name says '%s' (allow_mixed)", spec, name, word)
    if len(formats) > 1:
        log.warning("%s: reading rows of formats %s together (allow_mixed)", spec, ", ".join(formats))


def _ignored(folder: str, paths: list[str]) -> list[str]:
    """The folder's other files that a user may have meant as data (not its images, not hidden files)."""
    from .records import IMAGE_EXTENSIONS

    listed = {os.path.basename(p) for p in paths}
    return sorted(
        f
        for f in os.listdir(folder)
        if f not in listed
        and not f.startswith(".")
        and not f.lower().endswith(IMAGE_EXTENSIONS)
        and os.path.isfile(os.path.join(folder, f))
    )


def check_listed_files(
    spec: str, paths: list[str], *, allow_mixed: bool = False, record_options: Mapping[str, Any] | None = None
) -> list[FileSummary]:
    """Log what the folder or glob ``spec`` reads (``paths``, as `shards.expand_shards` lists them) and refuse
    what cannot train as one set (module docstring). ``record_options``: the stream's (``columns``,
    ``format``, ...), so each file's format is the one training will see. Returns the summaries."""
    is_dir = os.path.isdir(spec)
    root = spec if is_dir else os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    open_all = len(paths) <= MAX_OPENED
    options = dict(record_options or {})
    summaries = [
        summarize_file(p, os.path.relpath(os.path.abspath(p), os.path.abspath(root)), options, open_all or i == 0)
        for i, p in enumerate(paths)
    ]
    ignored = _ignored(spec, paths) if is_dir else []
    _log(spec, summaries, ignored)
    what = "a folder trains on every file it holds" if is_dir else "a glob pattern trains on every file it matches"
    _refuse(spec, what, summaries, allow_mixed)
    return summaries
