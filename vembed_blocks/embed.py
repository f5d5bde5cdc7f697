"""Batched embedding of items and the query/corpus/relevance split of an evaluation file.

Used for before/after evaluation and for scoring an export on any records file: both turn a
records file into unique queries, a unique corpus and relevance sets, embed each side in
batches with whatever encoder the caller passes, and score with ``retrieval_metrics``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Hashable, Iterable, Sequence, TypeVar

import torch
import torch.distributed as dist

from .distributed import get_rank, get_world_size

__all__ = [
    "RetrievalSet",
    "retrieval_set",
    "embed_items",
    "embed_on_all_ranks",
    "evaluate_retrieval",
    "RELEVANCE",
    "LabelRetrievalSet",
    "retrieval_set_by_label",
    "retrieval_set_for",
    "self_excluded_scores",
    "top_scores",
    "evaluate_retrieval_by",
]

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


def _embed_batches(items: Sequence[T], encode: Callable, batch_size: int, desc: str, log_every_s: float):
    """``encode`` consecutive batches of ``items``, yielding each output on CPU, with progress logs."""
    if batch_size <= 0:
        raise ValueError(f"embed_items: batch_size must be positive, got {batch_size}")
    start = last = time.perf_counter()
    for i in range(0, len(items), batch_size):
        batch = list(items[i : i + batch_size])
        out = encode(batch)
        parts = out if isinstance(out, tuple) else (out,)
        if any(p.shape[0] != len(batch) for p in parts):
            raise ValueError(f"embed_items: encode returned {parts[0].shape[0]} rows for {len(batch)} items")
        yield tuple(p.float().cpu() if p.is_floating_point() else p.cpu() for p in parts)
        now = time.perf_counter()
        if now - last >= log_every_s or i + batch_size >= len(items):
            done = min(i + batch_size, len(items))
            log.info("%s: %d/%d (%.1f items/s)", desc, done, len(items), done / max(now - start, 1e-9))
            last = now


def _concat(batches: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """Concatenate batch outputs position by position, padding dim 1 (token axes) to the longest."""
    out = []
    for parts in zip(*batches):
        if parts[0].dim() >= 2 and len({p.shape[1] for p in parts}) > 1:
            length = max(p.shape[1] for p in parts)
            parts = [torch.cat([p, p.new_zeros(p.shape[0], length - p.shape[1], *p.shape[2:])], 1) for p in parts]
        out.append(torch.cat(parts))
    return tuple(out)


@torch.no_grad()
def embed_items(
    items: Sequence[T],
    encode: Callable[[list[T]], torch.Tensor],
    batch_size: int = 64,
    desc: str = "embed",
    log_every_s: float = 10.0,
) -> torch.Tensor:
    """``encode`` consecutive batches of ``items``; returns ``Tensor[len(items), ...]`` on CPU.

    ``encode(list_of_items) -> Tensor[b, ...]`` does the collation and the forward pass; it may
    also return a tuple of tensors (e.g. token vectors and their mask), and then so does this,
    each padded along dim 1 to the longest batch (zeros / False). Progress is logged
    (``desc: done/total, items/s``) at most every ``log_every_s`` seconds.
    """
    batches = list(_embed_batches(items, encode, batch_size, desc, log_every_s))
    if not batches:
        raise ValueError(f"embed_items: nothing to embed for {desc!r}")
    out = _concat(batches)
    return out if len(out) > 1 else out[0]


@torch.no_grad()
def embed_on_all_ranks(
    items: Sequence[T],
    encode: Callable[[list[T]], torch.Tensor],
    batch_size: int = 64,
    desc: str = "embed",
    log_every_s: float = 10.0,
) -> torch.Tensor:
    """`embed_items` with the work split over ranks; every rank returns all ``len(items)`` rows.

    Each rank encodes an equal slice (the last padded with copies of the first item, dropped
    again), so every rank runs the same number of forwards: what FSDP2 needs, whose forwards
    are collectives. The outputs are exchanged (``all_gather_object``, CPU tensors). At world
    size 1 it is `embed_items`.
    """
    world, rank, n = get_world_size(), get_rank(), len(items)
    if world == 1:
        return embed_items(items, encode, batch_size, desc, log_every_s)
    if n == 0:
        raise ValueError(f"embed_items: nothing to embed for {desc!r}")
    per = -(-n // world)
    mine = list(items[rank * per : (rank + 1) * per])
    mine += [items[0]] * (per - len(mine))  # filler rows, dropped below
    everyone: list = [None] * world
    dist.all_gather_object(everyone, list(_embed_batches(mine, encode, batch_size, desc, log_every_s)))
    out = tuple(x[:n] for x in _concat([b for batches in everyone for b in batches]))
    return out if len(out) > 1 else out[0]


@torch.no_grad()
def evaluate_retrieval(
    records: Iterable,
    encode: Callable[[list, bool], torch.Tensor],
    batch_size: int = 64,
    score: Callable[..., torch.Tensor] | None = None,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Retrieval metrics of ``records``' unique queries against their corpus (`retrieval_set`).

    ``encode(items, is_query)`` embeds a batch (normalised, if cosine is meant); every rank
    embeds an equal share (`embed_on_all_ranks`) and every rank returns the same metrics.
    ``score(queries, docs) -> [Q, N]`` defaults to dot products; for multi-vector outputs
    (``encode`` returning ``(tokens, mask)``) pass e.g. a MaxSim scorer taking both tuples.
    `evaluate_retrieval_by` with ``relevance="positives"``.
    """
    return evaluate_retrieval_by(records, encode, "positives", batch_size, score, ks)


# ----------------------------------------------------------------------------- label relevance (--relevance labels)

RELEVANCE = ("positives", "labels")


@dataclass
class LabelRetrievalSet(RetrievalSet):
    """A `RetrievalSet` whose relevance is "same label", with each query's own corpus row excluded.

    ``query_labels[Q]``, ``doc_labels[N]`` (None: a distractor, relevant to nobody) and
    ``self_doc[q]``: the corpus row holding query q's own item, or None. ``relevant`` already
    leaves that row out; score with `self_excluded_scores` so it is left out of the ranking too.
    """

    query_labels: list = field(default_factory=list)
    doc_labels: list = field(default_factory=list)
    self_doc: list = field(default_factory=list)


def _label_of(labels: dict, item, label, source: str, side: str) -> None:
    """Record ``item``'s label; an item met with two different labels is an error naming the row."""
    seen = labels.setdefault(item, (label, source))
    if seen[0] != label:
        raise ValueError(
            f"{source}: this {side} has label {label!r}, but {seen[1]} gave the same item label {seen[0]!r}; "
            "with --relevance labels every item needs one label"
        )


def retrieval_set_by_label(
    records: Iterable, include_negatives: bool = True, queries_in_corpus: bool = False
) -> LabelRetrievalSet:
    """Unique queries and corpus items of ``records``; relevant = every corpus item with the query's label.

    The corpus is every record's positive (with that record's label), its hard negatives when
    ``include_negatives`` (unlabelled distractors unless also a labelled positive) and, with
    ``queries_in_corpus``, the queries themselves (a set searched against itself: product or class
    retrieval, e.g. Stanford Online Products, CUB). A query whose own item (same text and images) is
    in the corpus never retrieves itself: that row is excluded from its relevance and ranking.
    Every record needs a ``label``; a missing one, or an item with two labels, raises ``ValueError``
    naming ``file:line``.
    """
    labels: dict = {}  # item -> (label, first source): one label per item, as a query or a document
    queries: dict = {}
    labelled_docs: dict = {}
    distractors: dict = {}
    for rec in records:
        if rec.label is None:
            raise ValueError(f"{rec.source}: no 'label' (--relevance labels needs one on every record)")
        _label_of(labels, rec.query, rec.label, rec.source, "query")
        _label_of(labels, rec.positive, rec.label, rec.source, "positive")
        queries.setdefault(rec.query, None)
        labelled_docs.setdefault(rec.positive, None)
        if queries_in_corpus:
            labelled_docs.setdefault(rec.query, None)
        for neg in rec.negatives if include_negatives else ():
            distractors.setdefault(neg, None)
    if not queries:
        raise ValueError("retrieval_set_by_label: no records")
    docs = list(labelled_docs) + [d for d in distractors if d not in labelled_docs]
    doc_labels = [labels[d][0] if d in labelled_docs else None for d in docs]
    row = {d: j for j, d in enumerate(docs)}
    by_label: dict = {}
    for j, lab in enumerate(doc_labels):
        if lab is not None:
            by_label.setdefault(lab, set()).add(j)
    query_labels = [labels[q][0] for q in queries]
    self_doc = [row.get(q) for q in queries]
    relevant = [by_label.get(lab, set()) - {s} for lab, s in zip(query_labels, self_doc)]
    return LabelRetrievalSet(list(queries), docs, relevant, query_labels, doc_labels, self_doc)


def retrieval_set_for(
    records: Iterable, relevance: str = "positives", include_negatives: bool = True, queries_in_corpus: bool = False
) -> RetrievalSet:
    """`retrieval_set` (``relevance="positives"``) or `retrieval_set_by_label` (``"labels"``): what a
    ``--relevance`` flag selects. ``queries_in_corpus`` is for labels only."""
    if relevance not in RELEVANCE:
        raise ValueError(f"relevance must be one of {RELEVANCE}, got {relevance!r}")
    if relevance == "labels":
        return retrieval_set_by_label(records, include_negatives, queries_in_corpus)
    if queries_in_corpus:
        raise ValueError("queries_in_corpus needs relevance='labels' (a positive-pair file has no label to match)")
    return retrieval_set(records, include_negatives)


def self_excluded_scores(rs: RetrievalSet, scores: torch.Tensor) -> torch.Tensor:
    """``scores[Q, N]`` with each query's own corpus row (`LabelRetrievalSet.self_doc`) set to ``-inf``.

    Ranked last and irrelevant, that row changes no metric at any cut-off: the same as removing it.
    A plain `RetrievalSet` has no such rows: ``scores`` is returned as is.
    """
    pairs = [(q, d) for q, d in enumerate(getattr(rs, "self_doc", [])) if d is not None]
    if not pairs:
        return scores
    scores = scores.clone()
    rows, cols = zip(*pairs)
    scores[list(rows), list(cols)] = float("-inf")
    return scores


@torch.no_grad()
def top_docs(
    rs: RetrievalSet, q: torch.Tensor, d: torch.Tensor, k: int, chunk_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores[Q, k], doc indices[Q, k])``: each query's ``k`` best documents by dot product, best first, ties
    to the lower index, the query's own item (`LabelRetrievalSet.self_doc`) never among them (`mining.top_k_tiled`:
    one ``[chunk_size, block]`` tile of scores at a time, never ``[Q, N]``)."""
    from .mining import top_k_tiled

    own = [(i, j) for i, j in enumerate(getattr(rs, "self_doc", [])) if j is not None]
    self_doc = torch.full((q.shape[0],), -1, dtype=torch.long)
    if own:
        self_doc[[i for i, _ in own]] = torch.tensor([j for _, j in own])

    def skip_self(tile: torch.Tensor, qs: int, start: int) -> None:
        p = self_doc[qs : qs + len(tile)] - start
        rows = ((p >= 0) & (p < tile.shape[1])).nonzero()[:, 0]
        tile[rows, p[rows]] = float("-inf")

    return top_k_tiled(q, d, min(k, d.shape[0]), chunk_size, mask=skip_self if own else None)


def top_scores(
    rs: RetrievalSet,
    q: torch.Tensor,
    d: torch.Tensor,
    depth: int,
    chunk_size: int = 1024,
    best: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, list[set[int]]]:
    """``(scores[Q, M], relevant)`` that rank like ``self_excluded_scores(rs, q @ d.T)`` with ``rs.relevant``
    for every metric cut-off up to ``depth``, without the ``[Q, N]`` matrix.

    ``q[Q, D]``, ``d[N, D]``: dot products. Each row's top ``min(depth, N)`` documents (`mining.top_k_tiled`,
    ties to the lower index; the query's own item, `LabelRetrievalSet.self_doc`, masked ``-inf`` in its tile)
    become columns ``0..depth-1`` in rank order; its relevant documents outside them are ``-inf`` columns after
    those (beyond every cut-off, but counted in ``|R|`` as recall and nDCG need), the rest ``-inf`` padding:
    ``M = depth + max_q |R_q - top_q|``. Where that reaches N, the full matrix is returned (no larger than
    today's). Exact: the metrics read only the top ``depth`` ranks and ``|R|``; only BLAS rounding of the
    tiles' matmul shape (1 ulp) can reorder near-equal scores, as any chunking may. ``best``: the
    ``top_docs(rs, q, d, k)`` a caller already has, for any ``k >= depth`` (its k columns are used), so the
    corpus is not ranked twice.
    """
    n = d.shape[0]
    want = min(max(1, depth), n)
    val, idx = best if best is not None else top_docs(rs, q, d, want, chunk_size)
    if val.shape[1] < want:
        raise ValueError(f"top_scores: best has {val.shape[1]} columns, fewer than depth {want}")
    depth = val.shape[1]
    inside = [{c for c, j in enumerate(row) if j in rel} for row, rel in zip(idx.tolist(), rs.relevant)]
    missing = [len(rel) - len(cols) for rel, cols in zip(rs.relevant, inside)]
    extra = max(missing, default=0)
    if depth + extra >= n:
        return self_excluded_scores(rs, q @ d.T), rs.relevant
    scores = torch.cat([val, val.new_full((len(val), extra), float("-inf"))], 1)
    return scores, [cols | set(range(depth, depth + m)) for cols, m in zip(inside, missing)]


@torch.no_grad()
def evaluate_retrieval_by(
    records: Iterable,
    encode: Callable[[list, bool], torch.Tensor],
    relevance: str = "positives",
    batch_size: int = 64,
    score: Callable[..., torch.Tensor] | None = None,
    ks: Sequence[int] = (1, 5, 10),
    curve_k: int = 0,
    widths: Sequence[int] = (),
) -> dict:
    """`evaluate_retrieval` with relevance by ``"positives"`` or ``"labels"`` (`retrieval_set_for`; the
    query's own item excluded): what a training recipe's evaluation calls for a ``--relevance`` flag.

    ``curve_k > 0`` adds ``"recall_curve"``: ``[recall@1, ..., recall@curve_k]`` (`metrics.recall_curve`), a list
    beside the numbers (`run_log.write_metrics` moves it to ``metrics.json``'s top level for the report).
    A NaN or inf embedding (query or document) raises ``ValueError`` naming how many and the first row
    (`metrics.check_finite`) instead of ranking NaN scores first. Queries or documents that are all one vector
    (`metrics.check_embeddings`: a tokenizer that does not cover the data, a collapsed model) are logged as
    a warning on rank 0; the metrics are still computed. With ``score=None`` (dot products) it ranks through
    `top_scores`: each query's top ``max(ks, curve_k)`` documents, tiled, never the ``[Q, N]`` score matrix.

    ``widths`` (Matryoshka): the embeddings are computed once; for each width ``w`` the same metrics are computed
    again on the first ``w`` dimensions of the query and document embeddings, each row re-normalised to unit L2
    length, scored as above (``score`` on the prefixes, or `top_scores`), and added as ``f"dim{w}/{metric}"``
    (``"dim64/recall@1"``); the plain keys stay the full width, ``"recall_curve"`` too. A width below 1 or above the
    embedding's, or any width with a multi-vector (tuple) output, raises ``ValueError`` (before the corpus is
    embedded)."""
    from .metrics import check_embeddings, check_finite, recall_curve, retrieval_metrics

    widths = list(dict.fromkeys(widths))
    if any(w < 1 for w in widths):
        raise ValueError(f"evaluate_retrieval_by: widths must be >= 1, got {min(widths)}")
    rs = retrieval_set_for(records, relevance)
    q = embed_on_all_ranks(rs.queries, lambda items: encode(items, True), batch_size, "embed queries")
    check_finite(q, "query embeddings")  # before the corpus is embedded; every rank holds all rows: all raise
    if widths and isinstance(q, tuple):
        raise ValueError("evaluate_retrieval_by: widths need single-vector embeddings; encode returned a tuple")
    if widths and max(widths) > q.shape[-1]:
        raise ValueError(f"evaluate_retrieval_by: width {max(widths)} is larger than the embedding ({q.shape[-1]})")
    d = embed_on_all_ranks(rs.docs, lambda items: encode(items, False), batch_size, "embed corpus")
    check_finite(d, "document embeddings")
    for what, emb in (("query embeddings", q), ("document embeddings", d)):
        parts = emb if isinstance(emb, tuple) else (emb,)  # a multi-vector encoder's (tokens, mask)
        masks = [p for p in parts[1:] if p.dtype == torch.bool]
        finding = check_embeddings(what, parts[0], masks[0] if masks and parts[0].dim() == 3 else None)
        if finding and get_rank() == 0:  # every rank holds all rows: one warning is enough
            log.warning(finding)

    def ranked(q, d, depth: int) -> tuple[torch.Tensor, list[set[int]]]:
        if score is None:  # dot products: only each query's top max(ks, curve_k), never the [Q, N] matrix
            return top_scores(rs, q, d, depth)
        return self_excluded_scores(rs, score(q, d)), rs.relevant

    scores, relevant = ranked(q, d, max([*ks, curve_k, 1]))
    metrics: dict = retrieval_metrics(scores, relevant, ks=ks)
    if curve_k > 0:
        metrics["recall_curve"] = recall_curve(scores, relevant, max_k=curve_k)
    for w in widths:  # Matryoshka prefixes of the same embeddings, each row back to unit length
        prefix = [torch.nn.functional.normalize(x[..., :w], dim=-1) for x in (q, d)]
        at_w = retrieval_metrics(*ranked(*prefix, max([*ks, 1])), ks=ks)
        metrics.update({f"dim{w}/{name}": v for name, v in at_w.items()})
    return metrics
