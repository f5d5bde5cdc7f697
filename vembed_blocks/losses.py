"""Embedding losses: InfoNCE, SigLIP, Triplet, CoSENT, Distill (and Matryoshka, from `vembed_blocks.matryoshka`).

Inputs are raw embeddings; cosine losses normalise internally. B rows, D dims, K negatives.
Imports torch, `_loss_utils` and `distributed`; the tiled kernels (`vembed_blocks.tiled`) load
the first time a loss tiles. ColBERT and mining are blocks of their own.

Distributed (``gather=True``): each rank scores its own B rows against the candidates
gathered from every rank of ``group`` (default: the world) with gradient, and averages over
its own rows. With DDP/FSDP averaging gradients over W ranks, parameter gradients equal those
of one process on the concatenated global batch. The returned loss is this rank's mean; the
global loss is the mean of the ranks' losses (for equal local batch sizes). A gathered call
runs 3 collectives and reads the host once (`_loss_utils.exchange`), whatever the data.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._loss_utils import (
    Side,
    candidate_masks,
    check_mask,
    check_rows,
    check_temperature,
    exchange,
    flatten_negatives,
    on_device,
    resolve_tile,
    scale_param,
    signed_logits,
    weighted,
)
from .distributed import is_dist
from .false_negatives import FalseNegatives, per_side, row_rules

__all__ = ["InfoNCE", "SigLIP", "Triplet", "CoSENT", "Distill"]  # and Matryoshka (below)


def __getattr__(name: str):
    if name == "Matryoshka":  # its own block (`vembed_blocks.matryoshka`), loaded only when asked for
        from .matryoshka import Matryoshka

        return Matryoshka
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------- InfoNCE


class InfoNCE(nn.Module):
    """Contrastive cross-entropy of each query against every (gathered) positive and hard negative.

    ``forward(query[B,D], positive[B,D], negatives=None, negatives_mask=None, labels=None)``:

    - candidates for each query: all positives in the global batch plus all hard negatives in
      the global batch; the target is the query's own positive;
    - ``negatives``: ``[B,K,D]`` per-row (``negatives_mask[B,K]`` True = real, so rows may have
      fewer) or ``[M,D]`` a pool (each rank's pool is gathered too);
    - ``labels[B]``: positives of other rows with the same label are removed from the
      candidates (duplicates are not negatives);
    - ``symmetric``: also each positive against all (gathered) queries, the two averaged;
    - ``false_negatives`` (`FalseNegatives`) with ``content_ids`` / ``guide`` (dicts of ``query``,
      ``positive``, ``negatives``): the false-negative rules of `vembed_blocks.false_negatives`;
      ``masked`` then holds each rule's hit count of the last call.

    Logits are ``cos / temperature``; with ``learn_temperature`` the log of ``1/temperature``
    is a parameter (put the loss's parameters in your optimizer).

    Memory (`vembed_blocks.tiled`): ``tile_size=None`` computes the dense ``[B, N]`` logits
    unless they would exceed ``AUTO_TILE_ELEMENTS`` (2**26) elements, and otherwise tiles of
    ``AUTO_TILE_SIZE`` (4096) rows x candidates; ``0`` forces dense, ``n > 0`` forces tiles of
    n x n. Tiled, extra memory is ``O((B + N) * D + tile^2)`` and the result equals the dense
    loss. ``ring=True`` (with ``gather`` under a process group): candidates are not gathered
    but passed rank to rank, so no rank holds them all (always tiled). ``group``: the process
    group to gather over (default None: the world); every collective of the call runs on it.
    ``in_batch_negatives=False``: each query against its own positive and its own hard negatives
    only (classification tasks), nothing gathered; semantics in `vembed_blocks._own_candidates`.
    """

    matryoshka_args = (0, 1, "negatives")  # what `Matryoshka` truncates by default

    def __init__(
        self,
        temperature: float = 0.05,
        learn_temperature: bool = False,
        symmetric: bool = False,
        gather: bool = True,
        tile_size: int | None = None,
        ring: bool = False,
        group=None,
        false_negatives: FalseNegatives | None = None,
        in_batch_negatives: bool = True,
    ) -> None:
        super().__init__()
        check_temperature("InfoNCE", temperature)
        resolve_tile(tile_size, 0, 0)  # validates
        if not in_batch_negatives:  # its own module: loads only when used (each block loads <= 3 others)
            from ._own_candidates import check_own

            check_own(in_batch_negatives, symmetric, ring)
        self.log_scale = scale_param(math.log(1.0 / temperature), learn_temperature)
        self.learn, self.symmetric, self.gather = learn_temperature, symmetric, gather
        self.tile_size, self.ring, self.group = tile_size, ring, group
        self.false_negatives, self.masked, self.in_batch = false_negatives, {}, in_batch_negatives

    @property
    def temperature(self) -> float:
        return math.exp(-float(self.log_scale.detach() if torch.is_tensor(self.log_scale) else self.log_scale))

    def forward(
        self,
        query: torch.Tensor,
        positive: torch.Tensor,
        negatives: torch.Tensor | None = None,
        negatives_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        content_ids: dict[str, torch.Tensor] | None = None,
        guide: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        check_rows("InfoNCE", query=query, positive=positive)
        if query.dim() != 2:
            raise ValueError(f"InfoNCE: query must be [B, D], got shape {tuple(query.shape)}")
        check_mask("InfoNCE", "labels", labels, query.shape[:1])
        b, sides = query.shape[0], ("query", "positive") if self.symmetric else ("positive",)
        shape = None if negatives is None else tuple(negatives.shape[:-1])
        ids = per_side("InfoNCE", "content_ids", content_ids, b, shape, sides, query.device)
        gd = per_side("InfoNCE", "guide", guide, b, shape, ("query", "positive"), query.device)
        neg, neg_valid = flatten_negatives("InfoNCE", b, query.shape[1], negatives, negatives_mask)
        q, p = F.normalize(query, dim=-1), F.normalize(positive, dim=-1)
        neg = None if neg is None else F.normalize(neg, dim=-1)
        scale = torch.exp(on_device(self.log_scale, q)) if self.learn else math.exp(self.log_scale)
        fn, self.masked, qs = self.false_negatives, {}, scale * q
        rules = row_rules(fn, (qs * p).sum(-1), scale, *_rule_inputs(ids, gd, 1, 0))
        if not self.in_batch:  # each row's own candidates: no exchange
            from ._own_candidates import own_loss

            return own_loss(qs, p, neg, neg_valid, shape, rules, ids, gd, self.masked, self.gather, self.group)
        ring = self.ring and self.gather and is_dist(self.group)
        # One exchange serves both directions: the queries travel too when symmetric.
        cols, order = ([p, q], [1, 0, 2]) if self.symmetric else ([p], [1, 2])
        pick = lambda xs: None if xs is None else [xs[i] for i in order]  # noqa: E731
        cand = exchange(
            cols,
            labels,
            neg,
            neg_valid,
            gather_on=self.gather,
            ring=ring,
            group=self.group,
            content=pick(ids),
            guide=pick(gd),
        )
        loss = self._direction(*cand.sides(qs, 0, row_meta=rules), p, ring)
        if not self.symmetric:
            return loss
        ps = scale * p
        rules = row_rules(fn, (ps * q).sum(-1), scale, *_rule_inputs(ids, gd, 0, 1))
        return (loss + self._direction(*cand.sides(ps, 1, negatives=False, row_meta=rules), q, ring)) / 2

    def _direction(self, rows: Side, cols: Side, own: torch.Tensor, ring: bool) -> torch.Tensor:
        """Mean cross-entropy of each row's own column (``own``, unscaled) among its candidates."""
        tile = resolve_tile(self.tile_size, len(rows), len(cols), ring=ring)
        if tile is None:  # dense: the whole score matrix at once
            logits = rows.x @ cols.x.T
            drop, down = candidate_masks(rows, cols, logits, self.masked)
            logits = logits if down is None else logits + down
            logits = logits if drop is None else logits.masked_fill(drop, float("-inf"))
            return F.cross_entropy(logits, rows.meta["id"])
        from .tiled import tiled_logsumexp  # the kernels load when a loss first tiles

        lse = tiled_logsumexp(rows, cols, tile, ring=ring, group=self.group, tally=self.masked)
        return (lse - (rows.x * own).sum(-1)).mean()


def _rule_inputs(ids, guide, target: int, row: int) -> tuple:
    """(content ids of the rows' targets, guide of the rows, guide of their targets) from `per_side` lists
    (index 0 queries, 1 positives)."""
    return (
        None if ids is None else ids[target],
        None if guide is None else guide[row],
        None if guide is None else guide[target],
    )


# ----------------------------------------------------------------------------- SigLIP


class SigLIP(nn.Module):
    """Pairwise sigmoid loss: ``-sum_ij log sigmoid(z_ij (t cos(a_i, b_j) + bias)) / B``.

    ``forward(a[B,D], b[B,D], labels=None, negatives=None, negatives_mask=None)``.
    ``z_ij = +1`` for the pair (i, i) and for pairs with equal ``labels`` (integers >= 0; a
    negative label means none), else ``-1``. Hard ``negatives`` (``[B,K,D]`` with
    ``negatives_mask[B,K]``, or a pool ``[M,D]``, as for `InfoNCE`) are extra columns of ``b``
    that are negative for every row of ``a``; masked ones are left out.
    ``t`` (init ``temperature``) and ``bias`` are learnable when ``learn`` (t as a log).
    Distributed: this rank's rows of ``a`` against the gathered ``b`` (the local positive
    block plus negative-only blocks from other ranks), divided by the local B, so the
    mean over ranks is the dense loss of the global batch. ``tile_size`` / ``ring`` / ``group``:
    as for `InfoNCE` (pairs are independent, so tiles need no running statistics).
    ``false_negatives`` with ``content_ids`` / ``guide`` (``query`` = a, ``positive`` = b): as for
    `InfoNCE`; a pair the rules drop adds no term (one they down-weight, ``weight`` times its term).
    """

    matryoshka_args = (0, 1, "negatives")

    def __init__(
        self,
        temperature: float = 10.0,
        bias: float = -10.0,
        learn: bool = True,
        gather: bool = True,
        tile_size: int | None = None,
        ring: bool = False,
        group=None,
        false_negatives: FalseNegatives | None = None,
    ) -> None:
        super().__init__()
        check_temperature("SigLIP", temperature)
        resolve_tile(tile_size, 0, 0)  # validates
        self.log_scale = scale_param(math.log(temperature), learn)
        self.bias = scale_param(bias, learn)
        self.learn, self.gather, self.tile_size, self.ring, self.group = learn, gather, tile_size, ring, group
        self.false_negatives, self.masked = false_negatives, {}

    def forward(
        self,
        a: torch.Tensor,
        b: torch.Tensor,
        labels: torch.Tensor | None = None,
        negatives: torch.Tensor | None = None,
        negatives_mask: torch.Tensor | None = None,
        content_ids: dict[str, torch.Tensor] | None = None,
        guide: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        check_rows("SigLIP", a=a, b=b)
        if a.dim() != 2:
            raise ValueError(f"SigLIP: a must be [B, D], got shape {tuple(a.shape)}")
        check_mask("SigLIP", "labels", labels, a.shape[:1])
        shape = None if negatives is None else tuple(negatives.shape[:-1])
        ids = per_side("SigLIP", "content_ids", content_ids, a.shape[0], shape, ("positive",), a.device)
        gd = per_side("SigLIP", "guide", guide, a.shape[0], shape, ("query", "positive"), a.device)
        neg, neg_valid = flatten_negatives("SigLIP", a.shape[0], a.shape[1], negatives, negatives_mask)
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
        neg = None if neg is None else F.normalize(neg, dim=-1)
        scale = torch.exp(on_device(self.log_scale, a)) if self.learn else math.exp(self.log_scale)
        bias = on_device(self.bias, a) if self.learn else torch.tensor(self.bias, dtype=a.dtype, device=a.device)
        ring = self.ring and self.gather and is_dist(self.group)
        pick = lambda xs: None if xs is None else xs[1:]  # noqa: E731  (the columns: b, then the negatives)
        cand = exchange(
            [b],
            labels,
            neg,
            neg_valid,
            gather_on=self.gather,
            ring=ring,
            group=self.group,
            content=pick(ids),
            guide=pick(gd),
        )
        self.masked, sa = {}, scale * a
        rules = row_rules(self.false_negatives, (sa * b).sum(-1), scale, *_rule_inputs(ids, gd, 1, 0))
        rows, cols = cand.sides(sa, 0, row_meta=rules)
        tile = resolve_tile(self.tile_size, len(rows), len(cols), ring=ring)
        if tile is None:  # dense: every pair at once
            signed, _, weight = signed_logits(rows, cols, bias, self.masked)
            terms = -F.logsigmoid(signed)
            if weight is not None:  # weight-0 pairs exactly 0, whatever their term
                terms = weighted(terms, weight)
            # Summed in float32 (signed_logits), returned in the inputs' dtype like the tiled path.
            return (terms.sum() / a.shape[0]).to(rows.x.dtype)
        from .tiled import tiled_sigmoid_loss

        loss = tiled_sigmoid_loss(rows, cols, bias, tile, ring=ring, group=self.group, tally=self.masked)
        return loss / a.shape[0]


# ----------------------------------------------------------------------------- Triplet


class Triplet(nn.Module):
    """Margin loss ``relu(d(a, p) - d(a, n) + margin)``.

    ``distance``: ``"cosine"`` (1 - cos) or ``"euclidean"`` (on the raw embeddings).
    ``negatives``: None (in-batch: the other rows' positives), ``[B,D]`` (one per row) or
    ``[B,K,D]`` with optional ``negatives_mask[B,K]``. ``mining="hardest"`` takes each
    anchor's closest negative and averages over the anchors that have one; ``"all"`` averages
    over every valid (anchor, negative) triplet. Without any valid negative the loss is a zero
    that is still connected to the inputs (``backward`` works, gradients are zero).
    """

    matryoshka_args = (0, 1, 2, "negatives")

    def __init__(self, margin: float = 0.2, distance: str = "cosine", mining: str = "hardest") -> None:
        super().__init__()
        if distance not in ("cosine", "euclidean"):
            raise ValueError(f"Triplet: distance must be 'cosine' or 'euclidean', got {distance!r}")
        if mining not in ("hardest", "all"):
            raise ValueError(f"Triplet: mining must be 'hardest' or 'all', got {mining!r}")
        self.margin, self.distance, self.mining = margin, distance, mining

    def _dist(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.distance == "cosine":
            return 1 - F.cosine_similarity(x, y, dim=-1)
        return torch.linalg.vector_norm(x - y, dim=-1)

    def forward(
        self,
        anchor: torch.Tensor,
        positive: torch.Tensor,
        negatives: torch.Tensor | None = None,
        negatives_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        check_rows("Triplet", anchor=anchor, positive=positive)
        rows = anchor.shape[0]
        d_ap = self._dist(anchor, positive)
        if negatives is None:
            if rows < 2:
                raise ValueError("Triplet: in-batch negatives need a batch of at least 2 rows")
            d_an = self._dist(anchor[:, None, :], positive[None, :, :])
            valid = ~torch.eye(rows, dtype=torch.bool, device=anchor.device)
        else:
            check_rows("Triplet", anchor=anchor, negatives=negatives)
            neg = negatives[:, None, :] if negatives.dim() == 2 else negatives
            check_mask("Triplet", "negatives_mask", negatives_mask, neg.shape[:2])
            d_an = self._dist(anchor[:, None, :], neg)
            valid = torch.ones_like(d_an, dtype=torch.bool) if negatives_mask is None else negatives_mask.bool()
        if self.mining == "hardest":
            has = valid.any(dim=1)
            hardest = d_an.masked_fill(~valid, float("inf")).amin(dim=1)
            terms = F.relu(d_ap - hardest + self.margin)[has]
        else:
            terms = F.relu(d_ap[:, None] - d_an + self.margin)[valid]
        return terms.mean() if terms.numel() else d_ap.sum() * 0.0


# ----------------------------------------------------------------------------- CoSENT


class CoSENT(nn.Module):
    """Ranking loss on pair scores: ``log(1 + sum_{s_i > s_j} exp(scale (cos_j - cos_i)))``.

    ``forward(a[B,D], b[B,D], scores[B])``: pairs with a higher gold score should have a
    higher cosine than every pair with a lower gold score.
    """

    def __init__(self, scale: float = 20.0) -> None:
        super().__init__()
        check_temperature("CoSENT", scale, "scale")
        self.scale = scale

    def forward(self, a: torch.Tensor, b: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        check_rows("CoSENT", a=a, b=b)
        check_mask("CoSENT", "scores", scores, a.shape[:1])
        cos = F.cosine_similarity(a, b, dim=-1) * self.scale
        diff = cos[None, :] - cos[:, None]  # [i, j] = scale * (cos_j - cos_i)
        ordered = scores[:, None] > scores[None, :]
        return torch.logsumexp(torch.cat([diff.new_zeros(1), diff[ordered]]), dim=0)


# ----------------------------------------------------------------------------- Distill


class Distill(nn.Module):
    """Match the student's query-document similarity structure to a teacher's.

    ``forward(student_q[B,Ds], student_d[N,Ds], teacher_q[B,Dt], teacher_d[N,Dt])``; cosine
    score matrices ``S[B,N]`` for both (the teacher may have another dim, and may be
    precomputed; it gets no gradient). ``kind="kl"``: ``T^2 * mean_i KL(softmax(S_t,i / T) ||
    softmax(S_s,i / T))``; ``kind="mse"``: ``mean((S_s - S_t)^2)``. Nothing is gathered: to
    score against other ranks' documents, pass them gathered (`distributed.gather_with_grad`).
    """

    matryoshka_args = (0, 1)

    def __init__(self, temperature: float = 1.0, kind: str = "kl") -> None:
        super().__init__()
        check_temperature("Distill", temperature)
        if kind not in ("kl", "mse"):
            raise ValueError(f"Distill: kind must be 'kl' or 'mse', got {kind!r}")
        self.temperature, self.kind = temperature, kind

    def forward(
        self, student_q: torch.Tensor, student_d: torch.Tensor, teacher_q: torch.Tensor, teacher_d: torch.Tensor
    ) -> torch.Tensor:
        mats = {"student_q": student_q, "student_d": student_d, "teacher_q": teacher_q, "teacher_d": teacher_d}
        for key, x in mats.items():
            if x.dim() != 2 or x.shape[0] == 0:
                raise ValueError(f"Distill: {key} must be a non-empty [rows, D] matrix, got shape {tuple(x.shape)}")
        for a, b, axis, what in (
            ("student_q", "teacher_q", 0, "rows"),
            ("student_d", "teacher_d", 0, "rows"),
            ("student_q", "student_d", 1, "dims"),
            ("teacher_q", "teacher_d", 1, "dims"),
        ):
            if mats[a].shape[axis] != mats[b].shape[axis]:
                raise ValueError(f"Distill: {a} has {mats[a].shape[axis]} {what} but {b} has {mats[b].shape[axis]}")
        s = F.normalize(student_q, dim=-1) @ F.normalize(student_d, dim=-1).T
        with torch.no_grad():
            t = (
                F.normalize(teacher_q.detach().to(s.dtype), dim=-1)
                @ F.normalize(teacher_d.detach().to(s.dtype), dim=-1).T
            )
        if self.kind == "mse":
            return F.mse_loss(s, t)
        tau = self.temperature
        log_p_s = F.log_softmax(s / tau, dim=-1)
        log_p_t = F.log_softmax(t / tau, dim=-1)
        return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean") * tau**2
