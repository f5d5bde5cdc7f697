"""Batched embedding of items and the query/corpus/relevance split of an evaluation file.

Used by the recipes' before/after evaluation and by ``recipes/evaluate.py``: both turn a
records file into unique queries, a unique corpus and relevance sets, embed each side in
batches with whatever encoder the caller passes, and score with ``retrieval_metrics``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Hashable, Iterable, Sequence, TypeVar

import torch

__all__ = ["RetrievalSet", "retrieval_set", "embed_items"]

log = logging.getLogger(__name__)
T = TypeVar("T", bound=Hashable)


@dataclass
class RetrievalSet:
    """``queries[Q]`` and ``docs[N]`` (unique items) and ``relevant[q]`` = indices into docs."""

    queries: list
    docs: list
    relevant: list[set[int]]


def retrieval_set(records: Iterable, include_negatives: bool = True) -> RetrievalSet:
    """Unique queries and documents of ``records`` (objects with ``.query``, ``.positive``, ``.negatives``).

    Items are compared by value (same text and same images = same item). A query that
    appears in several records is relevant to all their positives (e.g. an image with five
    captions in I2T). Hard negatives join the corpus as distractors when
    ``include_negatives``; they are relevant to nobody unless also some record's positive.
    """
    q_index: dict = {}
    d_index: dict = {}
    relevant: list[set[int]] = []

    def doc(item) -> int:
        return d_index.setdefault(item, len(d_index))

    for rec in records:
        qi = q_index.setdefault(rec.query, len(q_index))
        if qi == len(relevant):
            relevant.append(set())
        relevant[qi].add(doc(rec.positive))
        if include_negatives:
            for neg in rec.negatives:
                doc(neg)
    if not q_index:
        raise ValueError("retrieval_set: no records")
    return RetrievalSet(list(q_index), list(d_index), relevant)


@torch.no_grad()
def embed_items(
    items: Sequence[T],
    encode: Callable[[list[T]], torch.Tensor],
    batch_size: int = 64,
    desc: str = "embed",
    log_every_s: float = 10.0,
) -> torch.Tensor:
    """``encode`` consecutive batches of ``items``; returns ``Tensor[len(items), ...]`` on CPU.

    ``encode(list_of_items) -> Tensor[b, ...]`` does the collation and the forward pass.
    Progress is logged (``desc: done/total, items/s``) at most every ``log_every_s`` seconds.
    """
    if batch_size <= 0:
        raise ValueError(f"embed_items: batch_size must be positive, got {batch_size}")
    out, start, last = [], time.perf_counter(), time.perf_counter()
    for i in range(0, len(items), batch_size):
        batch = list(items[i : i + batch_size])
        emb = encode(batch)
        if emb.shape[0] != len(batch):
            raise ValueError(f"embed_items: encode returned {emb.shape[0]} rows for {len(batch)} items")
        out.append(emb.float().cpu())
        now = time.perf_counter()
        if now - last >= log_every_s or i + batch_size >= len(items):
            done = min(i + batch_size, len(items))
            log.info("%s: %d/%d (%.1f items/s)", desc, done, len(items), done / max(now - start, 1e-9))
            last = now
    if not out:
        raise ValueError(f"embed_items: nothing to embed for {desc!r}")
    return torch.cat(out)
