"""Retrieval metrics (trec_eval definitions) and chunked top-k search.

Conventions, stated once:
- Ranking: documents sorted by score, highest first; ties go to the lower document index
  (a stable sort), so results are deterministic.
- Relevance is binary. ``relevant`` is either Q sets of document indices (a list or tuple),
  or a tuple ``(query_labels[Q], doc_labels[N])`` meaning "same label is relevant". A tuple
  is read as labels only when it is two ordered label vectors of exactly those lengths (sets
  never are); anything else that is not Q sets of indices raises ``ValueError``.
- A query with no relevant document is left out of every average (as trec_eval does,
  since it has no qrels); if no query has one, ``ValueError``.
- ``exclude_self=True`` (I2I with the corpus as its own queries, Q == N) removes document i
  from query i's ranking and relevance before anything is computed.
- Non-finite input is refused, not ranked (a NaN sorts first and would count as a hit):
  `check_finite` for embeddings, and scores holding NaN or +inf raise ``ValueError``; ``-inf``
  is allowed and ranks a document last (how `embed.self_excluded_scores` removes one).

Per query, with ``R`` its relevant set and ``rank(d)`` 1-based:
- ``recall@k`` = |R ∩ top-k| / |R|               (trec_eval recall_k)
- ``hit@k``    = 1 if R ∩ top-k else 0            (the "R@k" of CLIP-style papers)
- ``mrr@k``    = 1 / rank of the first relevant doc in the top k, else 0
- ``ndcg@k``   = sum_{d in R ∩ top-k} 1/log2(rank(d)+1) / sum_{i=1..min(k,|R|)} 1/log2(i+1)
- ``map@k``    = sum_{d in R ∩ top-k} precision@rank(d) / |R|   (trec_eval map_cut_k)
"""

from __future__ import annotations

import itertools
import math
import operator
from typing import Iterable, Sequence

import torch

__all__ = [
    "check_embeddings",
    "check_finite",
    "recall_curve",
    "retrieval_metrics",
    "search",
    "relevance_from_labels",
    "format_table",
]

SAME_VECTOR_TOLERANCE = 1e-6  # rows are one vector when max over rows of 1 - cos(row, mean row) is below this
_CHECK_ELEMENTS = 1 << 24  # entries checked at once: a bounded [rows, D] bool temporary, even for a huge corpus


def mean_token_vectors(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``x[N, T, D]`` -> ``[N, D]``: the mean over real tokens (``mask[N, T]``, True = real)."""
    m = (mask if mask is not None else torch.ones(x.shape[:2], dtype=torch.bool)).to(x.device).unsqueeze(-1).float()
    return (x.float() * m).sum(1) / m.sum(1).clamp(min=1)


def embedding_spread(x: torch.Tensor, chunk: int = 65536) -> float:
    """max over rows of ``1 - cos(row, mean row)`` of ``x[N, D]`` in float64, chunked (no float64 copy of x);
    0.0 when every row is zero (those are one vector too), 1.0 for a zero row beside non-zero ones."""
    x = x.detach().flatten(1)
    mean = x.sum(0, dtype=torch.float64) / len(x)
    worst, all_zero = 0.0, True
    for part in x.split(chunk):
        part = part.double()
        norms = part.norm(dim=1)
        all_zero &= bool((norms == 0).all())
        cos = part @ mean / (norms * mean.norm()).clamp_min(1e-300)
        worst = max(worst, float((1 - cos).max()))
    return 0.0 if all_zero else worst


def check_embeddings(name: str, emb: torch.Tensor, mask: torch.Tensor | None = None) -> str | None:
    """A one-line finding when the ``N >= 2`` rows of ``emb[N, D]`` are all (nearly) one vector, else None.

    Multi-vector ``emb[N, T, D]`` (``mask[N, T]``, True = real token) is compared by each row's mean token
    vector. The measure: max over rows of ``1 - cos(row, mean row)`` below `SAME_VECTOR_TOLERANCE`."""
    rows = mean_token_vectors(emb, mask) if emb.dim() == 3 else emb
    if len(rows) < 2:
        return None
    spread = embedding_spread(rows)
    if spread >= SAME_VECTOR_TOLERANCE:
        return None
    pooled = " (each row's mean token vector)" if emb.dim() == 3 else ""
    return (
        f"{name}: all {len(rows)} rows are the same vector{pooled}, max over rows of 1 - cos(row, mean row) = "
        f"{spread:.1e} (< {SAME_VECTOR_TOLERANCE:g}): the model maps every input to one embedding (a tokenizer "
        "that does not cover the data, empty inputs, a collapsed model?), so its retrieval metrics mean nothing"
    )


def check_finite(
    emb: torch.Tensor | tuple[torch.Tensor, ...], what: str, action: str = "compute retrieval metrics"
) -> None:
    """Raise ``ValueError`` if any row of ``emb[N, ...]`` holds NaN or inf, naming how many rows and the first.

    ``what`` names the rows (``"query embeddings"``), ``action`` what is refused. A tuple (a
    multi-vector encoder's output) has each floating tensor checked; with a bool mask in it
    (``(tokens[N, T, D], mask[N, T])``) only real tokens count, since padding is never scored.
    Costs one host sync when every row is finite.
    """
    parts = emb if isinstance(emb, tuple) else (emb,)
    mask = next((p for p in parts if p.dtype == torch.bool), None)
    for x in parts:
        if not x.is_floating_point() or x.numel() == 0:
            continue
        m = mask if mask is not None and x.dim() > mask.dim() and x.shape[: mask.dim()] == mask.shape else None
        step = max(1, _CHECK_ELEMENTS // max(1, x[0].numel()))
        row_ok = torch.cat([_finite_rows(x[i : i + step], m, i) for i in range(0, len(x), step)])
        if bool(row_ok.all()):
            continue
        bad = (~row_ok).nonzero().flatten().tolist()
        nan = torch.isnan(x[bad[0]])
        if m is not None:
            nan = nan.reshape(*m.shape[1:], -1).any(-1) & m[bad[0]]
        raise ValueError(
            f"{len(bad)} of {len(x)} {what} are not finite (NaN/inf), first row {bad[0]}: "
            f"the model produced {'NaN' if bool(nan.any()) else 'inf'}; refusing to {action}"
        )


def _finite_rows(x: torch.Tensor, mask: torch.Tensor | None, start: int) -> torch.Tensor:
    """``[rows]`` bool: whether every (real, if ``mask``) entry of each row of ``x`` is finite."""
    ok = torch.isfinite(x)
    if mask is not None:
        ok = ok.flatten(mask.dim()).all(-1) | ~mask[start : start + len(x)]
    return ok.reshape(len(x), -1).all(1)


def _check_scores(scores: torch.Tensor, caller: str) -> None:
    """Raise ``ValueError`` if a row of ``scores[Q, N]`` holds NaN or +inf (``-inf`` ranks a document last)."""
    if not scores.is_floating_point():
        return
    row_ok = scores.amax(dim=1) < float("inf")  # max propagates NaN and is +inf with one: [Q], no [Q, N] temporary
    if bool(row_ok.all()):
        return
    bad = (~row_ok).nonzero().flatten().tolist()
    kind = "NaN" if bool(torch.isnan(scores[bad[0]]).any()) else "+inf"
    raise ValueError(
        f"{caller}: {len(bad)} of {len(row_ok)} rows of scores hold NaN or +inf, first row {bad[0]} ({kind}); "
        "refusing to compute retrieval metrics (-inf is allowed: it ranks a document last)"
    )


def relevance_from_labels(query_labels: Sequence | torch.Tensor, doc_labels: Sequence | torch.Tensor) -> list[set[int]]:
    """``relevant[i] = {j : doc_labels[j] == query_labels[i]}``."""
    by_label: dict = {}
    for j, lab in enumerate(_as_list(doc_labels)):
        by_label.setdefault(lab, set()).add(j)
    return [set(by_label.get(lab, ())) for lab in _as_list(query_labels)]


def _as_list(x) -> list:
    return x.tolist() if hasattr(x, "tolist") else list(x)


def _is_label_vector(x, n: int) -> bool:
    """An ordered 1-D run of ``n`` scalar labels (ints, strings, ...). Sets are never label
    vectors: they have no order, so a tuple of sets can only mean one relevant set per query."""
    if isinstance(x, (set, frozenset, str, bytes)) or not hasattr(x, "__len__"):
        return False
    if hasattr(x, "ndim"):  # tensor / ndarray
        return x.ndim == 1 and len(x) == n
    return len(x) == n and all(isinstance(v, (str, bytes)) or not isinstance(v, Iterable) for v in x)


def _expected(relevant, num_queries: int, num_docs: int) -> str:
    """What ``relevant`` may be and what was passed (container, length, first element lengths)."""
    got = type(relevant).__name__
    if hasattr(relevant, "__len__") and not isinstance(relevant, (str, bytes)):
        lengths = [len(r) if hasattr(r, "__len__") else type(r).__name__ for r in itertools.islice(relevant, 4)]
        got = f"a {got} of {len(relevant)} with element lengths {lengths}{'...' * (len(relevant) > 4)}"
    return (
        f"expected {num_queries} relevance sets (document indices, one per query) or a pair "
        f"(query_labels[{num_queries}], doc_labels[{num_docs}]); got {got}"
    )


def _relevant_sets(relevant, num_queries: int, num_docs: int) -> list[set[int]]:
    """Read ``relevant`` as a label pair or as per-query sets; the two readings never overlap.

    A tuple is a label pair only when it holds exactly two label vectors of lengths Q and N;
    anything else must be Q collections of document indices (so a 2-tuple of sets with Q == 2
    is two relevant sets, as the caller meant).
    """
    if (
        isinstance(relevant, tuple)
        and len(relevant) == 2
        and _is_label_vector(relevant[0], num_queries)
        and _is_label_vector(relevant[1], num_docs)
    ):
        return relevance_from_labels(*relevant)
    try:  # operator.index: document indices must be integers (2.7 or "a" is a mistake, not doc 2)
        sets = [{operator.index(j) for j in r} for r in relevant]
    except TypeError as e:
        raise ValueError(f"retrieval_metrics: {_expected(relevant, num_queries, num_docs)} ({e})") from e
    if len(sets) != num_queries:
        raise ValueError(
            f"retrieval_metrics: {len(sets)} relevance sets for {num_queries} queries; "
            f"{_expected(relevant, num_queries, num_docs)}"
        )
    for i, r in enumerate(sets):
        bad = [j for j in r if not 0 <= j < num_docs]
        if bad:
            raise ValueError(f"retrieval_metrics: query {i} lists document(s) {bad[:5]} outside 0..{num_docs - 1}")
    return sets


def _query_metrics(ranked: list[int], rel: set[int], ks: Iterable[int]) -> dict[str, float]:
    hits = [d in rel for d in ranked]
    out = {}
    for k in ks:
        top = hits[:k]
        found = sum(top)
        first = next((i for i, h in enumerate(top) if h), None)
        dcg = sum(1.0 / math.log2(i + 2) for i, h in enumerate(top) if h)
        idcg = sum(1.0 / math.log2(i + 2) for i in range(min(k, len(rel))))
        precisions, seen = [], 0
        for i, h in enumerate(top):
            if h:
                seen += 1
                precisions.append(seen / (i + 1))
        out[f"recall@{k}"] = found / len(rel)
        out[f"hit@{k}"] = float(found > 0)
        out[f"mrr@{k}"] = 0.0 if first is None else 1.0 / (first + 1)
        out[f"ndcg@{k}"] = dcg / idcg
        out[f"map@{k}"] = sum(precisions) / len(rel)
    return out


def retrieval_metrics(
    scores: torch.Tensor,
    relevant: Sequence[Iterable[int]] | tuple,
    ks: Sequence[int] = (1, 5, 10),
    exclude_self: bool = False,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Average ``recall@k``, ``hit@k``, ``mrr@k``, ``ndcg@k``, ``map@k`` over queries.

    ``scores[Q, N]`` (tensor or array; higher = more similar). See the module docstring
    for the exact definitions, tie-breaking and the treatment of queries without a
    relevant document. Rows are ranked ``chunk_size`` queries at a time.
    """
    scores = torch.as_tensor(scores)
    if scores.dim() != 2 or 0 in scores.shape:
        raise ValueError(f"retrieval_metrics: scores must be a non-empty [Q, N] matrix, got {tuple(scores.shape)}")
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] <= 0:
        raise ValueError(f"retrieval_metrics: ks must be positive integers, got {ks}")
    _check_scores(scores, "retrieval_metrics")
    num_q, num_d = scores.shape
    relevant = _relevant_sets(relevant, num_q, num_d)
    if exclude_self:
        if num_q != num_d:
            raise ValueError(f"retrieval_metrics: exclude_self needs Q == N, got {num_q} x {num_d}")
        relevant = [r - {i} for i, r in enumerate(relevant)]
    depth = min(ks[-1], num_d)
    totals: dict[str, float] = {}
    counted = 0
    for start in range(0, num_q, chunk_size):
        block = scores[start : start + chunk_size].float().clone()
        if exclude_self:
            rows = torch.arange(block.shape[0])
            block[rows, start + rows] = float("-inf")
        order = torch.sort(block, dim=1, descending=True, stable=True).indices[:, :depth].tolist()
        for i, ranked in enumerate(order):
            rel = relevant[start + i]
            if not rel:
                continue
            if exclude_self:
                ranked = [d for d in ranked if d != start + i]
            counted += 1
            for name, v in _query_metrics(ranked, rel, ks).items():
                totals[name] = totals.get(name, 0.0) + v
    if counted == 0:
        raise ValueError("retrieval_metrics: no query has a relevant document")
    return {name: v / counted for name, v in totals.items()}


@torch.no_grad()
def search(
    query_emb: torch.Tensor, doc_emb: torch.Tensor, k: int, chunk_size: int = 65536
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k documents by dot product, ``chunk_size`` documents at a time.

    ``query_emb[Q, D]``, ``doc_emb[N, D]`` (normalise both first for cosine). Returns
    ``(scores[Q, k], indices[Q, k])``, best first, ties to the lower document index. Only
    ``Q x (k + chunk_size)`` scores exist at any moment, never ``Q x N``: the miner's tiled top-k
    (`mining.top_k_tiled`, one query chunk of all Q). A NaN or inf embedding raises ``ValueError``
    (`check_finite`).
    """
    from .mining import top_k_tiled

    if query_emb.dim() != 2 or doc_emb.dim() != 2 or query_emb.shape[1] != doc_emb.shape[1]:
        raise ValueError(f"search: need [Q, D] and [N, D], got {tuple(query_emb.shape)} and {tuple(doc_emb.shape)}")
    num_d = doc_emb.shape[0]
    if not 0 < k <= num_d:
        raise ValueError(f"search: k must be in 1..{num_d}, got {k}")
    if chunk_size <= 0:
        raise ValueError(f"search: chunk_size must be positive, got {chunk_size}")
    check_finite(query_emb, "query embeddings", "search")
    check_finite(doc_emb, "document embeddings", "search")
    return top_k_tiled(query_emb, doc_emb, k, max(1, query_emb.shape[0]), candidate_block=chunk_size)


def format_table(
    before: dict[str, float],
    after: dict[str, float] | None = None,
    names: Sequence[str] | None = None,
    label: str = "before",
) -> str:
    """A plain-text table of ``names`` from ``before`` (headed ``label``; and ``after``, as a second column).

    ``names`` defaults to the headline retrieval metrics (recall@1/5/10, mrr@10, ndcg@10), also behind prefixes
    (``"colour/recall@1"``, ``"dim64/recall@1"``: grouped by prefix), else to every numeric metric ``before`` has
    (e.g. a loss per task), sorted."""
    if names is None:
        head = ("recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10")
        split = [(*n.rpartition("/")[::2], n) for n in before]  # (prefix, metric, key)
        common = [n for *_, n in sorted((pre, head.index(m), n) for pre, m, n in split if m in head)]
        names = common or sorted(k for k, v in before.items() if isinstance(v, (int, float)))
    width = max([10, *(len(n) for n in names)])
    rows = [f"{'metric':<{width}} {label:>8}" + (f" {'after':>8}" if after else "")]
    rows += [f"{n:<{width}} {before[n]:>8.4f}" + (f" {after[n]:>8.4f}" if after else "") for n in names]
    return "\n".join(rows)


def recall_curve(
    scores: torch.Tensor,
    relevant: Sequence[Iterable[int]] | tuple,
    max_k: int = 100,
    exclude_self: bool = False,
    chunk_size: int = 1024,
) -> list[float]:
    """``[recall@1, recall@2, ..., recall@K]`` with ``K = min(max_k, N)``, as `retrieval_metrics` defines recall@k.

    ``scores[Q, N]``; ``relevant``, ``exclude_self``, the tie-breaking and the queries left out
    (no relevant document) are those of `retrieval_metrics`, so ``curve[k - 1]`` equals its
    ``recall@k``. Rows are ranked ``chunk_size`` queries at a time (``chunk_size x N`` at once).
    """
    scores = torch.as_tensor(scores)
    if scores.dim() != 2 or 0 in scores.shape:
        raise ValueError(f"recall_curve: scores must be a non-empty [Q, N] matrix, got {tuple(scores.shape)}")
    if max_k <= 0:
        raise ValueError(f"recall_curve: max_k must be a positive integer, got {max_k}")
    _check_scores(scores, "recall_curve")
    num_q, num_d = scores.shape
    relevant = _relevant_sets(relevant, num_q, num_d)
    if exclude_self:
        if num_q != num_d:
            raise ValueError(f"recall_curve: exclude_self needs Q == N, got {num_q} x {num_d}")
        relevant = [r - {i} for i, r in enumerate(relevant)]
    depth = min(max_k, num_d)
    total = torch.zeros(depth, dtype=torch.float64)
    counted = 0
    for start in range(0, num_q, chunk_size):
        block = scores[start : start + chunk_size].float()
        rows = block.shape[0]
        is_rel = torch.zeros(rows, num_d, dtype=torch.bool)
        for i in range(rows):
            is_rel[i, list(relevant[start + i])] = True
        order = torch.sort(block, dim=1, descending=True, stable=True).indices
        if exclude_self:  # drop document i from query i's ranking (not just demote it: ties stay as they were)
            keep = order != torch.arange(start, start + rows).unsqueeze(1)
            order = order[keep].view(rows, num_d - 1)
        hits = is_rel.gather(1, order[:, :depth]).double().cumsum(1)  # [rows, <=depth] relevant found in top k
        sizes = is_rel.sum(1)
        has_rel = sizes > 0
        if not has_rel.any():
            continue
        found = hits[has_rel] / sizes[has_rel].unsqueeze(1)
        if found.shape[1] < depth:  # exclude_self with max_k >= N: recall@N = recall@(N - 1)
            found = torch.cat([found, found[:, -1:].expand(-1, depth - found.shape[1])], 1)
        total += found.sum(0)
        counted += int(has_rel.sum())
    if counted == 0:
        raise ValueError("recall_curve: no query has a relevant document")
    return (total / counted).tolist()
