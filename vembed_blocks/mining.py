"""Hard-negative mining with a positive-aware false-negative filter."""

from __future__ import annotations

import json
import os
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["mine_hard_negatives", "write_mined_file"]


@torch.no_grad()
def mine_hard_negatives(
    query: torch.Tensor,
    candidates: torch.Tensor,
    positive_index: torch.Tensor,
    k: int,
    margin: float | None = None,
    max_ratio: float | None = None,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k most similar candidates per query that are not (likely) positives.

    ``query[Q,D]``, ``candidates[N,D]`` (cosine similarity: both are normalised here),
    ``positive_index[Q]`` the index of each query's positive in ``candidates``.
    A candidate is skipped when it is the positive, when its score is within ``margin`` of
    the positive's (``score > pos - margin``), or above ``max_ratio * pos``: those are the
    likely false negatives (unlabelled duplicates of the positive).

    Returns ``(indices[Q,k], scores[Q,k])`` sorted by score, best first. Where fewer than k
    candidates pass the filter, the remaining slots hold index -1 and score -inf.
    Queries are processed ``chunk_size`` at a time, so Q x N is never held at once.
    """
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
    cand = F.normalize(candidates.float(), dim=-1)
    out_idx, out_score = [], []
    for start in range(0, query.shape[0], chunk_size):
        q = F.normalize(query[start : start + chunk_size].float(), dim=-1)
        pos = positive_index[start : start + chunk_size].to(cand.device).long()
        scores = q @ cand.T  # [c, N]
        pos_score = scores.gather(1, pos[:, None])
        drop = torch.zeros_like(scores, dtype=torch.bool)
        drop.scatter_(1, pos[:, None], True)
        if margin is not None:
            drop |= scores > pos_score - margin
        if max_ratio is not None:
            drop |= scores > max_ratio * pos_score
        top, idx = scores.masked_fill(drop, float("-inf")).topk(k, dim=1)
        out_idx.append(idx.masked_fill(top == float("-inf"), -1))
        out_score.append(top)
    return torch.cat(out_idx), torch.cat(out_score)


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
