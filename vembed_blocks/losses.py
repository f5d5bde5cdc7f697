"""Embedding losses: InfoNCE, SigLIP, Triplet, CoSENT, Matryoshka, Distill.

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
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._loss_utils import (
    Side,
    check_mask,
    check_rows,
    check_temperature,
    dropped,
    exchange,
    flatten_negatives,
    on_device,
    resolve_tile,
    scale_param,
    signed_logits,
)
from .distributed import is_dist

__all__ = ["InfoNCE", "SigLIP", "Triplet", "CoSENT", "Matryoshka", "Distill"]


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
    - ``symmetric``: also each positive against all (gathered) queries, the two averaged.

    Logits are ``cos / temperature``; with ``learn_temperature`` the log of ``1/temperature``
    is a parameter (put the loss's parameters in your optimizer).

    Memory (`vembed_blocks.tiled`): ``tile_size=None`` computes the dense ``[B, N]`` logits
    unless they would exceed ``AUTO_TILE_ELEMENTS`` (2**26) elements, and otherwise tiles of
    ``AUTO_TILE_SIZE`` (4096) rows x candidates; ``0`` forces dense, ``n > 0`` forces tiles of
    n x n. Tiled, extra memory is ``O((B + N) * D + tile^2)`` and the result equals the dense
    loss. ``ring=True`` (with ``gather`` under a process group): candidates are not gathered
    but passed rank to rank, so no rank holds them all (always tiled). ``group``: the process
    group to gather over (default None: the world); every collective of the call runs on it.
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
    ) -> None:
        super().__init__()
        check_temperature("InfoNCE", temperature)
        resolve_tile(tile_size, 0, 0)  # validates
        self.log_scale = scale_param(math.log(1.0 / temperature), learn_temperature)
        self.learn, self.symmetric, self.gather = learn_temperature, symmetric, gather
        self.tile_size, self.ring, self.group = tile_size, ring, group

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
    ) -> torch.Tensor:
        check_rows("InfoNCE", query=query, positive=positive)
        if query.dim() != 2:
            raise ValueError(f"InfoNCE: query must be [B, D], got shape {tuple(query.shape)}")
        check_mask("InfoNCE", "labels", labels, query.shape[:1])
        neg, neg_valid = flatten_negatives("InfoNCE", query.shape[0], query.shape[1], negatives, negatives_mask)
        q, p = F.normalize(query, dim=-1), F.normalize(positive, dim=-1)
        neg = None if neg is None else F.normalize(neg, dim=-1)
        scale = torch.exp(on_device(self.log_scale, q)) if self.learn else math.exp(self.log_scale)
        ring = self.ring and self.gather and is_dist(self.group)
        # One exchange serves both directions: the queries travel too when symmetric.
        cols = [p, q] if self.symmetric else [p]
        cand = exchange(cols, labels, neg, neg_valid, gather_on=self.gather, ring=ring, group=self.group)
        loss = self._direction(*cand.sides(scale * q, cand.cols[0]), p, ring)
        if not self.symmetric:
            return loss
        return (loss + self._direction(*cand.sides(scale * p, cand.cols[1], negatives=False), q, ring)) / 2

    def _direction(self, rows: Side, cols: Side, own: torch.Tensor, ring: bool) -> torch.Tensor:
        """Mean cross-entropy of each row's own column (``own``, unscaled) among its candidates."""
        tile = resolve_tile(self.tile_size, len(rows), len(cols), ring=ring)
        if tile is None:  # dense: the whole score matrix at once
            logits = rows.x @ cols.x.T
            drop = dropped(rows, cols)
            logits = logits if drop is None else logits.masked_fill(drop, float("-inf"))
            return F.cross_entropy(logits, rows.meta["id"])
        from .tiled import tiled_logsumexp  # the kernels load when a loss first tiles

        lse = tiled_logsumexp(rows, cols, tile, ring=ring, group=self.group)
        return (lse - (rows.x * own).sum(-1)).mean()


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
    ) -> None:
        super().__init__()
        check_temperature("SigLIP", temperature)
        resolve_tile(tile_size, 0, 0)  # validates
        self.log_scale = scale_param(math.log(temperature), learn)
        self.bias = scale_param(bias, learn)
        self.learn, self.gather, self.tile_size, self.ring, self.group = learn, gather, tile_size, ring, group

    def forward(
        self,
        a: torch.Tensor,
        b: torch.Tensor,
        labels: torch.Tensor | None = None,
        negatives: torch.Tensor | None = None,
        negatives_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        check_rows("SigLIP", a=a, b=b)
        if a.dim() != 2:
            raise ValueError(f"SigLIP: a must be [B, D], got shape {tuple(a.shape)}")
        check_mask("SigLIP", "labels", labels, a.shape[:1])
        neg, neg_valid = flatten_negatives("SigLIP", a.shape[0], a.shape[1], negatives, negatives_mask)
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
        neg = None if neg is None else F.normalize(neg, dim=-1)
        scale = torch.exp(on_device(self.log_scale, a)) if self.learn else math.exp(self.log_scale)
        bias = on_device(self.bias, a) if self.learn else torch.tensor(self.bias, dtype=a.dtype, device=a.device)
        ring = self.ring and self.gather and is_dist(self.group)
        cand = exchange([b], labels, neg, neg_valid, gather_on=self.gather, ring=ring, group=self.group)
        rows, cols = cand.sides(scale * a, cand.cols[0])
        tile = resolve_tile(self.tile_size, len(rows), len(cols), ring=ring)
        if tile is None:  # dense: every pair at once
            signed, _, keep = signed_logits(rows, cols, bias)
            terms = -F.logsigmoid(signed)
            # Summed in float32 (signed_logits), returned in the inputs' dtype like the tiled path.
            return ((terms if keep is None else terms * keep).sum() / a.shape[0]).to(rows.x.dtype)
        from .tiled import tiled_sigmoid_loss

        return tiled_sigmoid_loss(rows, cols, bias, tile, ring=ring, group=self.group) / a.shape[0]


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


# ----------------------------------------------------------------------------- Matryoshka


class Matryoshka(nn.Module):
    """Sum over nested prefixes of the embedding: ``sum_d weight_d * loss(x[..., :d], ...)``.

    ``forward(*args, **kwargs)`` calls ``loss`` once per dim with the arguments named in
    ``truncate`` cut to their first d features; every other argument (masks, labels, scores,
    a `Distill` teacher's embeddings) passes unchanged, whatever its width. ``truncate`` holds
    positions (int) and keyword names (str); an entry that is absent in a call (e.g. no
    ``negatives``) is skipped. Default: the loss's ``matryoshka_args``: `InfoNCE` / `SigLIP`
    ``(0, 1, "negatives")``, `Triplet` ``(0, 1, 2, "negatives")``, `ColBERT` ``(0, 2, 4,
    "negatives")`` (token embeddings, not masks), `Distill` ``(0, 1)`` (the student only); a
    loss without that attribute needs ``truncate`` given. The full dim is that of the first
    positional argument; a truncated argument of another width is an error. ``dims`` are sorted largest first with their
    ``weights`` kept paired (default all 1).
    """

    def __init__(
        self,
        loss: Callable[..., torch.Tensor],
        dims: Sequence[int],
        weights: Sequence[float] | None = None,
        truncate: Sequence[int | str] | None = None,
    ) -> None:
        super().__init__()
        dims = [int(d) for d in dims]
        weights = [1.0] * len(dims) if weights is None else [float(w) for w in weights]
        if not dims:
            raise ValueError("Matryoshka: dims is empty")
        if len(weights) != len(dims):
            raise ValueError(f"Matryoshka: {len(dims)} dims but {len(weights)} weights")
        if min(dims) <= 0 or len(set(dims)) != len(dims):
            raise ValueError(f"Matryoshka: dims must be distinct positive integers, got {dims}")
        if truncate is None:
            truncate = getattr(loss, "matryoshka_args", None)  # a class attribute: no import of every loss
            if truncate is None:
                raise ValueError(
                    f"Matryoshka: pass truncate= (the positions / keyword names of the embedding "
                    f"arguments of {type(loss).__name__} to cut)"
                )
        pairs = sorted(zip(dims, weights), key=lambda dw: -dw[0])
        self.loss, self.truncate = loss, tuple(truncate)
        self.dims = [d for d, _ in pairs]
        self.weights = [w for _, w in pairs]

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not args or not torch.is_tensor(args[0]):
            raise ValueError("Matryoshka: the first positional argument must be an embedding tensor")
        full = args[0].shape[-1]
        if self.dims[0] > full:
            raise ValueError(f"Matryoshka: dim {self.dims[0]} is larger than the embedding dim {full}")
        named = [(i, x) for i, x in enumerate(args) if i in self.truncate]
        named += [(k, x) for k, x in kwargs.items() if k in self.truncate]
        for key, x in named:
            if x is not None and (not torch.is_tensor(x) or x.shape[-1] != full):
                shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
                raise ValueError(f"Matryoshka: argument {key!r} is to be truncated but is {shape}, not [..., {full}]")

        def cut(key: int | str, x: Any, d: int) -> Any:
            return x[..., :d] if key in self.truncate and x is not None else x

        total = 0
        for d, w in zip(self.dims, self.weights):
            cut_args = [cut(i, x, d) for i, x in enumerate(args)]
            total = total + w * self.loss(*cut_args, **{k: cut(k, v, d) for k, v in kwargs.items()})
        return total


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
