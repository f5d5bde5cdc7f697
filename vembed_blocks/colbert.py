"""Late-interaction (ColBERT / ColPali) contrastive loss over MaxSim scores."""

from __future__ import annotations

import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._loss_utils import check_mask, check_temperature, gather
from .distributed import all_gather_sizes, any_rank, get_rank, is_dist, pad_dim
from .tiled import Side, resolve_tile, ring_pad, tiled_logsumexp

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


def _gather_tokens(x: torch.Tensor, mask: torch.Tensor, enabled: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Gather [n, L, D] token sets whose L differs across ranks: pad L to the global max first."""
    if enabled:
        length = max(all_gather_sizes(x.shape[1], x.device))
        x, mask = pad_dim(x, 1, length), pad_dim(mask, 1, length)
    (x, offset), (mask, _) = gather(x, enabled), gather(mask, enabled)
    return x, mask, offset


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
    candidates travel rank to rank instead of being gathered (see `InfoNCE`).
    """

    def __init__(
        self, temperature: float = 0.05, gather: bool = True, tile_size: int | None = None, ring: bool = False
    ) -> None:
        super().__init__()
        check_temperature("ColBERT", temperature)
        resolve_tile(tile_size, 0, 0)  # validates
        self.temperature, self.gather, self.tile_size, self.ring = temperature, gather, tile_size, ring

    def forward(
        self,
        query: torch.Tensor,
        query_mask: torch.Tensor,
        doc: torch.Tensor,
        doc_mask: torch.Tensor,
        negatives: torch.Tensor | None = None,
        negatives_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        _check_tokens("query", query, query_mask, 1)
        _check_tokens("doc", doc, doc_mask, 1)
        rows, dim = query.shape[0], query.shape[-1]
        if rows == 0 or doc.shape[0] != rows:
            raise ValueError(f"ColBERT: query has {rows} rows and doc {doc.shape[0]}; need the same, non-zero")
        if doc.shape[-1] != dim:
            raise ValueError(f"ColBERT: query has dim {dim} but doc has dim {doc.shape[-1]}")
        for key, m in (("query_mask", query_mask), ("doc_mask", doc_mask)):
            if not m.bool().any(-1).all():
                raise ValueError(f"ColBERT: every row of {key} needs at least one real token")

        q, qmask = F.normalize(query, dim=-1), query_mask.bool()
        d, dmask = F.normalize(doc, dim=-1), doc_mask.bool()
        neg = nmask = None
        if negatives is not None:
            neg, nmask = self._flat_negatives(negatives, negatives_mask, rows, dim)
            neg = F.normalize(neg, dim=-1)
        if self.gather and is_dist() and any_rank([neg is not None], q.device)[0] and neg is None:
            neg, nmask = d[:0], dmask[:0]  # another rank has negatives: take part with none (see agree_optional)
        ring = self.ring and self.gather and is_dist()
        cols, offset = _ring_candidates(d, dmask, neg, nmask) if ring else self._gathered(d, dmask, neg, nmask)
        tile = resolve_tile(self.tile_size, rows, len(cols), query.shape[1] * cols.x.shape[1], ring=ring)
        if tile is None:  # dense: all [B, N, Lq, Ld] similarities at once
            scores = maxsim(q, qmask, cols.x, cols.meta["tokens"])
            return F.cross_entropy(scores / self.temperature, offset + torch.arange(rows, device=q.device))
        q = q / self.temperature  # maxsim is positively homogeneous in the query: fold 1/T in
        lse = tiled_logsumexp(Side(q, {"tokens": qmask}), cols, tile, scorer=MaxSimScorer(), ring=ring)
        return (lse - paired_maxsim(q, qmask, d, dmask)).mean()

    def _gathered(self, d, dmask, neg, nmask) -> tuple[Side, int]:
        """Every rank's documents then every rank's negatives, token axes padded to one length."""
        docs, dmask, offset = _gather_tokens(d, dmask, self.gather)
        if neg is not None:
            neg, nmask, _ = _gather_tokens(neg, nmask, self.gather)
            length = max(docs.shape[1], neg.shape[1])
            docs = torch.cat([pad_dim(docs, 1, length), pad_dim(neg, 1, length)])
            dmask = torch.cat([pad_dim(dmask, 1, length), pad_dim(nmask, 1, length)])
        return Side(docs, {"tokens": dmask}), offset

    @staticmethod
    def _flat_negatives(negatives: torch.Tensor, mask: torch.Tensor | None, rows: int, dim: int):
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
        real = mask.bool().any(-1)  # drop absent negatives so they never become candidates
        return negatives[real], mask.bool()[real]


def _ring_candidates(d, dmask, neg, nmask) -> tuple[Side, int]:
    """This rank's documents and negatives, padded to the global token length and candidate count."""
    local = d.shape[1] if neg is None else max(d.shape[1], neg.shape[1])
    length = max(all_gather_sizes(local, d.device))
    x, tokens = pad_dim(d, 1, length), pad_dim(dmask, 1, length)
    if neg is not None:
        x = torch.cat([x, pad_dim(neg, 1, length)])
        tokens = torch.cat([tokens, pad_dim(nmask, 1, length)])
    offset = sum(all_gather_sizes(d.shape[0], d.device)[: get_rank()])
    return ring_pad(Side(x, {"tokens": tokens})), offset
