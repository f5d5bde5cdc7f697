"""Hard-negative mining with a positive-aware false-negative filter."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["mine_hard_negatives"]


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
