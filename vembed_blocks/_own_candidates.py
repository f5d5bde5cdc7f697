"""InfoNCE without in-batch negatives (private): each query against its own positive and its own hard negatives.

`InfoNCE(in_batch_negatives=False)` (a classification or clustering task: positive = the class
name, hard negatives = other class names, so other rows of one class share the positive):

- row i's candidates: ``positive[i]`` and the real ``negatives[i, k]`` (``negatives_mask[i, k]``),
  or, with a pool ``negatives[M, D]``, ``positive[i]`` and every real entry of this rank's pool;
  no other row's positive, and nothing from other ranks. Logits ``cos / temperature``, target
  the own positive; a hard negative equal to the own positive stays a candidate; ``labels`` are
  checked but change nothing (no other rows are candidates);
- a row without real negatives has one candidate: its term is exactly 0 (with zero gradient) and
  it still counts in the mean;
- the false-negative rules act on each row's own negatives as they would on its hard negatives
  with in-batch negatives (``duplicates``: content ids; ``margin``: drop / down-weight; ``guide``);
- the mean: without a process group (or ``gather=False``) over the local rows. With ``gather``
  under a process group, one all-reduce of the row count on ``group``: the loss is
  ``W / N * sum_local``, N rows over the W ranks, so the mean over ranks of the ranks' losses is
  the mean over all N rows, and gradients averaged over ranks (DDP, FSDP2, `average_gradients`)
  are those of that global mean, ragged local batches included (equal ones: the local mean);
- ``symmetric`` and ``ring`` are refused (no other queries; nothing to pass between ranks);
  ``tile_size`` is ignored (the logits are ``[B, 1 + K]``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ._loss_utils import acc_dtype
from .distributed import get_world_size, is_dist


def check_own(in_batch: bool, symmetric: bool, ring: bool) -> None:
    """What `InfoNCE` refuses at construction with ``in_batch_negatives=False``."""
    if in_batch:
        return
    if symmetric:
        raise ValueError(
            "InfoNCE: symmetric=True scores each positive against the other queries, which "
            "in_batch_negatives=False leaves out; use one or the other"
        )
    if ring:
        raise ValueError(
            "InfoNCE: ring=True passes candidates between ranks, but with in_batch_negatives=False a "
            "row's candidates are its own (nothing to pass); leave ring off"
        )


def own_scores(rows: torch.Tensor, cands: torch.Tensor) -> torch.Tensor:
    """``[B, K]`` dot products of ``rows[B, D]`` with their own ``cands[B, K, D]``, or a shared ``cands[1, M, D]``."""
    if cands.shape[0] == 1:
        return rows @ cands[0].T
    return torch.bmm(cands, rows[:, :, None])[..., 0]


def own_rule_hits(
    meta: dict[str, torch.Tensor],
    z: torch.Tensor,
    eligible: torch.Tensor,
    content: torch.Tensor | None,
    guide: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """``[B, K]`` hits of each active rule (`false_negatives.rule_hits`, per row's own candidates).

    ``meta``: `false_negatives.row_rules`; ``z[B, K]`` the scaled scores; ``content[B|1, K]`` /
    ``guide[B|1, K, G]`` the negatives' content ids / guide embeddings (None: none given)."""
    hits: dict[str, torch.Tensor] = {}
    none = torch.zeros_like(eligible)
    if "content" in meta:  # negatives without ids are nobody's duplicate
        same = none if content is None else (meta["content"][:, None] == content) & (content >= 0)
        hits["duplicates"] = same & eligible
    if "bound" in meta:
        hits["margin"] = (z.detach() > meta["bound"][:, None].to(z.dtype)) & eligible
    if "guide" in meta:  # guide embeddings of the negatives are there whenever negatives are
        g = None if guide is None else own_scores(meta["guide"], guide.to(meta["guide"].dtype))
        hits["guide"] = none if g is None else (g > meta["guide_bound"][:, None]) & eligible
    return hits


def own_loss(
    qs: torch.Tensor,
    p: torch.Tensor,
    neg: torch.Tensor | None,
    valid: torch.Tensor | None,
    shape: tuple[int, ...] | None,
    meta: dict[str, torch.Tensor],
    ids: list | None,
    guide: list | None,
    tally: dict,
    gather: bool,
    group=None,
) -> torch.Tensor:
    """The loss (module docstring) of ``qs[B, D]`` (unit queries times the scale) against ``p[B, D]``.

    ``neg`` / ``valid``: the flattened unit negatives and their mask (`flatten_negatives`), ``shape``
    the negatives' shape without ``D`` (``(B, K)`` or ``(M,)``); ``meta``: `row_rules`; ``ids`` /
    ``guide``: `per_side` lists (query, positive, negatives); ``tally``: the loss's ``masked``.
    """
    b, d = qs.shape
    lead = (b, 0) if shape is None else shape if len(shape) == 2 else (1, shape[0])
    negs = qs.new_zeros(b, 0, d) if neg is None else neg.to(qs.dtype).reshape(*lead, d)
    z = own_scores(qs, negs)
    keep = torch.ones_like(z, dtype=torch.bool) if valid is None else valid.reshape(lead).expand_as(z)
    side = lambda xs, *tail: None if xs is None or xs[2] is None else xs[2].reshape(*lead, *tail)  # noqa: E731
    hits = own_rule_hits(meta, z, keep, side(ids), side(guide, -1))
    drop = ~keep
    for name, h in hits.items():
        tally[name] = tally[name] + h.sum() if name in tally else h.sum()
        drop = drop | h if name != "margin" else drop
    if "margin" in hits:  # log(weight), -inf when dropped
        z = z + torch.where(hits["margin"], meta["fn_logw"][:, None].to(z.dtype), z.new_zeros(()))
    own = (qs * p).sum(-1)
    logits = torch.cat([own[:, None], z.masked_fill(drop, float("-inf"))], 1).to(acc_dtype(qs))
    total = (torch.logsumexp(logits, 1) - logits[:, 0]).sum()
    if not (gather and is_dist(group)):
        return (total / b).to(qs.dtype)
    rows = torch.tensor([b], dtype=torch.long, device=qs.device)
    dist.all_reduce(rows, group=group)
    return (total * get_world_size(group) / rows[0].to(total.dtype)).to(qs.dtype)
