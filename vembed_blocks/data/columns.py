"""A file's column names -> the canonical record fields: the mapping, its flag syntax, and the hints.

``parse_columns("query=Query,positive=Positive")`` reads the recipes' ``--columns`` value into the
``columns=`` mapping that `records.read_records`, `row_files.load_records`, the shard readers and
`loader.training_batches` take (canonical field -> the file's column name). ``parse_csv_delimiter``
reads ``--csv-delimiter`` (``;``, ``tab``, ...). ``unknown_format_hint(row)`` is the end of the
"unknown format" error: the exact ``--columns`` value when the row's columns are the canonical
ones capitalised or spaced (``Query``, ``Positive ``), or the ``--csv-delimiter`` value when a CSV
row came out as one column holding ``;``. ``sniff_delimiter(header)`` picks a CSV's delimiter from
its header line when a comma would leave one column.

Imports: standard library, `data.records` (the field and format names), `user_errors`.
"""

from __future__ import annotations

import csv
import re
import shlex
from typing import Any, Mapping

from ..user_errors import UserError
from .records import FIELDS, FORMATS

__all__ = ["check_record_options", "parse_columns", "parse_csv_delimiter", "sniff_delimiter", "unknown_format_hint"]

_OTHER_DELIMITERS = ";\t|"  # what a CSV that is not comma-separated uses (Excel in many locales: ";")
_DELIMITER_NAMES = {"tab": "\t", "\\t": "\t", "comma": ",", "semicolon": ";", "pipe": "|"}
# Keys that make a row one of the formats (records._detect): with one of them, a format is found.
_FORMAT_KEYS = ("target_image", "query_image", "query")


def parse_columns(text: str) -> dict[str, str]:
    """``"query=Query,positive=Positive"`` -> ``{"query": "Query", "positive": "Positive"}``.

    Canonical names (left of ``=``) are stripped and must be in ``FIELDS``; column names (right) are
    taken as written, spaces included, since a header may really have them (``'positive=Positive '``).
    ``UserError`` for a pair without ``=``, an empty name, an unknown field, or a field or column named twice.
    """
    out: dict[str, str] = {}
    for pair in text.split(","):
        canon, eq, column = pair.partition("=")
        canon = canon.strip()
        if not eq or not canon or not column.strip():
            raise UserError(f"--columns {text!r}: {pair!r} is not FIELD=COLUMN (e.g. query=Query,positive=Positive)")
        if canon not in FIELDS:
            raise UserError(f"--columns {text!r}: unknown field {canon!r}; the fields are {', '.join(FIELDS)}")
        if canon in out:
            raise UserError(f"--columns {text!r}: field {canon!r} is mapped twice")
        if column in out.values():
            raise UserError(f"--columns {text!r}: column {column!r} is mapped to two fields")
        out[canon] = column
    return out


def parse_csv_delimiter(text: str) -> str:
    """``--csv-delimiter`` -> the one character: ``;``, ``|``, ``,`` as is; ``tab`` or ``\\t`` for a tab."""
    value = _DELIMITER_NAMES.get(text.strip().lower(), text)
    if len(value) != 1 or value in '"\r\n':
        raise UserError(f"--csv-delimiter {text!r}: give one character (';', ',', '|') or 'tab'")
    return value


def check_record_options(
    columns: Mapping[str, str] | None, format: str | None, options: Mapping[str, Any]
) -> dict[str, str]:
    """The reverse mapping (the file's column -> canonical field) after checking ``columns``, ``format`` and
    an edit ``language``; ``UserError`` naming what is unknown. Shared by the file and the shard readers,
    so a bad option is refused before the first row is read."""
    unknown = set(columns or {}) - set(FIELDS)
    if unknown:
        raise UserError(f"columns maps unknown fields {sorted(unknown)}; known: {FIELDS}")
    if format is not None and format not in FORMATS:
        raise UserError(f"unknown format {format!r}; expected one of {FORMATS}")
    if "language" in options:  # here, not at the first edit row (which may be far into the file)
        from ..edit.records import check_options

        check_options(options)
    return {file_name: canon for canon, file_name in (columns or {}).items()}


def sniff_delimiter(header: str) -> str | None:
    """The delimiter of a CSV header line that a comma leaves as one column holding ``;``, a tab or ``|``;
    None when a comma splits it (today's reading) or the sniffer finds no delimiter."""
    if len(next(csv.reader([header]), [])) != 1 or not any(c in header for c in _OTHER_DELIMITERS):
        return None
    try:
        return csv.Sniffer().sniff(header, delimiters="," + _OTHER_DELIMITERS).delimiter
    except csv.Error:
        return None  # the unknown-format hint still names the delimiter the row seems to use


def _canonical(key: str) -> str:
    """``" Query Image"`` -> ``"query_image"``: case, surrounding spaces, inner spaces or hyphens for ``_``."""
    return re.sub(r"[\s\-]+", "_", key.strip().lower())


def _columns_hint(keys: list[str]) -> str:
    """``the columns look capitalised: pass --columns query=Query,...`` when renaming makes a format, else ``""``."""
    mapping = {}
    for key in keys:
        canon = _canonical(key)
        if canon in FIELDS and canon != key and canon not in keys and canon not in mapping:
            mapping[canon] = key
    if not mapping or not any(k in mapping or k in keys for k in _FORMAT_KEYS):
        return ""
    how = []
    if any(k.strip() != k.strip().lower() for k in mapping.values()):
        how.append("capitalised")
    if any(k != k.strip() for k in mapping.values()):
        how.append("padded with spaces")
    if any(re.search(r"\S[\s\-]+\S", k) for k in mapping.values()):
        how.append("spelled with spaces or '-' for '_'")
    value = ",".join(f"{canon}={mapping[canon]}" for canon in FIELDS if canon in mapping)
    return f"; the columns look {' and '.join(how)}: pass --columns {shlex.quote(value)}"


def unknown_format_hint(row: Mapping[str, Any]) -> str:
    """The fix that ends an "unknown format" error for this (renamed) row; see the module docstring."""
    keys = [str(k) for k in row]
    empty = [k for k in _FORMAT_KEYS if k in row]  # present but null or "" (else the format was found)
    if empty:
        return f"; field {empty[0]!r} is empty on this row"
    if len(keys) == 1:
        found = [c for c in _OTHER_DELIMITERS if c in keys[0]]
        if found:
            flag = "tab" if found[0] == "\t" else shlex.quote(found[0])
            return f"; the row looks delimited by {found[0]!r}: pass --csv-delimiter {flag}"
    hint = _columns_hint(keys)
    if hint:
        return hint
    return "; if your columns hold these fields under other names, map them: --columns query=COLUMN,positive=COLUMN"
