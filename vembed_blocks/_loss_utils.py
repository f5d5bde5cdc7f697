"""What the loss modules share (private): input checks, the dense-or-tiled decision, score-matrix
sides and their masks, and the one exchange of candidates across ranks.

Kept apart from `vembed_blocks.tiled` so that a loss imports the tiled kernels only when it tiles.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn

from .distributed import all_gather_ints, gather_with_grad, get_rank, is_dist, pad_dim
from .false_negatives import has_rules, pair_filter

#: With ``tile_size=None`` a loss goes tiled when its dense score tensor would hold more than
#: this many elements (rows x candidates, times Lq x Ld for ColBERT): 2**26 float32 = 256 MiB.
AUTO_TILE_ELEMENTS = 1 << 26
#: Elements per tile chosen automatically (4096 x 4096 scores = 64 MiB in float32).
AUTO_TILE_SIZE = 4096


def check_rows(name: str, **tensors: torch.Tensor) -> None:
    """All tensors non-empty, at least 2-D, same number of rows and same last dim."""
    items = list(tensors.items())
    for key, t in items:
        if t.dim() < 2:
            raise ValueError(f"{name}: {key} must be [B, ..., D], got shape {tuple(t.shape)}")
        if t.shape[0] == 0:
            raise ValueError(f"{name}: {key} is an empty batch")
    key0, t0 = items[0]
    for key, t in items[1:]:
        if t.shape[0] != t0.shape[0]:
            raise ValueError(f"{name}: {key0} has {t0.shape[0]} rows but {key} has {t.shape[0]}")
        if t.shape[-1] != t0.shape[-1]:
            raise ValueError(f"{name}: {key0} has dim {t0.shape[-1]} but {key} has dim {t.shape[-1]}")


def check_temperature(name: str, value: float, what: str = "temperature") -> None:
    if not value > 0:
        raise ValueError(f"{name}: {what} must be > 0, got {value}")


def check_mask(name: str, key: str, mask: torch.Tensor | None, shape: Sequence[int]) -> None:
    if mask is not None and tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name}: {key} must have shape {tuple(shape)}, got {tuple(mask.shape)}")


def scale_param(value: float, learn: bool) -> nn.Parameter | float:
    """A learnable scalar parameter, or a plain float (exact in any input dtype)."""
    return nn.Parameter(torch.tensor(float(value))) if learn else float(value)


def on_device(value: nn.Parameter | float, like: torch.Tensor) -> torch.Tensor | float:
    """``value`` moved to ``like``'s device if it is a tensor."""
    return value.to(like.device) if torch.is_tensor(value) else value


def flatten_negatives(
    name: str, rows: int, dim: int, negatives: torch.Tensor | None, mask: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Flatten hard negatives: [B,K,D] (+mask[B,K]) or [M,D] (+mask[M]) -> candidates [N,D], validity [N] or None."""
    if negatives is None:
        if mask is not None:
            raise ValueError(f"{name}: negatives_mask given without negatives")
        return None, None
    if negatives.dim() == 3:
        if negatives.shape[0] != rows:
            raise ValueError(f"{name}: negatives has {negatives.shape[0]} rows but query has {rows}")
        check_mask(name, "negatives_mask", mask, negatives.shape[:2])
        flat = negatives.reshape(-1, negatives.shape[-1])
        mask = None if mask is None else mask.reshape(-1)
    elif negatives.dim() == 2:
        check_mask(name, "negatives_mask", mask, negatives.shape[:1])
        flat = negatives
    else:
        raise ValueError(f"{name}: negatives must be [B, K, D] or [M, D], got shape {tuple(negatives.shape)}")
    if flat.shape[-1] != dim:
        raise ValueError(f"{name}: query has dim {dim} but negatives have dim {flat.shape[-1]}")
    return flat, (None if mask is None else mask.bool())


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
    """Rows (or columns) of a score matrix: features ``x[n, ...]`` plus per-row ``meta`` tensors ``[n, ...]``.

    ``meta``: ``id`` (rows: the global id of the row's target column; columns: their global id,
    -1 for hard negatives), optional ``label``, optional ``valid`` (columns; False = not a
    candidate), and anything a scorer needs (ColBERT's ``tokens`` masks).
    """

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


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    """Statistics and accumulators in at least float32 (bf16/fp16 inputs)."""
    return torch.promote_types(x.dtype, torch.float32)


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


def candidate_masks(
    rows: Side, cols: Side, z: torch.Tensor, tally: dict | None = None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(drop[r, c], down[r, c])`` for a softmax over columns: what `dropped` removes plus what the
    false-negative rules remove (`false_negatives.pair_filter`), and the rules' log-weights."""
    drop = dropped(rows, cols)
    if not has_rules(rows.meta):
        return drop, None
    eligible = rows.meta["id"][:, None] != cols.meta["id"][None, :]
    eligible = eligible if drop is None else eligible & ~drop
    more, down = pair_filter(rows.meta, cols.meta, z, eligible, tally)
    if more is not None:
        drop = more if drop is None else drop | more
    return drop, down


def weighted(terms: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``terms * weight`` with weight-0 pairs exactly 0 (whatever their term)."""
    return torch.where(weight > 0, terms * weight, torch.zeros((), dtype=terms.dtype, device=terms.device))


def signed_logits(
    rows: Side, cols: Side, bias: torch.Tensor, tally: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``sign * (z + bias)`` (+1 for positives: the own column or a shared label, else -1),
    the positive mask and the pair weights (None: all 1; 0 for invalid columns and pairs the
    false-negative rules drop, ``weight`` for those they down-weight)."""
    z = (rows.x @ cols.x.T).to(acc_dtype(rows.x))
    positive = rows.meta["id"][:, None] == cols.meta["id"][None, :]
    if "label" in rows.meta and "label" in cols.meta:
        positive |= (rows.meta["label"][:, None] == cols.meta["label"][None, :]) & (cols.meta["id"] >= 0)[None, :]
    keep = cols.meta["valid"][None, :] if "valid" in cols.meta else None
    weight = None if keep is None else keep.to(z.dtype).expand_as(z)
    if has_rules(rows.meta):
        eligible = ~positive if keep is None else ~positive & keep
        drop, down = pair_filter(rows.meta, cols.meta, z, eligible, tally)
        if drop is not None or down is not None:
            weight = torch.ones_like(z) if weight is None else weight.clone()
            if down is not None:
                weight = weight * down.exp()
            if drop is not None:
                weight = weight.masked_fill(drop, 0.0)
    z = z + bias
    return torch.where(positive, z, -z), positive, weight


def ring_pad(cols: Side, n: int) -> Side:
    """Pad a column block to ``n`` (the largest block over ranks) so every ring message has one shape.

    Padding columns are invalid (``valid`` False, ``id`` -1); token masks are padded with True
    so that a scorer never sees an all-padding candidate (its score is finite, then dropped).
    """
    meta = dict(cols.meta)
    meta.setdefault("valid", torch.ones(len(cols), dtype=torch.bool, device=cols.x.device))
    fill = {"valid": False, "id": -1, "tokens": True, "content": -1}
    return Side(pad_dim(cols.x, 0, n), {k: pad_dim(v, 0, n, fill.get(k, 0)) for k, v in meta.items()})


def unique_unlabelled(labels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Labels with each unlabelled entry (``label < 0``) replaced by ``-1 - id``: shared with nobody."""
    return torch.where(labels < 0, -1 - ids, labels)


def gather_parts(parts: list[torch.Tensor], shapes: list[list[tuple[int, ...]]], group=None) -> list[torch.Tensor]:
    """Several tensors of one dtype from every rank in one all-gather, with gradient (a float dtype).

    ``shapes[r][i]`` is rank r's shape of ``parts[i]`` (known to every rank, e.g. from
    `all_gather_ints`). Returns, for each part, every rank's rows concatenated in rank order.
    The backward is one all-reduce (see `distributed.gather_with_grad`).
    """
    numels = [[math.prod(s) for s in rank] for rank in shapes]
    flat = torch.cat([p.reshape(-1) for p in parts])
    if torch.is_grad_enabled() and flat.is_floating_point() and not flat.requires_grad:
        # In the graph on every rank, so a rank whose own inputs need no gradient (say, its only
        # trainable input is negatives it does not have) still runs the backward's all-reduce.
        flat.requires_grad_()
    pieces = gather_with_grad(flat, group, sizes=[sum(n) for n in numels]).split([n for r in numels for n in r])
    k = len(parts)
    return [torch.cat([pieces[r * k + i].view(shapes[r][i]) for r in range(len(shapes))]) for i in range(k)]


@dataclass
class Candidates:
    """The columns a contrastive loss scores its rows against, after the ranks' one exchange.

    ``cols``: per column tensor asked for, every rank's rows in rank order (``[sum_r B_r, D]``),
    or this rank's own on a ring / without gathering; ``negatives[M, D]`` / ``valid[M]`` likewise;
    ``labels[B]`` this rank's and ``col_labels`` those of ``cols``; ``offset`` the global id of
    this rank's first row; ``sizes`` / ``negs`` every rank's row and negative counts;
    ``content`` / ``guide``: per column tensor, then the negatives, their content ids ``[n]``
    and guide embeddings ``[n, G]`` (None when no rank has them), gathered like ``cols``.
    """

    cols: list[torch.Tensor]
    negatives: torch.Tensor | None
    valid: torch.Tensor | None
    labels: torch.Tensor | None
    col_labels: torch.Tensor | None
    offset: int
    sizes: list[int]
    negs: list[int]
    ring: bool
    content: list[torch.Tensor] | None = None
    guide: list[torch.Tensor] | None = None

    def sides(
        self, rows: torch.Tensor, k: int = 0, negatives: bool = True, row_meta: dict | None = None
    ) -> tuple[Side, Side]:
        """``rows[B, D]`` (this rank's, scaled) and the column tensor ``cols[k]`` (+ the hard negatives),
        with masks; ``row_meta``: more row metadata (the false-negative rules')."""
        dev, cols = rows.device, self.cols[k]
        row_id = self.offset + torch.arange(rows.shape[0], device=dev)
        # Gathered columns start at global id 0; a ring's (or an ungathered loss's) are this rank's own.
        col_id = (self.offset if self.ring else 0) + torch.arange(len(cols), device=dev)
        row_meta, col_meta = {"id": row_id, **(row_meta or {})}, {"id": col_id}
        if self.labels is not None:
            row_meta["label"] = unique_unlabelled(self.labels, row_id)
            col_meta["label"] = unique_unlabelled(self.col_labels, col_id)
        neg = self.negatives if negatives else None
        for key, per_col in (("content", self.content), ("guide", self.guide)):
            if per_col is not None:
                col_meta[key] = per_col[k] if neg is None else torch.cat([per_col[k], per_col[-1]])
        if neg is not None:  # extra columns: id -1 (nobody's target), label never compared
            m = neg.shape[0]
            cols = torch.cat([cols, neg.to(cols.dtype)])
            for key in ("id", "label"):
                if key in col_meta:
                    col_meta[key] = torch.cat([col_meta[key], col_meta[key].new_full((m,), -1 if key == "id" else 0)])
            if self.valid is not None:
                col_meta["valid"] = torch.cat([torch.ones(len(cols) - m, dtype=torch.bool, device=dev), self.valid])
        side = Side(cols, col_meta)
        if self.ring:
            side = ring_pad(side, max(s + (n if neg is not None else 0) for s, n in zip(self.sizes, self.negs)))
        return Side(rows, row_meta), side


def exchange(
    cols: list[torch.Tensor],
    labels: torch.Tensor | None = None,
    negatives: torch.Tensor | None = None,
    negatives_valid: torch.Tensor | None = None,
    *,
    gather_on: bool,
    ring: bool = False,
    group=None,
    content: list[torch.Tensor | None] | None = None,
    guide: list[torch.Tensor | None] | None = None,
) -> Candidates:
    """Gather a contrastive loss's candidates from every rank of ``group``: 3 collectives, 1 host read.

    ``cols``: this rank's ``[B, D]`` column tensors (the positives; a symmetric loss adds the
    queries); ``labels[B]`` integer ids (< 0: none); ``negatives[M, D]`` with ``negatives_valid[M]``;
    ``content`` / ``guide``: for each column tensor and then the negatives, content ids ``[B]`` /
    ``[M]`` and guide embeddings ``[B, G]`` / ``[M, G]`` (the false-negative rules; an entry may be
    None: no ids, -1). First one all-gather of eight ints per rank (B, M, D, which optional inputs it
    has, G) settles every shape and which inputs exist anywhere: a rank lacking one that another has
    takes part with an empty / unlabelled / all-valid one, so the result is one process on the
    concatenated batch with those masked (guide embeddings must be on all ranks or none). Then one
    all-gather (with gradient) of every float tensor packed in one buffer (validity as 0/1) and one
    of the int64 labels and content ids (hashes, too wide for a float). A ring needs only the first.
    """
    b, dim, dev = cols[0].shape[0], cols[0].shape[-1], cols[0].device
    if labels is not None:
        if labels.is_floating_point():
            raise ValueError(f"labels must be integer ids (>= 0, or < 0 for no label), got dtype {labels.dtype}")
        labels = labels.long()
    m = 0 if negatives is None else negatives.shape[0]
    gdim = 0 if guide is None else guide[0].shape[-1]
    header = [b, m, dim, *(int(x is not None) for x in (labels, negatives, negatives_valid, content)), gdim]
    on = gather_on and is_dist(group)
    table = all_gather_ints(header, dev, group) if on else [header]
    if len({row[2] for row in table}) > 1:
        raise ValueError(f"embedding dims differ across ranks: {[row[2] for row in table]}")
    if len({row[7] for row in table}) > 1:
        raise ValueError(f"guide embeddings on some ranks only, or of different dims: {[row[7] for row in table]}")
    sizes, negs = [row[0] for row in table], [row[1] for row in table]
    if sum(sizes) + sum(negs) == 1:  # known on the host already: costs no sync
        warnings.warn(
            "contrastive loss over a global batch of one row without hard negatives: its only candidate is its "
            "own positive, so there is nothing to contrast (the loss is constant); use a global batch >= 2",
            RuntimeWarning,
            stacklevel=3,
        )
    has_labels, has_neg, has_valid, has_content = (any(row[i] for row in table) for i in (3, 4, 5, 6))
    if has_labels and labels is None:
        labels = torch.full((b,), -1, dtype=torch.long, device=dev)
    if has_neg and negatives is None:
        negatives = cols[0].new_zeros(0, dim)
    if has_valid and negatives_valid is None:
        negatives_valid = torch.ones(m, dtype=torch.bool, device=dev)
    counts = [b] * len(cols) + [m]
    if has_content:  # a missing entry: no ids (-1), a duplicate of nobody
        content = content or [None] * len(counts)
        content = [torch.full((n,), -1, device=dev) if c is None else c for c, n in zip(content, counts)]
        content = [c.to(dev, torch.long).reshape(n) for c, n in zip(content, counts)]
    if gdim:
        guide = [cols[0].new_zeros(n, gdim) if g is None else g.detach() for g, n in zip(guide, counts)]
    offset = sum(sizes[: get_rank(group)]) if on else 0
    if ring or not on:
        return Candidates(cols, negatives, negatives_valid, labels, labels, offset, sizes, negs, ring, content, guide)
    k = len(cols)
    guides = guide if gdim else []
    parts = [*cols, *[negatives] * has_neg, *[negatives_valid] * has_valid, *guides]
    shapes = [
        [(n, dim)] * k + [(j, dim)] * has_neg + [(j,)] * has_valid + ([(n, gdim)] * k + [(j, gdim)]) * bool(gdim)
        for n, j in zip(sizes, negs)
    ]
    got = gather_parts([x.to(cols[0].dtype) for x in parts], shapes, group)
    negatives = got[k] if has_neg else None
    valid = got[k + has_neg] > 0.5 if has_valid else None
    guide = got[k + has_neg + has_valid :] if gdim else None
    ints = [*[labels] * has_labels, *(content if has_content else [])]
    int_shapes = [[(n,)] * has_labels + ([(n,)] * k + [(j,)]) * has_content for n, j in zip(sizes, negs)]
    ints = gather_parts(ints, int_shapes, group) if ints else []
    col_labels = ints[0] if has_labels else None
    content = ints[has_labels:] if has_content else None
    return Candidates(got[:k], negatives, valid, labels, col_labels, offset, sizes, negs, ring, content, guide)
