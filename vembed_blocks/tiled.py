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
passes them around the ranks (`ring_shift`): no rank ever holds all candidates. In the
backward the column blocks travel with their gradient accumulators and arrive home holding
the sum over ranks, the same gradient `gather_with_grad`'s backward would give, so the
distributed gradient contract holds unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

import torch

from .distributed import all_gather_sizes, get_world_size, is_dist, pad_dim, ring_shift

__all__ = [
    "AUTO_TILE_ELEMENTS",
    "AUTO_TILE_SIZE",
    "Side",
    "DotScorer",
    "resolve_tile",
    "ring_pad",
    "tiled_logsumexp",
    "tiled_sigmoid_loss",
]

#: With ``tile_size=None`` a loss goes tiled when its dense score tensor would hold more than
#: this many elements (rows x candidates, times Lq x Ld for ColBERT): 2**26 float32 = 256 MiB.
AUTO_TILE_ELEMENTS = 1 << 26
#: Elements per tile chosen automatically (4096 x 4096 scores = 64 MiB in float32).
AUTO_TILE_SIZE = 4096


def resolve_tile(tile_size: int | None, rows: int, cols: int, per_pair: int = 1, ring: bool = False) -> int | None:
    """The tile size to use, or None for the dense path.

    ``tile_size``: None = automatic: tiled when the dense scores would hold more than
    ``AUTO_TILE_ELEMENTS`` (``rows * cols * per_pair``), with tiles of ``AUTO_TILE_SIZE^2``
    elements (``sqrt(AUTO_TILE_SIZE^2 / per_pair)`` rows and columns); 0 = always dense;
    a positive int = always tiled with that many rows and columns per tile. A ring is
    always tiled (None and 0 then mean the automatic tile).
    """
    if tile_size is not None and tile_size < 0:
        raise ValueError(f"tile_size must be None, 0 (dense) or positive, got {tile_size}")
    if tile_size:
        return tile_size
    if not ring and (tile_size == 0 or rows * cols * per_pair <= AUTO_TILE_ELEMENTS):
        return None
    return max(1, math.isqrt(AUTO_TILE_SIZE * AUTO_TILE_SIZE // per_pair))


@dataclass
class Side:
    """Rows (or columns) of a score matrix: features ``x[n, ...]`` plus per-row ``meta`` tensors ``[n, ...]``."""

    x: torch.Tensor
    meta: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.x.shape[0]

    def slice(self, start: int, stop: int) -> "Side":
        return Side(self.x[start:stop], {k: v[start:stop] for k, v in self.meta.items()})

    def tensors(self) -> list[torch.Tensor]:
        return [self.x, *self.meta.values()]

    def replaced(self, tensors: list[torch.Tensor]) -> "Side":
        return Side(tensors[0], dict(zip(self.meta, tensors[1:])))


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


def same_label(rows: Side, cols: Side) -> torch.Tensor | None:
    """[r, c] True where column j is labelled (id >= 0), shares row i's label, and is not row i's target."""
    if "label" not in rows.meta or "label" not in cols.meta:
        return None
    rid, cid = rows.meta["id"][:, None], cols.meta["id"][None, :]
    return (rows.meta["label"][:, None] == cols.meta["label"][None, :]) & (cid >= 0) & (cid != rid)


def dropped(rows: Side, cols: Side) -> torch.Tensor | None:
    """[r, c] True where a column is not a candidate of a row (invalid, or a same-label non-target); None: none."""
    drop = same_label(rows, cols)
    if "valid" in cols.meta:
        invalid = ~cols.meta["valid"][None, :]
        drop = invalid if drop is None else drop | invalid
    return drop


def _spans(n: int, tile: int) -> Iterator[tuple[int, int]]:
    return ((s, min(s + tile, n)) for s in range(0, n, tile))


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    """Statistics and accumulators in at least float32 (bf16/fp16 inputs)."""
    return torch.promote_types(x.dtype, torch.float32)


def ring_pad(cols: Side) -> Side:
    """Pad a column block to the largest block over ranks so every ring message has one shape.

    Padding columns are invalid (``valid`` False, ``id`` -1); token masks are padded with True
    so that a scorer never sees an all-padding candidate (its score is finite, then dropped).
    """
    n = max(all_gather_sizes(len(cols), cols.x.device))
    meta = dict(cols.meta)
    meta.setdefault("valid", torch.ones(len(cols), dtype=torch.bool, device=cols.x.device))
    fill = {"valid": False, "id": -1, "tokens": True}
    return Side(pad_dim(cols.x, 0, n), {k: pad_dim(v, 0, n, fill.get(k, 0)) for k, v in meta.items()})


def _column_blocks(cols: Side, ring: bool) -> Iterator[Side]:
    """This rank's columns, then (ring) every other rank's, received while the previous one is scored."""
    steps = get_world_size() if ring and is_dist() else 1
    block = cols
    for step in range(steps):
        if step + 1 < steps:
            received, wait = ring_shift(block.tensors())
        yield block
        if step + 1 < steps:
            wait()
            block = cols.replaced(received)


def _sweep_backward(cols: Side, ring: bool, visit: Callable[[Side, torch.Tensor], None]) -> torch.Tensor:
    """Call ``visit(block, dblock)`` on every column block; return d(loss)/d(this rank's columns).

    In a ring the gradient accumulator travels with its block and is shifted once more at
    the end, so it comes home holding every rank's contribution (summed, like the backward
    of an all-gather).
    """
    steps = get_world_size() if ring and is_dist() else 1
    block, dblock = cols, torch.zeros(cols.x.shape, dtype=_acc_dtype(cols.x), device=cols.x.device)
    for step in range(steps):
        if step + 1 < steps:  # prefetch the next block's features while this one is scored
            received, wait_block = ring_shift(block.tensors())
        visit(block, dblock)
        if steps > 1:
            (dblock,), wait_grad = ring_shift([dblock])
            wait_grad()
        if step + 1 < steps:
            wait_block()
            block = cols.replaced(received)
    return dblock


class _TiledLSE(torch.autograd.Function):
    """``lse[i] = logsumexp_j z[i, j]`` over the non-dropped columns, tile by tile."""

    @staticmethod
    def forward(ctx, scorer, tile, ring, row_meta, col_meta, row_x, col_x):
        rows, cols = Side(row_x, row_meta), Side(col_x, col_meta)
        acc = _acc_dtype(row_x)
        m = torch.full((len(rows),), -math.inf, dtype=acc, device=row_x.device)  # running max
        s = torch.zeros_like(m)  # running sum of exp(z - m)
        for block in _column_blocks(cols, ring):
            for r0, r1 in _spans(len(rows), tile):
                rt = rows.slice(r0, r1)
                for c0, c1 in _spans(len(block), tile):
                    z = _masked_scores(scorer, rt, block.slice(c0, c1))
                    new = torch.maximum(m[r0:r1], z.amax(dim=1))
                    safe = new.masked_fill(new == -math.inf, 0.0)  # a fully dropped tile: no -inf - -inf
                    s[r0:r1].mul_(torch.exp(m[r0:r1] - safe)).add_(z.sub_(safe[:, None]).exp_().sum(dim=1))
                    m[r0:r1] = new
        lse = m + torch.log(s)
        ctx.save_for_backward(row_x, col_x, lse)
        ctx.scorer, ctx.tile, ctx.ring, ctx.row_meta, ctx.col_meta = scorer, tile, ring, row_meta, col_meta
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

        dcols = _sweep_backward(cols, ctx.ring, visit)
        return None, None, None, None, None, drows.to(row_x.dtype), dcols.to(col_x.dtype)


def _masked_scores(scorer: Scorer, rows: Side, cols: Side) -> torch.Tensor:
    """One tile of scores in the accumulation dtype, dropped pairs at -inf (weight 0 in the softmax)."""
    z = scorer.score(rows, cols).to(_acc_dtype(rows.x))
    drop = dropped(rows, cols)
    return z if drop is None else z.masked_fill_(drop, -math.inf)


def tiled_logsumexp(
    rows: Side, cols: Side, tile: int, scorer: Scorer | None = None, ring: bool = False
) -> torch.Tensor:
    """``[B]`` logsumexp over columns of ``scorer(rows, cols)`` with masks from the metadata.

    Differentiable in ``rows.x`` and ``cols.x``. ``ring``: ``cols`` are this rank's columns
    only (padded with `ring_pad`); every rank must call it (and its backward) together.
    """
    return _TiledLSE.apply(scorer or DotScorer(), int(tile), bool(ring), rows.meta, cols.meta, rows.x, cols.x)


def signed_logits(rows: Side, cols: Side, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``sign * (z + bias)`` (+1 for positives: the own column or a shared label, else -1),
    the positive mask and the valid-column mask (None: all valid)."""
    z = (rows.x @ cols.x.T).to(_acc_dtype(rows.x)) + bias
    positive = rows.meta["id"][:, None] == cols.meta["id"][None, :]
    if "label" in rows.meta and "label" in cols.meta:
        positive |= (rows.meta["label"][:, None] == cols.meta["label"][None, :]) & (cols.meta["id"] >= 0)[None, :]
    signed = torch.where(positive, z, -z)
    keep = cols.meta["valid"][None, :] if "valid" in cols.meta else None
    return signed, positive, keep


class _TiledSigmoid(torch.autograd.Function):
    """``sum_ij -log sigmoid(sign_ij * (z_ij + bias))`` over valid pairs, tile by tile."""

    @staticmethod
    def forward(ctx, tile, ring, row_meta, col_meta, row_x, col_x, bias):
        rows, cols = Side(row_x, row_meta), Side(col_x, col_meta)
        total = torch.zeros((), dtype=_acc_dtype(row_x), device=row_x.device)
        for block in _column_blocks(cols, ring):
            for r0, r1 in _spans(len(rows), tile):
                rt = rows.slice(r0, r1)
                for c0, c1 in _spans(len(block), tile):
                    signed, _, keep = signed_logits(rt, block.slice(c0, c1), bias)
                    terms = -torch.nn.functional.logsigmoid(signed)
                    total += (terms if keep is None else terms.masked_fill_(~keep, 0.0)).sum()
        ctx.save_for_backward(row_x, col_x, bias)
        ctx.tile, ctx.ring, ctx.row_meta, ctx.col_meta = tile, ring, row_meta, col_meta
        return total.to(row_x.dtype)

    @staticmethod
    def backward(ctx, grad):
        row_x, col_x, bias = ctx.saved_tensors
        rows, cols, tile = Side(row_x, ctx.row_meta), Side(col_x, ctx.col_meta), ctx.tile
        acc = _acc_dtype(row_x)
        drows = torch.zeros(row_x.shape, dtype=acc, device=row_x.device)
        dbias = torch.zeros((), dtype=acc, device=row_x.device)
        grad = grad.to(acc)

        def visit(block: Side, dblock: torch.Tensor) -> None:
            for r0, r1 in _spans(len(rows), tile):
                rt = rows.slice(r0, r1)
                for c0, c1 in _spans(len(block), tile):
                    ct = block.slice(c0, c1)
                    signed, positive, keep = signed_logits(rt, ct, bias)
                    # d/dz of -log sigmoid(sign * z) is -sign * sigmoid(-sign * z).
                    dsigned = torch.sigmoid(signed.neg_()).mul_(grad)
                    dz = torch.where(positive, -dsigned, dsigned)
                    if keep is not None:
                        dz.masked_fill_(~keep, 0.0)
                    dbias.add_(dz.sum())
                    DotScorer().accumulate(rt, ct, dz, drows[r0:r1], dblock[c0:c1])

        dcols = _sweep_backward(cols, ctx.ring, visit)
        dbias = dbias.to(bias.dtype) if ctx.needs_input_grad[6] else None
        return None, None, None, None, drows.to(row_x.dtype), dcols.to(col_x.dtype), dbias


def tiled_sigmoid_loss(rows: Side, cols: Side, bias: torch.Tensor, tile: int, ring: bool = False) -> torch.Tensor:
    """Sum over valid pairs of ``-log sigmoid(+-(rows.x_i . cols.x_j + bias))`` (+ for positives).

    Positives: a column whose ``id`` equals the row's ``id``, or (labels given) a labelled column
    with the row's label. Differentiable in ``rows.x``, ``cols.x`` and ``bias`` (a 0-d tensor).
    """
    return _TiledSigmoid.apply(int(tile), bool(ring), rows.meta, cols.meta, rows.x, cols.x, bias)
