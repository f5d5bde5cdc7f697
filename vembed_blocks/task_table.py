"""One policy per task: a small table (JSONL or CSV) saying how each task of a multi-task run trains.

A multi-task embedding run mixes data that want different treatment: short text pairs at a batch of 1024 and
image pairs at 64, a classification task whose other rows must not be negatives (rows of one class share the
positive), its own temperature, instruction and Matryoshka widths. ``read_task_table`` reads one row per task::

    {"name": "retrieval", "data": "pairs.jsonl", "val_data": "pairs_val.jsonl", "weight": 2, "batch_size": 64}
    {"name": "classify", "data": "labels.jsonl", "in_batch_negatives": false, "temperature": 0.02,
     "query_instruction": "Classify the image by its shape", "num_negatives": 3, "mrl_dims": [64, 32]}

(one JSON object per line), or the same columns in a CSV (``mrl_dims`` as ``"64,32"``; an empty cell is "not
given"). Relative paths are relative to the table's folder. A field not given takes the run's value
(``defaults``: the recipe's flags), so a table can name only what differs. Errors name ``file:line`` and
the field. `TaskCollate` tags each collated batch with its task, so a loop picks the task's loss by name.

Imports: the standard library, `user_errors` (`task_table_batches`: `data.loader`, `data.row_files`, inside it).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .user_errors import UserError

__all__ = ["TaskPolicy", "TaskCollate", "TaskTableError", "read_task_table", "task_table_batches", "TASK_FIELDS"]


@dataclass(frozen=True)
class TaskPolicy:
    """How one task trains. ``batch_size`` is per rank; ``mrl_dims`` ``()`` means no Matryoshka widths."""

    name: str
    data: str
    val_data: str | None = None
    weight: float = 1.0
    batch_size: int = 32
    in_batch_negatives: bool = True
    temperature: float = 0.05
    query_instruction: str | None = None
    doc_instruction: str | None = None
    num_negatives: int = 0
    mrl_dims: tuple[int, ...] = ()
    format: str | None = None


TASK_FIELDS = tuple(f.name for f in dataclasses.fields(TaskPolicy))
_REQUIRED = ("name", "data")
_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


class TaskTableError(UserError):
    """A bad task table: the message names ``file:line`` and the field."""


class TaskCollate:
    """``collate(records)`` with ``"task": name`` added: the loop reads which task's policy a batch follows."""

    def __init__(self, name: str, collate: Callable[[list], dict]) -> None:
        self.name, self.collate = name, collate

    def __call__(self, records: list) -> dict:
        return {**self.collate(records), "task": self.name}


def read_task_table(path: str | os.PathLike, defaults: Mapping[str, Any] | None = None) -> dict[str, TaskPolicy]:
    """``{name: TaskPolicy}`` in the table's order, from a ``.jsonl`` or ``.csv`` file (see the module docstring).

    ``defaults``: values of fields a row leaves out (e.g. ``{"batch_size": 32, "temperature": 0.05}``).
    ``TaskTableError`` (file:line, field) for: an unknown field, a missing ``name`` / ``data``, a repeated
    name, a name with ``/`` (metrics are keyed ``task/metric``), a value of the wrong type or range, a data
    file that does not exist; and for a table without rows."""
    path = os.fspath(path)
    rows = list(_csv_rows(path) if path.lower().endswith((".csv", ".tsv")) else _jsonl_rows(path))
    if not rows:
        raise TaskTableError(f"{path}: no task rows (one JSON object per line, or a CSV header and rows)")
    base = {k: v for k, v in (defaults or {}).items() if k in TASK_FIELDS and v is not None}
    folder = os.path.dirname(os.path.abspath(path))
    tasks: dict[str, TaskPolicy] = {}
    for where, raw in rows:
        policy = _policy(where, {**base, **raw}, folder)
        if policy.name in tasks:
            raise TaskTableError(f"{where}: task {policy.name!r} is named twice")
        tasks[policy.name] = policy
    return tasks


def _jsonl_rows(path: str):
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskTableError(f"{path}:{n}: not JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise TaskTableError(f"{path}:{n}: a task row is a JSON object, got {type(row).__name__}")
            yield f"{path}:{n}", row


def _csv_rows(path: str):
    with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: Excel's byte-order mark
        reader = csv.DictReader(f, delimiter="\t" if path.lower().endswith(".tsv") else ",")
        for row in reader:
            if None in row:
                raise TaskTableError(f"{path}:{reader.line_num}: more cells than the header has columns")
            yield f"{path}:{reader.line_num}", {k.strip(): v for k, v in row.items() if v is not None and v.strip()}


def _policy(where: str, row: dict[str, Any], folder: str) -> TaskPolicy:
    unknown = sorted(set(row) - set(TASK_FIELDS))
    if unknown:
        raise TaskTableError(f"{where}: unknown field(s) {unknown}; a task row has {list(TASK_FIELDS)}")
    missing = [k for k in _REQUIRED if k not in row]
    if missing:
        raise TaskTableError(f"{where}: missing {missing} (every task needs a name and a data file)")
    out = {k: _value(where, k, v) for k, v in row.items()}
    if not out["name"] or "/" in out["name"]:
        raise TaskTableError(f"{where}: name {out['name']!r} must be non-empty and without '/' (metrics: task/name)")
    for key in ("data", "val_data"):
        if out.get(key):
            out[key] = os.path.join(folder, os.path.expanduser(out[key]))  # an absolute path stays as it is
            if not os.path.exists(out[key]):
                raise TaskTableError(f"{where}: {key} {out[key]} does not exist")
    return TaskPolicy(**out)


def _value(where: str, key: str, value: Any) -> Any:
    """One field, converted from JSON or CSV text and checked."""
    bad = lambda want: TaskTableError(f"{where}: {key} must be {want}, got {value!r}")  # noqa: E731
    if key in ("name", "data", "val_data", "query_instruction", "doc_instruction", "format"):
        if value is not None and not isinstance(value, str):
            raise bad("text")
        return value
    if key == "in_batch_negatives":
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if key == "mrl_dims":
        dims = value.split(",") if isinstance(value, str) else value
        try:
            dims = tuple(_integer(d) for d in dims)
        except (TypeError, ValueError):
            raise bad('a list of widths, e.g. [64, 32] (CSV: "64,32")') from None
        if any(d < 1 for d in dims) or len(set(dims)) != len(dims):
            raise bad("distinct widths >= 1")
        return dims
    number = _number(value)
    if key in ("batch_size", "num_negatives"):
        if number is None or number != int(number) or number < (1 if key == "batch_size" else 0):
            raise bad("an integer >= 1" if key == "batch_size" else "an integer >= 0")
        return int(number)
    if number is None or not math.isfinite(number) or number < 0 or (key == "temperature" and number == 0):
        raise bad("a number > 0" if key == "temperature" else "a number >= 0")
    return float(number)


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _integer(value: Any) -> int:
    number = _number(value.strip() if isinstance(value, str) else value)
    if number is None or number != int(number):
        raise ValueError(value)
    return int(number)


def task_table_batches(
    tasks: Mapping[str, TaskPolicy],
    collate_for: Callable[[TaskPolicy], Callable[[list], dict]],
    *,
    seed: int,
    rank: int,
    world_size: int,
    num_workers: int = 2,
    grad_accum_steps: int = 1,
    skip_bad: bool = False,
    max_bad_fraction: float = 0.01,
    columns: Mapping[str, str] | None = None,
    delimiter: str | None = None,
) -> tuple[Any, dict[str, int]]:
    """``(TaskLoader, {task: rows})``: every task's ``data`` file read (``format``, ``columns``, ``delimiter``,
    ``skip_bad`` as for one training file), drawn by weight, ``batch_size`` rows per rank from the drawn task,
    collated by ``TaskCollate(name, collate_for(policy))``. Each file's fingerprint and row count are the
    loader's identity: a resume on changed data, or with another table, is refused."""
    from .data.loader import file_fingerprint, task_loader
    from .data.row_files import read_file

    records, identity, skipped = {}, {}, 0
    for name, t in tasks.items():
        options = dict(format=t.format, columns=columns, delimiter=delimiter)
        records[name], reader = read_file(t.data, skip_bad, max_bad_fraction, **options)
        identity[name] = {**file_fingerprint(t.data), "rows": len(records[name])}
        skipped += reader.skipped
    loader, _ = task_loader(
        records,
        {name: TaskCollate(name, collate_for(t)) for name, t in tasks.items()},
        batch_size={name: t.batch_size for name, t in tasks.items()},
        weights={name: t.weight for name, t in tasks.items()},
        seed=seed,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        grad_accum_steps=grad_accum_steps,
        identity={"tasks": identity},
        skip_bad=skip_bad,
        read_skipped=skipped,
    )
    return loader, {name: len(rows) for name, rows in records.items()}
