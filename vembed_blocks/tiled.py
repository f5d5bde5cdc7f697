"""Memory-bounded contrastive kernels: score matrices computed tile by tile, never whole.

A contrastive loss needs, for rows ``x[B,...]`` and candidate columns ``y[N,...]``, either
the row-wise logsumexp of the scores ``z[B,N]`` (InfoNCE, ColBERT) or a sum of independent
per-pair terms (SigLIP). Both are computed here by custom autograd Functions that visit
``z`` in ``tile x tile`` blocks: the forward keeps only running per-row statistics (online
logsumexp: running max and rescaled sum, ``O(B)``), and the backward recomputes each tile
from the saved inputs and the final logsumexp. Extra memory is ``O(B*D + N*D + tile^2)``
instead of ``O(B*N)``; the price is one more score matmul per tile than a dense backward.

Rows and columns carry per-row metadata (a `Side`) from which each tile builds its mask:

- ``id``: rows: the global id of the row's own target column; columns: their global id,
  ``-1`` for hard negatives (which have no label and are never anybody's target);
- ``label`` (optional, both sides): columns sharing a row's label are dropped from that
  row's candidates (InfoNCE) or count as positives (SigLIP), except the row's own target;
- ``valid`` (optional, columns): False drops the column (absent negatives, ring padding);
- anything else (e.g. ColBERT token masks) is passed to the scorer.

``ring=True`` (under an initialised process group) keeps only this rank's columns and
passes them around the ranks of ``group`` (`ring_shift`; default: the world): no rank ever holds all candidates. In the
backward the column blocks travel with their gradient accumulators and arrive home holding
the sum over ranks, the same gradient `gather_with_grad`'s backward would give, so the
distributed gradient contract holds unchanged.

Imports torch, `vembed_blocks._loss_utils` (`Side`, the masks; the dense-or-tiled decision lives there)
and `vembed_blocks.distributed`. The losses import this module only when they tile.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Protocol

import torch

from ._loss_utils import Side, acc_dtype, candidate_masks, signed_logits, weighted
from .distributed import get_world_size, is_dist, ring_shift

__all__ = [
    "Side",
    "DotScorer",
    "tiled_logsumexp",
    "tiled_sigmoid_loss",
]


class Scorer(Protocol):
    """Scores of a row tile against a column tile, and their vector-Jacobian product."""

    def score(self, rows: Side, cols: Side) -> torch.Tensor: ...  # [r, c]

    def accumulate(self, rows: Side, cols: Side, dz: torch.Tensor, drows: torch.Tensor, dcols: torch.Tensor) -> None:
        """Add ``dz[r, c]``'s pull-back to the (float32+) accumulators ``drows`` and ``dcols``."""


class DotScorer:
    """``z = x_rows @ x_cols.T`` (pre-scale the rows to fold a temperature in)."""

    def score(self, rows: Side, cols: Side) -> torch.Tensor:
        return rows.x @ cols.x.T

    def accumulate(self, rows: Side, cols: Side, dz: torch.Tensor, drows: torch.Tensor, dcols: torch.Tensor) -> None:
        if drows.dtype == rows.x.dtype:  # accumulate inside the GEMM: no temporaries, no extra pass
            drows.addmm_(dz, cols.x)
            dcols.addmm_(dz.T, rows.x)
        else:  # low-precision inputs: matmul in their dtype, accumulate in float32
            dz = dz.to(rows.x.dtype)
            drows += dz @ cols.x
            dcols += dz.T @ rows.x


def _spans(n: int, tile: int) -> Iterator[tuple[int, int]]:
    return ((s, min(s + tile, n)) for s in range(0, n, tile))


def _column_blocks(cols: Side, ring: bool, group) -> Iterator[Side]:
    """This rank's columns, then (ring) every other rank's, received while the previous one is scored."""
    steps = get_world_size(group) if ring and is_dist(group) else 1
    block = cols
    for step in range(steps):
        if step + 1 < steps:
            received, wait = ring_shift(block.tensors(), group)
        yield block
        if step + 1 < steps:
            wait()
            block = cols.replaced(received)


def _sweep_backward(cols: Side, ring: bool, group, visit: Callable[[Side, torch.Tensor], None]) -> torch.Tensor:
    """Call ``visit(block, dblock)`` on every column block; return d(loss)/d(this rank's columns).

    In a ring the gradient accumulator travels with its block and is shifted once more at
    the end, so it comes home holding every rank's contribution (summed, like the backward
    of an all-gather).
    """
    steps = get_world_size(group) if ring and is_dist(group) else 1
    block, dblock = cols, torch.zeros(cols.x.shape, dtype=acc_dtype(cols.x), device=cols.x.device)
    for step in range(steps):
        if step + 1 < steps:  # prefetch the next block's features while this one is scored
            received, wait_block = ring_shift(block.tensors(), group)
        visit(block, dblock)
        if steps > 1:
            (dblock,), wait_grad = ring_shift([dblock], group)
            wait_grad()
        if step + 1 < steps:
            wait_block()
            block = cols.replaced(received)
    return dblock


class _TiledLSE(torch.autograd.Function):
    """``lse[i] = logsumexp_j z[i, j]`` over the non-dropped columns, tile by tile."""

    @staticmethod
    def forward(ctx, scorer, tile, ring, group, tally, row_meta, col_meta, row_x, col_x):
        rows, cols = Side(row_x, row_meta), Side(col_x, col_meta)
        acc = acc_dtype(row_x)
        m = torch.full((len(rows),), -math.inf, dtype=acc, device=row_x.device)  # running max
        s = torch.zeros_like(m)  # running sum of exp(z - m)
        for block in _column_blocks(cols, ring, group):
            for r0, r1 in _spans(len(rows), tile):
                rt = rows.slice(r0, r1)
                for c0, c1 in _spans(len(block), tile):
                    z = _masked_scores(scorer, rt, block.slice(c0, c1), tally)
                    new = torch.maximum(m[r0:r1], z.amax(dim=1))
                    safe = new.masked_fill(new == -math.inf, 0.0)  # a fully dropped tile: no -inf - -inf
                    s[r0:r1].mul_(torch.exp(m[r0:r1] - safe)).add_(z.sub_(safe[:, None]).exp_().sum(dim=1))
                    m[r0:r1] = new
        lse = m + torch.log(s)
        ctx.save_for_backward(row_x, col_x, lse)
        ctx.scorer, ctx.tile, ctx.ring, ctx.group = scorer, tile, ring, group
        ctx.row_meta, ctx.col_meta = row_meta, col_meta
        return lse.to(row_x.dtype)

    @staticmethod
    def backward(ctx, grad):
        row_x, col_x, lse = ctx.saved_tensors
        rows, cols, tile = Side(row_x, ctx.row_meta), Side(col_x, ctx.col_meta), ctx.tile
        drows = torch.zeros(row_x.shape, dtype=lse.dtype, device=row_x.device)
        grad = grad.to(lse.dtype)

        def visit(block: Side, dblock: torch.Tensor) -> None:
            for r0, r1 in _spans(len(rows), tile):
                rt = rows.slice(r0, r1)
                for c0, c1 in _spans(len(block), tile):
                    ct = block.slice(c0, c1)
                    z = _masked_scores(ctx.scorer, rt, ct)
                    p = z.sub_(lse[r0:r1, None]).exp_().mul_(grad[r0:r1, None])  # softmax * upstream grad
                    ctx.scorer.accumulate(rt, ct, p, drows[r0:r1], dblock[c0:c1])

        dcols = _sweep_backward(cols, ctx.ring, ctx.group, visit)
        return None, None, None, None, None, None, None, drows.to(row_x.dtype), dcols.to(col_x.dtype)


def _masked_scores(scorer: Scorer, rows: Side, cols: Side, tally: dict | None = None) -> torch.Tensor:
    """One tile of scores in the accumulation dtype, dropped pairs at -inf (weight 0 in the softmax),
    down-weighted ones (false-negative rules) shifted by their log-weight."""
    z = scorer.score(rows, cols).to(acc_dtype(rows.x))
    drop, down = candidate_masks(rows, cols, z, tally)
    if down is not None:
        z.add_(down)
    return z if drop is None else z.masked_fill_(drop, -math.inf)


def tiled_logsumexp(
    rows: Side,
    cols: Side,
    tile: int,
    scorer: Scorer | None = None,
    ring: bool = False,
    group=None,
    tally: dict | None = None,
) -> torch.Tensor:
    """``[B]`` logsumexp over columns of ``scorer(rows, cols)`` with masks from the metadata.

    Differentiable in ``rows.x`` and ``cols.x``. ``ring``: ``cols`` are this rank's columns
    only (padded to the largest rank's with `_loss_utils.ring_pad`), passed around the ranks
    of ``group`` (default: the world); every rank must call it (and its backward) together.
    ``tally``: a dict the forward adds each false-negative rule's hit count to.
    """
    scorer = scorer or DotScorer()
    return _TiledLSE.apply(scorer, int(tile), bool(ring), group, tally, rows.meta, cols.meta, rows.x, cols.x)


class _TiledSigmoid(torch.autograd.Function):
    """``sum_ij -log sigmoid(sign_ij * (z_ij + bias))`` over valid pairs, tile by tile."""

    @staticmethod
    def forward(ctx, tile, ring, group, tally, row_meta, col_meta, row_x, col_x, bias):
        rows, cols = Side(row_x, row_meta), Side(col_x, col_meta)
        total = torch.zeros((), dtype=acc_dtype(row_x), device=row_x.device)
        for block in _column_blocks(cols, ring, group):
            for r0, r1 in _spans(len(rows), tile):
                rt = rows.slice(r0, r1)
                for c0, c1 in _spans(len(block), tile):
                    signed, _, weight = signed_logits(rt, block.slice(c0, c1), bias, tally)
                    terms = -torch.nn.functional.logsigmoid(signed)
                    total += (terms if weight is None else weighted(terms, weight)).sum()
        ctx.save_for_backward(row_x, col_x, bias)
        ctx.tile, ctx.ring, ctx.group, ctx.row_meta, ctx.col_meta = tile, ring, group, row_meta, col_meta
        return total.to(row_x.dtype)

    @staticmethod
    def backward(ctx, grad):
        row_x, col_x, bias = ctx.saved_tensors
        rows, cols, tile = Side(row_x, ctx.row_meta), Side(col_x, ctx.col_meta), ctx.tile
        acc = acc_dtype(row_x)
        drows = torch.zeros(row_x.shape, dtype=acc, device=row_x.device)
        dbias = torch.zeros((), dtype=acc, device=row_x.device)
        grad = grad.to(acc)

        def visit(block: Side, dblock: torch.Tensor) -> None:
            for r0, r1 in _spans(len(rows), tile):
                rt = rows.slice(r0, r1)
                for c0, c1 in _spans(len(block), tile):
                    ct = block.slice(c0, c1)
                    signed, positive, weight = signed_logits(rt, ct, bias)
                    # d/dz of -log sigmoid(sign * z) is -sign * sigmoid(-sign * z).
                    dsigned = torch.sigmoid(signed.neg_()).mul_(grad)
                    dz = torch.where(positive, -dsigned, dsigned)
                    if weight is not None:
                        dz = weighted(dz, weight)
                    dbias.add_(dz.sum())
                    DotScorer().accumulate(rt, ct, dz, drows[r0:r1], dblock[c0:c1])

        dcols = _sweep_backward(cols, ctx.ring, ctx.group, visit)
        dbias = dbias.to(bias.dtype) if ctx.needs_input_grad[8] else None
        return None, None, None, None, None, None, drows.to(row_x.dtype), dcols.to(col_x.dtype), dbias


def tiled_sigmoid_loss(
    rows: Side,
    cols: Side,
    bias: torch.Tensor,
    tile: int,
    ring: bool = False,
    group=None,
    tally: dict | None = None,
) -> torch.Tensor:
    """Sum over valid pairs of ``-log sigmoid(+-(rows.x_i . cols.x_j + bias))`` (+ for positives).

    Positives: a column whose ``id`` equals the row's ``id``, or (labels given) a labelled column
    with the row's label. Differentiable in ``rows.x``, ``cols.x`` and ``bias`` (a 0-d tensor).
    """
    return _TiledSigmoid.apply(int(tile), bool(ring), group, tally, rows.meta, cols.meta, rows.x, cols.x, bias)
