"""Hard-negative mining with a positive-aware false-negative filter, a rank range and a teacher."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["Mined", "TeacherMined", "mine_hard_negatives", "top_k_tiled", "write_mined_file"]  # noqa: F822 (__getattr__)

TILE_BYTES = 256 * 2**20  # default size of one float32 [query chunk, candidate block] score tile
NEG_INF = float("-inf")


class Mined(NamedTuple):
    """``indices[Q, k]`` (-1: no candidate) and ``scores[Q, k]`` (-inf there), best first."""

    indices: torch.Tensor
    scores: torch.Tensor


class TeacherMined(NamedTuple):
    """`Mined` plus the teacher's scores of the kept candidates, ``teacher_scores[Q, k]`` (-inf where the
    index is -1), and of each query's positives, ``teacher_positive_scores[Q, P]`` (-inf for padding)."""

    indices: torch.Tensor
    scores: torch.Tensor
    teacher_scores: torch.Tensor
    teacher_positive_scores: torch.Tensor


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
    *,
    rank_range: tuple[int, int] | None = None,
    seed: int = 0,
    teacher: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    teacher_depth: int | None = None,
    teacher_margin: float | None = None,
    teacher_ratio: float | None = None,
) -> Mined | TeacherMined:
    """Top-k most similar candidates per query that are not (likely) positives.

    ``query[Q,D]``, ``candidates[N,D]`` (cosine similarity: both are normalised here, in float32),
    ``positive_index[Q]`` the index of each query's positive in ``candidates``, or ``[Q, P]`` for several
    positives per query, padded with -1 (each row needs one real index). Every positive is skipped. A
    candidate is also skipped when it is within ``margin`` of a positive or above ``max_ratio`` times one,
    measured against the query's lowest positive score ``pos`` (``score > pos - margin``,
    ``score > max_ratio * pos``; strict): those are the likely false negatives.

    Returns `Mined` ``(indices[Q,k], scores[Q,k])`` (it unpacks as that pair) sorted by score, best
    first; equal scores go to the lower candidate index. Where fewer than k candidates pass the
    filter, the remaining slots hold index -1 and score -inf.

    ``rank_range=(n, m)``: rank the candidates that pass the filter (as above) and keep ranks n..m-1
    (0-based: ``(0, k)`` is the default top-k), skipping the n hardest. When ``k < m - n``, k of them
    are drawn uniformly without replacement: the k with the smallest keys ``torch.rand(Q, m - n,
    generator=torch.Generator().manual_seed(seed))`` (row q, column r: rank n + r; padding slots never
    win), returned in rank order. The same seed gives the same draw, whatever the tile sizes; when
    ``k > m - n`` the extra slots are padding.

    ``teacher(query_rows[c], cand_idx[c, j]) -> scores[c, j]`` (higher = more similar) rescores, e.g. a
    cross-encoder or a bigger embedder: the student's top ``teacher_depth`` candidates that pass its
    filter (default ``max(4 k, m)``) and, in the same call, each query's positives (columns
    ``j - P ..``; padding slots, positive or candidate, are passed as the query's first positive and
    their scores ignored). A candidate the teacher scores above ``tpos - teacher_margin`` or above
    ``teacher_ratio * tpos`` (``tpos``: its lowest positive score) is dropped as a false negative, and
    the ranks (and ``rank_range``) count the kept ones, in the student's order. Returns `TeacherMined`,
    with the teacher's scores for distillation. It is called once per ``chunk_size`` queries.

    Memory is bounded whatever Q and N (`top_k_tiled`): no ``[Q, N]`` matrix, only the ``[Q, depth]``
    running top (depth ``m``, or ``teacher_depth``). The result does not depend on the tile sizes,
    up to float32 rounding: BLAS may round the same dot product differently (by 1 ulp) with the
    matmul's shape, so candidates whose scores differ only by rounding (~1e-7; even exact duplicate
    vectors) may come in either order.
    """
    pos = _check_inputs(query, candidates, positive_index, k, chunk_size, candidate_block)
    lo, hi = _check_range(rank_range, k, candidates.shape[0])
    depth = hi if teacher is None else _check_depth(teacher_depth, k, hi, candidates.shape[0])
    pos = pos.to(candidates.device)
    bound = _drop_above(query, candidates, pos, margin, max_ratio, chunk_size)

    def skip(scores: torch.Tensor, qs: int, start: int) -> None:
        if bound is not None:
            scores.masked_fill_(scores > bound[qs : qs + len(scores), None], NEG_INF)
        p = pos[qs : qs + len(scores)]
        hit = (p >= start) & (p < start + scores.shape[1])  # padding (-1) is never >= start
        rows, cols = hit.nonzero(as_tuple=True)
        scores[rows, p[rows, cols] - start] = NEG_INF

    val, idx = top_k_tiled(query, candidates, depth, chunk_size, candidate_block, normalize=True, mask=skip)
    idx = idx.masked_fill(val == NEG_INF, -1)
    if teacher is None:
        return Mined(*_take_range(idx, val, [], lo, hi, k, seed)[:2])
    idx, val, t_val, t_pos = _teacher_filter(teacher, idx, val, pos, teacher_margin, teacher_ratio, chunk_size)
    idx, val, (t_val,) = _take_range(idx, val, [t_val], lo, hi, k, seed)
    return TeacherMined(idx, val, t_val, t_pos)


def _check_inputs(query, candidates, positive_index, k, chunk_size, candidate_block) -> torch.Tensor:
    """The checks that name the bad input; returns the positives as ``[Q, P]`` long (-1: padding)."""
    if query.dim() != 2 or candidates.dim() != 2:
        raise ValueError(
            "mine_hard_negatives: query and candidates must be 2-D, "
            f"got {tuple(query.shape)} and {tuple(candidates.shape)}"
        )
    if query.shape[1] != candidates.shape[1]:
        raise ValueError(f"mine_hard_negatives: query dim {query.shape[1]} != candidates dim {candidates.shape[1]}")
    if positive_index.dim() not in (1, 2) or positive_index.shape[0] != query.shape[0]:
        raise ValueError(
            f"mine_hard_negatives: positive_index must have shape ({query.shape[0]},) or ({query.shape[0]}, P), "
            f"got {tuple(positive_index.shape)}"
        )
    n = candidates.shape[0]
    if not 0 < k <= n:
        raise ValueError(f"mine_hard_negatives: k must be in 1..{n} (number of candidates), got {k}")
    pos = positive_index.long() if positive_index.dim() == 2 else positive_index.long()[:, None]
    low = -1 if positive_index.dim() == 2 else 0  # -1 pads the rows of a [Q, P] index only
    if pos.numel() and not (low <= int(pos.min()) and int(pos.max()) < n):
        pad = " (or -1: padding)" if low else ""
        raise ValueError(f"mine_hard_negatives: positive_index out of range 0..{n - 1}{pad}")
    empty = (pos < 0).all(1).nonzero()
    if len(empty):
        raise ValueError(f"mine_hard_negatives: positive_index row {int(empty[0])} has no positive (all -1)")
    if chunk_size < 1 or (candidate_block is not None and candidate_block < 1):
        raise ValueError(
            f"mine_hard_negatives: chunk_size and candidate_block must be >= 1, got {chunk_size}, {candidate_block}"
        )
    return pos


def _check_range(rank_range, k: int, n: int) -> tuple[int, int]:
    if rank_range is None:
        return 0, k
    lo, hi = (int(r) for r in rank_range)
    if not 0 <= lo < hi <= n:
        raise ValueError(f"mine_hard_negatives: rank_range must be (n, m) with 0 <= n < m <= {n}, got {rank_range}")
    return lo, hi


def _check_depth(teacher_depth, k: int, hi: int, n: int) -> int:
    depth = min(n, max(4 * k, hi)) if teacher_depth is None else teacher_depth
    if not hi <= depth <= n:
        raise ValueError(f"mine_hard_negatives: teacher_depth must be in {hi}..{n} (rank range end..N), got {depth}")
    return depth


def _drop_above(query, candidates, pos, margin, max_ratio, chunk_size) -> torch.Tensor | None:
    """``[Q]`` score above which a candidate is a likely false negative (None: no filter), from the
    lowest real positive score of each row of ``pos[Q, P]``."""
    if margin is None and max_ratio is None:
        return None
    out = []
    for qs in range(0, query.shape[0], chunk_size):
        q = F.normalize(query[qs : qs + chunk_size].float(), dim=-1)
        scores = []
        for p in pos[qs : qs + chunk_size].T:  # one column of positives at a time: [c] each
            c = F.normalize(candidates[p.clamp(min=0)].float(), dim=-1)
            s = (q @ c.T).diagonal()  # a matmul, as the tiles: the same rounding (for chunks of >~16)
            scores.append(s.masked_fill(p < 0, float("inf")))
        pos_score = torch.stack(scores, 1).amin(1)
        bound = torch.full_like(pos_score, float("inf"))
        if margin is not None:
            bound = torch.minimum(bound, pos_score - margin)
        if max_ratio is not None:
            bound = torch.minimum(bound, max_ratio * pos_score)
        out.append(bound)
    return torch.cat(out) if out else query.new_empty(0, dtype=torch.float32)


@torch.no_grad()
def top_k_tiled(
    query: torch.Tensor,
    candidates: torch.Tensor,
    k: int,
    chunk_size: int = 1024,
    candidate_block: int | None = None,
    normalize: bool = False,
    mask: Callable[[torch.Tensor, int, int], Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values[Q, k], indices[Q, k])`` of the k best columns of ``query[Q, D] @ candidates[N, D].T`` per row.

    Sorted best first, equal scores to the lower index; ``k <= N``. Computed one ``[chunk_size,
    candidate_block]`` tile at a time (the default block keeps a float32 tile near `TILE_BYTES`), each
    row keeping a running top-k merged tile by tile: no ``[Q, N]`` matrix. ``normalize`` scores cosine
    (each tile normalised, in float32); otherwise the inputs' dtype. ``mask(tile, q_start, c_start)``
    may edit a tile in place first (e.g. ``-inf`` for a candidate to skip). Where a row has fewer than
    k scores above ``-inf``, the rest are ``-inf`` with index -1 or that of a ``-inf`` score.
    """
    n, nq = candidates.shape[0], query.shape[0]
    block = candidate_block or max(1, TILE_BYTES // (4 * max(1, min(chunk_size, nq))))
    dtype = torch.float32 if normalize else torch.result_type(query, candidates)
    best_v = torch.full((nq, k), NEG_INF, dtype=dtype, device=candidates.device)
    best_i = torch.full((nq, k), -1, dtype=torch.long, device=candidates.device)
    for start in range(0, n, block):
        cand = candidates[start : start + block]
        cand = F.normalize(cand.float(), dim=-1) if normalize else cand
        for qs in range(0, nq, chunk_size):
            q = query[qs : qs + chunk_size]
            scores = (F.normalize(q.float(), dim=-1) if normalize else q) @ cand.T  # [c, b]
            if mask is not None:
                mask(scores, qs, start)
            v, i = _block_top(scores, k)
            rows = slice(qs, qs + chunk_size)
            best_v[rows], best_i[rows] = _merge(best_v[rows], best_i[rows], v, i + start, k)
    return best_v, best_i


def _block_top(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-min(k, b) of each row of ``scores[c,b]`` by (score desc, column asc), in any order.

    ``topk`` picks arbitrarily among scores tied at the cut: one more than needed is taken to see
    where the cut splits a tie (a finite one), and those rare rows are redone with a stable sort.
    """
    m = min(k, scores.shape[1])
    v, i = scores.topk(min(k + 1, scores.shape[1]), dim=1)
    if v.shape[1] > m:
        rows = ((v[:, m] == v[:, m - 1]) & (v[:, m] > NEG_INF)).nonzero()[:, 0]
        v, i = v[:, :m].contiguous(), i[:, :m].contiguous()
        for r in range(0, len(rows), 64):
            rr = rows[r : r + 64]
            sv, si = scores[rr].sort(dim=1, descending=True, stable=True)
            v[rr], i[rr] = sv[:, :m], si[:, :m]
    return v, i


def _merge(best_v, best_i, v, i, k) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of the running best and a block's top, by (score desc, index asc), sorted; the running
    best's empty slots (index -1) go after real ``-inf`` scores."""
    v, i = torch.cat([best_v, v], 1), torch.cat([best_i, i], 1)
    order = torch.where(i < 0, torch.iinfo(torch.long).max, i).argsort(dim=1)
    v, i = v.gather(1, order), i.gather(1, order)
    order = v.argsort(dim=1, descending=True, stable=True)[:, :k]
    return v.gather(1, order), i.gather(1, order)


def _take_range(idx, val, more: list, lo: int, hi: int, k: int, seed: int):
    """Ranks ``lo..hi-1`` of ``idx[Q, >=hi]`` (and of ``val`` and each of ``more``, alike), k of them
    drawn as `mine_hard_negatives` says when ``k < hi - lo``, else padded to k columns."""
    cols = [t[:, lo:hi] for t in (idx, val, *more)]
    width = hi - lo
    if k < width:
        keys = torch.rand(idx.shape[0], width, generator=torch.Generator().manual_seed(seed))
        keys = keys.to(idx.device).masked_fill(cols[0] < 0, 2.0)  # padding is never drawn before a candidate
        pick = keys.topk(k, dim=1, largest=False).indices.sort(dim=1).values
        cols = [t.gather(1, pick) for t in cols]
    elif k > width:
        cols = [F.pad(t, (0, k - width), value=-1 if t is cols[0] else NEG_INF) for t in cols]
    return cols[0], cols[1], cols[2:]


def _teacher_filter(teacher, idx, val, pos, margin, ratio, chunk_size):
    """The teacher's scores of ``idx[Q, d]`` and ``pos[Q, P]``; its false negatives dropped, the kept
    candidates moved to the front in the student's order: ``(idx, val, teacher_val, teacher_pos)``."""
    first = pos.gather(1, (pos >= 0).int().argmax(1, keepdim=True))  # [Q, 1]: each row's first real positive
    cols = torch.cat([idx, pos], 1)
    cols = torch.where(cols < 0, first, cols)
    parts = []
    for qs in range(0, len(cols), chunk_size):
        rows = torch.arange(qs, min(qs + chunk_size, len(cols)), device=cols.device)
        s = teacher(rows, cols[rows])
        if tuple(s.shape) != (len(rows), cols.shape[1]):
            raise ValueError(
                f"mine_hard_negatives: teacher returned shape {tuple(s.shape)} for "
                f"query_rows [{len(rows)}] and cand_idx {tuple(cols[rows].shape)}; it must return [c, j]"
            )
        parts.append(s.float().to(idx.device))
    t = torch.cat(parts) if parts else val.new_empty(0, cols.shape[1])
    t_val = t[:, : idx.shape[1]].masked_fill(idx < 0, NEG_INF)
    t_pos = t[:, idx.shape[1] :].masked_fill(pos < 0, NEG_INF)
    t_min = t_pos.masked_fill(pos < 0, float("inf")).amin(1, keepdim=True)
    drop = idx < 0
    if margin is not None:
        drop |= t_val > t_min - margin
    if ratio is not None:
        drop |= t_val > ratio * t_min
    order = drop.int().argsort(dim=1, stable=True)  # kept first, each part in the student's order
    drop = drop.gather(1, order)
    idx, val, t_val = (
        x.gather(1, order).masked_fill(drop, fill) for x, fill in ((idx, -1), (val, NEG_INF), (t_val, NEG_INF))
    )
    return idx, val, t_val, t_pos


def __getattr__(name: str) -> Any:
    """``write_mined_file`` lives in `mining_output` (it needs `embed` and `distributed`): loaded on first use."""
    if name == "write_mined_file":
        from .mining_output import write_mined_file

        return write_mined_file
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
