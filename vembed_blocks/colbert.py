"""Late-interaction (ColBERT / ColPali) contrastive loss over MaxSim scores.

Imports torch, `vembed_blocks._loss_utils` and `vembed_blocks.distributed`; the tiled kernels
(`vembed_blocks.tiled`) load the first time a call tiles.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._loss_utils import Side, candidate_masks, check_mask, check_temperature, gather_parts, resolve_tile, ring_pad
from .distributed import all_gather_ints, get_rank, is_dist, pad_dim
from .false_negatives import FalseNegatives, per_side, row_rules

__all__ = ["ColBERT", "maxsim", "maxsim_in_blocks", "save_colbert_head"]


def maxsim(query: torch.Tensor, query_mask: torch.Tensor, docs: torch.Tensor, doc_mask: torch.Tensor) -> torch.Tensor:
    """MaxSim scores ``[B, N]`` of ``query[B,Lq,D]`` against ``docs[N,Ld,D]``.

    For each real query token, the best dot product over the real tokens of the document;
    these maxima are averaged over the real query tokens (so a score lies in [-1, 1] for
    unit vectors and does not grow with query length). Padding never scores. Every row of
    both masks needs at least one real token.
    """
    sim = torch.einsum("bqd,ntd->bnqt", query, docs)
    sim = sim.masked_fill(~doc_mask.bool()[None, :, None, :], float("-inf")).amax(dim=-1)  # [B, N, Lq]
    qm = query_mask.to(sim.dtype)
    return (sim * qm[:, None, :]).sum(-1) / qm.sum(-1, keepdim=True)


def maxsim_in_blocks(
    query: torch.Tensor,
    query_mask: torch.Tensor,
    docs: torch.Tensor,
    doc_mask: torch.Tensor,
    max_elements: int = 2**24,
) -> torch.Tensor:
    """`maxsim` ``[B, N]`` computed over blocks of documents, so the ``[B, n, Lq, Ld]`` similarities of one block
    hold at most about ``max_elements`` numbers (a whole corpus at once would not fit)."""
    block = max(1, max_elements // max(1, query.shape[0] * query.shape[1] * docs.shape[1]))
    scores = [
        maxsim(query, query_mask, docs[i : i + block], doc_mask[i : i + block]) for i in range(0, len(docs), block)
    ]
    return torch.cat(scores, 1)


def save_colbert_head(out: str, proj: nn.Linear | None, **spec) -> None:
    """What turns an exported encoder's hidden states into ColBERT token vectors, next to it in ``out``:
    ``colbert_projection.safetensors`` (``weight[dim, width]`` of the token projection, when there is one) and
    ``colbert.json`` = ``spec`` (e.g. encoder, dim, instructions) + ``tokens: "last_hidden_state"``, ``normalize``."""
    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    if proj is not None:
        weight = proj.weight.detach().float().cpu().contiguous()
        save_file({"weight": weight}, os.path.join(out, "colbert_projection.safetensors"))
    with open(os.path.join(out, "colbert.json"), "w") as f:
        json.dump({"tokens": "last_hidden_state", "normalize": True, **spec}, f, indent=1)


def paired_maxsim(
    query: torch.Tensor, query_mask: torch.Tensor, doc: torch.Tensor, doc_mask: torch.Tensor
) -> torch.Tensor:
    """MaxSim ``[B]`` of each ``query[i]`` against its own ``doc[i]`` (the diagonal of `maxsim`)."""
    sim = torch.einsum("bqd,btd->bqt", query, doc)
    sim = sim.masked_fill(~doc_mask.bool()[:, None, :], float("-inf")).amax(dim=-1)  # [B, Lq]
    qm = query_mask.to(sim.dtype)
    return (sim * qm).sum(-1) / qm.sum(-1)


class MaxSimScorer:
    """`maxsim` of a query tile against a candidate tile (token masks in ``meta["tokens"]``) for
    `tiled_logsumexp`; its backward re-runs the tile under autograd, so only one tile's
    ``[r, c, Lq, Ld]`` similarities ever exist."""

    def score(self, rows: Side, cols: Side) -> torch.Tensor:
        return maxsim(rows.x, rows.meta["tokens"], cols.x, cols.meta["tokens"])

    def accumulate(self, rows: Side, cols: Side, dz: torch.Tensor, drows: torch.Tensor, dcols: torch.Tensor) -> None:
        with torch.enable_grad():
            rx, cx = rows.x.detach().requires_grad_(), cols.x.detach().requires_grad_()
            z = maxsim(rx, rows.meta["tokens"], cx, cols.meta["tokens"])
            dr, dc = torch.autograd.grad(z, (rx, cx), dz.to(z.dtype))
        drows += dr
        dcols += dc


def _check_tokens(key: str, x: torch.Tensor, mask: torch.Tensor, lead: int) -> None:
    if x.dim() != lead + 2:
        raise ValueError(f"ColBERT: {key} must have {lead + 2} dims, got shape {tuple(x.shape)}")
    check_mask("ColBERT", f"{key}_mask", mask, x.shape[:-1])


class ColBERT(nn.Module):
    """InfoNCE over MaxSim scores of token-level embeddings.

    ``forward(query[B,Lq,D], query_mask[B,Lq], doc[B,Ld,D], doc_mask[B,Ld], negatives=None,
    negatives_mask=None)``; token vectors are L2-normalised. Candidates: every document in
    the (gathered) batch plus every hard negative: ``negatives[B,K,Ln,D]`` with token mask
    ``negatives_mask[B,K,Ln]`` (a negative whose mask is all False is absent, so rows may
    have fewer than K) or a pool ``[M,Ln,D]`` / ``[M,Ln]``. Token lengths may differ across
    ranks. Logits are ``maxsim / temperature``.

    ``tile_size``: None = dense unless the ``[B, N, Lq, Ld]`` similarities would exceed
    ``AUTO_TILE_ELEMENTS`` elements, then tiles of ``T`` queries x ``T`` candidates with
    ``T^2 * Lq * Ld <= AUTO_TILE_SIZE^2``; 0 = dense; ``n > 0`` = tiles of n x n. ``ring``:
    candidates travel rank to rank instead of being gathered (see `InfoNCE`). ``group``: the
    process group to gather over (default None: the world). A gathered call runs 2 collectives
    (sizes, then every rank's documents and negatives in one buffer; a third for ``content_ids``)
    and reads the host once. ``false_negatives`` with ``content_ids`` (``positive`` = the documents,
    ``negatives`` shaped ``[B, K]`` / ``[M]``) and ``guide`` (single-vector guide embeddings ``[B, G]``,
    ``[B, K, G]``): the rules of `vembed_blocks.false_negatives`, the margin in MaxSim units;
    ``masked`` holds each rule's hit count of the last call.
    """

    matryoshka_args = (0, 2, 4, "negatives")  # token embeddings, not masks

    def __init__(
        self,
        temperature: float = 0.05,
        gather: bool = True,
        tile_size: int | None = None,
        ring: bool = False,
        group=None,
        false_negatives: FalseNegatives | None = None,
    ) -> None:
        super().__init__()
        check_temperature("ColBERT", temperature)
        resolve_tile(tile_size, 0, 0)  # validates
        self.temperature, self.gather, self.tile_size = temperature, gather, tile_size
        self.ring, self.group, self.false_negatives, self.masked = ring, group, false_negatives, {}

    def forward(
        self,
        query: torch.Tensor,
        query_mask: torch.Tensor,
        doc: torch.Tensor,
        doc_mask: torch.Tensor,
        negatives: torch.Tensor | None = None,
        negatives_mask: torch.Tensor | None = None,
        content_ids: dict[str, torch.Tensor] | None = None,
        guide: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        _check_tokens("query", query, query_mask, 1)
        _check_tokens("doc", doc, doc_mask, 1)
        rows, dim = query.shape[0], query.shape[-1]
        if rows == 0 or doc.shape[0] != rows:
            raise ValueError(f"ColBERT: query has {rows} rows and doc {doc.shape[0]}; need the same, non-zero")
        if doc.shape[-1] != dim:
            raise ValueError(f"ColBERT: query has dim {dim} but doc has dim {doc.shape[-1]}")
        q, qmask = F.normalize(query, dim=-1), query_mask.bool()
        d, dmask = F.normalize(doc, dim=-1), doc_mask.bool()
        neg = nmask = None
        shape = None if negatives is None else tuple(negatives.shape[: negatives.dim() - 2])
        ids = per_side("ColBERT", "content_ids", content_ids, rows, shape, ("positive",), query.device)
        gd = per_side("ColBERT", "guide", guide, rows, shape, ("query", "positive"), query.device)
        if negatives is not None:
            neg, nmask = _flat_negatives(negatives, negatives_mask, rows, dim)
            neg = F.normalize(neg, dim=-1)
        ring = self.ring and self.gather and is_dist(self.group)
        extras = (None if ids is None else ids[1:], None if gd is None else gd[1:])
        cols, offset = self._candidates(qmask, d, dmask, neg, nmask, ring, *extras)
        q = q / self.temperature  # maxsim is positively homogeneous in the query: fold 1/T in
        own = paired_maxsim(q, qmask, d, dmask)
        content, g_row, g_target = (None, None, None) if gd is None else (None, gd[0], gd[1])
        content = None if ids is None else ids[1]
        rules = row_rules(self.false_negatives, own, 1 / self.temperature, content, g_row, g_target)
        side = Side(q, {"tokens": qmask, "id": offset + torch.arange(rows, device=q.device), **rules})
        self.masked = {}
        tile = resolve_tile(self.tile_size, rows, len(cols), query.shape[1] * cols.x.shape[1], ring=ring)
        if tile is None:  # dense: all [B, N, Lq, Ld] similarities at once
            logits = maxsim(q, qmask, cols.x, cols.meta["tokens"])
            drop, down = candidate_masks(side, cols, logits, self.masked)
            logits = logits if down is None else logits + down
            logits = logits if drop is None else logits.masked_fill(drop, float("-inf"))
            return F.cross_entropy(logits, side.meta["id"])
        from .tiled import tiled_logsumexp  # the kernels load when a loss first tiles

        lse = tiled_logsumexp(side, cols, tile, scorer=MaxSimScorer(), ring=ring, group=self.group, tally=self.masked)
        return (lse - own).mean()

    def _candidates(self, qmask, d, dmask, neg, nmask, ring: bool, ids=None, guide=None) -> tuple[Side, int]:
        """Every rank's documents then every rank's negatives (a ring: this rank's), token axes padded to one length.

        One all-gather of a few ints per rank (sizes, lengths, whether it has negatives, content ids,
        the guide's dim, rows without a real token) settles every shape, so the documents and
        negatives with their masks (and guide embeddings) then travel in one all-gather, content ids
        ``[pos, neg]`` in one more. Returns the candidates and this rank's row offset.
        """
        on = self.gather and is_dist(self.group)
        b, dim, dev = d.shape[0], d.shape[-1], d.device
        m, ln = (0, 0) if neg is None else neg.shape[:2]
        gdim = 0 if guide is None else guide[0].shape[-1]
        # Counted on the device so the check rides on the header: no read of its own, and every rank raises.
        empty = (~qmask.any(-1)).sum() + (~dmask.any(-1)).sum()
        head = [b, d.shape[1], m, ln, dim, int(neg is not None)]
        header = torch.cat([torch.tensor(head, device=dev), empty[None], torch.tensor([int(ids is not None), gdim])])
        table = all_gather_ints(header, dev, self.group) if on else [header.tolist()]
        if any(row[6] for row in table):
            raise ValueError("ColBERT: every row of query_mask and doc_mask needs at least one real token")
        if len({row[4] for row in table}) > 1:
            raise ValueError(f"ColBERT: embedding dims differ across ranks: {[row[4] for row in table]}")
        if len({row[8] for row in table}) > 1:
            raise ValueError(f"ColBERT: guide embeddings on some ranks only, or of other dims: {[r[8] for r in table]}")
        sizes, negs, has_neg = [row[0] for row in table], [row[2] for row in table], any(row[5] for row in table)
        has_ids, length = any(row[7] for row in table), max(max(row[1], row[3]) for row in table)
        if has_neg and neg is None:  # another rank has negatives: take part with none
            neg, nmask = d.new_zeros(0, length, dim), dmask.new_zeros(0, length)
        ids = [torch.full((n,), -1, device=dev) if x is None else x for x, n in zip(ids or [None, None], (b, m))]
        guide = [d.new_zeros(n, gdim) if x is None else x for x, n in zip(guide or [None, None], (b, m))]
        parts = [pad_dim(x.to(d.dtype), 1, length) for x in [d, dmask] + ([neg, nmask] if has_neg else [])]
        parts += [x.to(d.dtype) for x in guide[: 1 + has_neg]] if gdim else []
        if on and not ring:
            shapes = [
                [(n, length, dim), (n, length)]
                + [(k, length, dim), (k, length)] * has_neg
                + [(n, gdim), (k, gdim)][: (1 + has_neg) * bool(gdim)]
                for n, k in zip(sizes, negs)
            ]
            parts = gather_parts(parts, shapes, self.group)
            if has_ids:
                ids = gather_parts(ids, [[(n,), (k,)] for n, k in zip(sizes, negs)], self.group)
        tok = parts[: 2 + 2 * has_neg]
        x, tokens = torch.cat(tok[0::2]), torch.cat(tok[1::2]).bool()
        docs = tok[0].shape[0]
        col_id = (sum(sizes[: get_rank(self.group)]) if on and ring else 0) + torch.arange(docs, device=dev)
        meta = {"tokens": tokens, "id": torch.cat([col_id, col_id.new_full((len(x) - docs,), -1)])}
        if has_neg:  # an absent negative (no real token) is no candidate; True tokens keep its score finite
            meta["valid"] = torch.cat([torch.ones(docs, dtype=torch.bool, device=dev), tokens[docs:].any(-1)])
            meta["tokens"] = tokens | ~meta["valid"][:, None]
        if has_ids:
            meta["content"] = torch.cat(ids[: 1 + has_neg]).long()
        if gdim:
            meta["guide"] = torch.cat(parts[len(tok) :])
        cols = Side(x, meta)
        if ring:
            cols = ring_pad(cols, max(n + k for n, k in zip(sizes, negs)))
        return cols, (sum(sizes[: get_rank(self.group)]) if on else 0)


def _flat_negatives(negatives: torch.Tensor, mask: torch.Tensor | None, rows: int, dim: int):
    """``[B,K,Ln,D]`` / ``[M,Ln,D]`` negatives and token masks as ``[M,Ln,D]`` / ``[M,Ln]``; absent ones zeroed."""
    if mask is None:
        raise ValueError("ColBERT: negatives need negatives_mask (their token mask)")
    if negatives.dim() == 4:
        if negatives.shape[0] != rows:
            raise ValueError(f"ColBERT: negatives has {negatives.shape[0]} rows but query has {rows}")
        _check_tokens("negatives", negatives, mask, 2)
        negatives, mask = negatives.flatten(0, 1), mask.flatten(0, 1)
    else:
        _check_tokens("negatives", negatives, mask, 1)
    if negatives.shape[-1] != dim:
        raise ValueError(f"ColBERT: query has dim {dim} but negatives have dim {negatives.shape[-1]}")
    mask = mask.bool()
    # Absent negatives stay (no data-dependent shapes) but are masked out later; zeroed, so that
    # whatever an encoder made of an all-padding input (even NaN) reaches no gradient.
    return torch.where(mask.any(-1)[:, None, None], negatives, negatives.new_zeros(())), mask
