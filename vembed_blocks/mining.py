"""Hard-negative mining with a positive-aware false-negative filter."""

from __future__ import annotations

import json
import os
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["mine_hard_negatives", "write_mined_file"]

TILE_BYTES = 256 * 2**20  # default size of one float32 [query chunk, candidate block] score tile


@torch.no_grad()
def mine_hard_negatives(
    query: torch.Tensor,
    candidates: torch.Tensor,
    positive_index: torch.Tensor,
    k: int,
    margin: float | None = None,
    max_ratio: float | None = None,
    chunk_size: int = 1024,
    candidate_block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k most similar candidates per query that are not (likely) positives.

    ``query[Q,D]``, ``candidates[N,D]`` (cosine similarity: both are normalised here, in float32),
    ``positive_index[Q]`` the index of each query's positive in ``candidates``.
    A candidate is skipped when it is the positive, when its score is within ``margin`` of
    the positive's (``score > pos - margin``), or above ``max_ratio * pos``: those are the
    likely false negatives (unlabelled duplicates of the positive).

    Returns ``(indices[Q,k], scores[Q,k])`` sorted by score, best first; equal scores go to the
    lower candidate index. Where fewer than k candidates pass the filter, the remaining slots
    hold index -1 and score -inf.

    Memory is bounded whatever Q and N: scores are computed one ``[chunk_size, candidate_block]``
    tile at a time (``candidate_block`` defaults to what keeps a float32 tile near 256 MiB) and
    each query keeps a running top-k, merged tile by tile; the positive's score is one dot product
    per query, computed up front. The result does not depend on the two sizes, up to float32
    rounding: BLAS may round the same dot product differently (by 1 ulp) with the matmul's shape,
    so candidates whose scores differ only by rounding (~1e-7; even exact duplicate vectors) may
    come in either order, as they could before with a different ``chunk_size``.
    """
    _check_inputs(query, candidates, positive_index, k, chunk_size, candidate_block)
    n, nq = candidates.shape[0], query.shape[0]
    block = candidate_block or max(1, TILE_BYTES // (4 * max(1, min(chunk_size, nq))))
    pos = positive_index.to(candidates.device).long()
    bound = _drop_above(query, candidates, pos, margin, max_ratio, chunk_size)
    best_v = torch.full((nq, k), float("-inf"), device=candidates.device)
    best_i = torch.full((nq, k), -1, dtype=torch.long, device=candidates.device)
    for start in range(0, n, block):
        cand = F.normalize(candidates[start : start + block].float(), dim=-1)
        for qs in range(0, nq, chunk_size):
            q = F.normalize(query[qs : qs + chunk_size].float(), dim=-1)
            scores = q @ cand.T  # [c, b]
            if bound is not None:
                scores.masked_fill_(scores > bound[qs : qs + chunk_size, None], float("-inf"))
            p = pos[qs : qs + chunk_size] - start
            rows = ((p >= 0) & (p < cand.shape[0])).nonzero()[:, 0]
            scores[rows, p[rows]] = float("-inf")
            v, i = _block_top(scores, k)
            best_v[qs : qs + chunk_size], best_i[qs : qs + chunk_size] = _merge(
                best_v[qs : qs + chunk_size], best_i[qs : qs + chunk_size], v, i + start, k
            )
    return best_i.masked_fill(best_v == float("-inf"), -1), best_v


def _check_inputs(query, candidates, positive_index, k, chunk_size, candidate_block) -> None:
    if query.dim() != 2 or candidates.dim() != 2:
        raise ValueError(
            "mine_hard_negatives: query and candidates must be 2-D, "
            f"got {tuple(query.shape)} and {tuple(candidates.shape)}"
        )
    if query.shape[1] != candidates.shape[1]:
        raise ValueError(f"mine_hard_negatives: query dim {query.shape[1]} != candidates dim {candidates.shape[1]}")
    if positive_index.shape != query.shape[:1]:
        raise ValueError(
            f"mine_hard_negatives: positive_index must have shape ({query.shape[0]},), "
            f"got {tuple(positive_index.shape)}"
        )
    n = candidates.shape[0]
    if not 0 < k <= n:
        raise ValueError(f"mine_hard_negatives: k must be in 1..{n} (number of candidates), got {k}")
    if len(positive_index) and not (0 <= int(positive_index.min()) and int(positive_index.max()) < n):
        raise ValueError(f"mine_hard_negatives: positive_index out of range 0..{n - 1}")
    if chunk_size < 1 or (candidate_block is not None and candidate_block < 1):
        raise ValueError(
            f"mine_hard_negatives: chunk_size and candidate_block must be >= 1, got {chunk_size}, {candidate_block}"
        )


def _drop_above(query, candidates, pos, margin, max_ratio, chunk_size) -> torch.Tensor | None:
    """``[Q]`` score above which a candidate is a likely false negative (None: no filter)."""
    if margin is None and max_ratio is None:
        return None
    out = []
    for qs in range(0, query.shape[0], chunk_size):
        q = F.normalize(query[qs : qs + chunk_size].float(), dim=-1)
        p = F.normalize(candidates[pos[qs : qs + chunk_size]].float(), dim=-1)
        pos_score = (q @ p.T).diagonal()  # a matmul, as the tiles: the same rounding (for chunks of >~16)
        bound = torch.full_like(pos_score, float("inf"))
        if margin is not None:
            bound = torch.minimum(bound, pos_score - margin)
        if max_ratio is not None:
            bound = torch.minimum(bound, max_ratio * pos_score)
        out.append(bound)
    return torch.cat(out) if out else query.new_empty(0, dtype=torch.float32)


def _block_top(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-min(k, b) of each row of ``scores[c,b]`` by (score desc, column asc), in any order.

    ``topk`` picks arbitrarily among scores tied at the cut: one more than needed is taken to see
    where the cut splits a tie (a finite one), and those rare rows are redone with a stable sort.
    """
    m = min(k, scores.shape[1])
    v, i = scores.topk(min(k + 1, scores.shape[1]), dim=1)
    if v.shape[1] > m:
        rows = ((v[:, m] == v[:, m - 1]) & (v[:, m] > float("-inf"))).nonzero()[:, 0]
        v, i = v[:, :m].contiguous(), i[:, :m].contiguous()
        for r in range(0, len(rows), 64):
            rr = rows[r : r + 64]
            sv, si = scores[rr].sort(dim=1, descending=True, stable=True)
            v[rr], i[rr] = sv[:, :m], si[:, :m]
    return v, i


def _merge(best_v, best_i, v, i, k) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of the running best and a block's top, by (score desc, index asc), sorted."""
    v, i = torch.cat([best_v, v], 1), torch.cat([best_i, i], 1)
    order = i.argsort(dim=1)
    v, i = v.gather(1, order), i.gather(1, order)
    order = v.argsort(dim=1, descending=True, stable=True)[:, :k]
    return v.gather(1, order), i.gather(1, order)


def write_mined_file(
    records: list,
    encode: Callable[[list, bool], torch.Tensor],
    out: str,
    k: int,
    margin: float | None = None,
    max_ratio: float | None = None,
    batch_size: int = 128,
) -> int:
    """Mine ``k`` hard negatives per text record and write the records, with them, as JSONL to ``out``.

    Every rank embeds a share of the unique queries and documents (``encode(items, is_query)``,
    `embed.embed_on_all_ranks`); rank 0 mines and writes (atomically: ``out`` appears complete or
    not at all). A candidate that is relevant to the query (any of its positives, when a query
    has several) is never its negative; a row's own negatives come first, de-duplicated.
    Returns the number of rows written (on every rank).
    """
    from .distributed import get_rank, is_dist
    from .embed import embed_on_all_ranks, retrieval_set

    rs = retrieval_set(records)
    q_of, d_of = {q: i for i, q in enumerate(rs.queries)}, {d: i for i, d in enumerate(rs.docs)}
    q = embed_on_all_ranks(rs.queries, lambda items: encode(items, True), batch_size, "mining: embed queries")
    d = embed_on_all_ranks(rs.docs, lambda items: encode(items, False), batch_size, "mining: embed corpus")
    if get_rank() == 0:
        rows = [(q_of[r.query], d_of[r.positive], r) for r in records]
        depth = min(len(rs.docs), k + max(len(s) for s in rs.relevant))  # room to drop the other positives
        positives = torch.tensor([b for _, b, _ in rows])
        idx, _ = mine_hard_negatives(q[[a for a, _, _ in rows]], d, positives, depth, margin, max_ratio)
        with open(out + ".tmp", "w") as f:
            for (qi, _, r), cand in zip(rows, idx.tolist()):
                found = [rs.docs[j].text for j in cand if j >= 0 and j not in rs.relevant[qi]][:k]
                negs = list(dict.fromkeys([n.text for n in r.negatives] + found))
                row = {**r.extra, "query": r.query.text, "positive": r.positive.text, "negatives": negs}
                f.write(json.dumps(row | ({"label": r.label} if r.label is not None else {})) + "\n")
        os.replace(out + ".tmp", out)
    if is_dist():
        torch.distributed.barrier()
    return len(records)
