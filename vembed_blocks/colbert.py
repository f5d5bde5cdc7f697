"""Late-interaction (ColBERT / ColPali) contrastive loss over MaxSim scores."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._loss_utils import check_mask, check_temperature, gather
from .distributed import all_gather_sizes, pad_dim

__all__ = ["ColBERT", "maxsim"]


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
    """

    def __init__(self, temperature: float = 0.05, gather: bool = True, tile_size: int | None = None) -> None:
        super().__init__()
        check_temperature("ColBERT", temperature)
        if tile_size is not None:
            raise NotImplementedError("ColBERT: the tiled path (tile_size) is not available yet")
        self.temperature, self.gather, self.tile_size = temperature, gather, tile_size

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

        docs, dmask, offset = _gather_tokens(F.normalize(doc, dim=-1), doc_mask.bool(), self.gather)
        if negatives is not None:
            neg, nmask = self._flat_negatives(negatives, negatives_mask, rows, dim)
            neg, nmask, _ = _gather_tokens(F.normalize(neg, dim=-1), nmask, self.gather)
            length = max(docs.shape[1], neg.shape[1])
            docs = torch.cat([pad_dim(docs, 1, length), pad_dim(neg, 1, length)])
            dmask = torch.cat([pad_dim(dmask, 1, length), pad_dim(nmask, 1, length)])
        scores = maxsim(F.normalize(query, dim=-1), query_mask, docs, dmask)
        target = offset + torch.arange(rows, device=query.device)
        return F.cross_entropy(scores / self.temperature, target)

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
