"""Precomputed teacher embeddings for distillation, looked up per batch of records.

`TeacherStore(folder)` reads either a row-aligned file (``teacher.safetensors`` with ``query``
and ``doc`` ``[R, Dt]``: row i = record i of the training file) or the files an evaluation
that saves its embeddings writes (``queries.safetensors`` / ``corpus.safetensors`` + ``items.json``,
looked up by text). `NumberedRecords` tags each record with its row, so the row-aligned
kind finds its embeddings without the text.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import torch
from safetensors.torch import load_file

__all__ = ["NumberedRecords", "TeacherStore"]


class NumberedRecords:
    """``records[i]`` with ``extra["row"] = i``: row-aligned teacher embeddings are found by it."""

    def __init__(self, records: Sequence[Any]) -> None:
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        rec = self.records[i]
        return dataclasses.replace(rec, extra={**rec.extra, "row": int(i)})


class TeacherStore:
    """Precomputed teacher embeddings: ``store(records) -> (query[B, Dt], doc[B + M, Dt])``.

    Docs are the B positives, then the M hard negatives in the collator's (row-major) order.
    """

    def __init__(self, folder: str) -> None:
        self.aligned = os.path.exists(os.path.join(folder, "teacher.safetensors"))
        if self.aligned:
            t = load_file(os.path.join(folder, "teacher.safetensors"))
            self.query, self.doc = t["query"], t["doc"]
            return
        self.query = load_file(os.path.join(folder, "queries.safetensors"))["embeddings"]
        self.doc = load_file(os.path.join(folder, "corpus.safetensors"))["embeddings"]
        with open(os.path.join(folder, "items.json")) as f:
            items = json.load(f)
        self.row_of = {side: {it["text"]: i for i, it in enumerate(items[side])} for side in ("queries", "corpus")}

    def _rows(self, side: str, pairs: list) -> list[int]:
        missing = [(r.source, it.text) for r, it in pairs if it.text not in self.row_of[side]]
        if missing:
            raise KeyError(
                f"{missing[0][0]}: {missing[0][1]!r} is not in the teacher embeddings ({len(missing)} missing)"
            )
        return [self.row_of[side][it.text] for _, it in pairs]

    def __call__(self, records: list) -> tuple[torch.Tensor, torch.Tensor]:
        if self.aligned:
            rows = [r.extra["row"] for r in records]
            return self.query[rows], self.doc[rows]
        docs = [(r, r.positive) for r in records] + [(r, n) for r in records for n in r.negatives]
        return self.query[self._rows("queries", [(r, r.query) for r in records])], self.doc[self._rows("corpus", docs)]
