"""Input checks and small tensor helpers shared by the loss modules (private)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from .distributed import all_gather_sizes, any_rank, gather_with_offset, get_rank, is_dist
from .tiled import Side, ring_pad


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


def gather(x: torch.Tensor | None, enabled: bool) -> tuple[torch.Tensor | None, int]:
    """`gather_with_offset` when enabled (bool tensors too); ``(x, 0)`` otherwise."""
    if x is None or not enabled:
        return x, 0
    if x.dtype == torch.bool:  # collectives do not all take bool
        out, off = gather_with_offset(x.to(torch.uint8))
        return out.bool(), off
    return gather_with_offset(x)


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


def agree_optional(
    cols: torch.Tensor,
    labels: torch.Tensor | None,
    negatives: torch.Tensor | None,
    negatives_valid: torch.Tensor | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Make every rank hold the same optional inputs (one tiny all-reduce), filling in empty ones.

    A rank without labels gets ``-1`` (no label) for each row; a rank without negatives gets
    ``cols[:0]``: no rows, but in the autograd graph like the other ranks' negatives, so the
    backward of their all-gather (a collective) runs here too; a rank without a validity mask
    gets all True. So no rank ever runs a collective the others skip, and the result is that
    of one process on the concatenated batch with those rows masked.
    """
    present = [labels is not None, negatives is not None, negatives_valid is not None]
    has_labels, has_neg, has_valid = any_rank(present, cols.device)
    if has_labels and labels is None:
        labels = torch.full(cols.shape[:1], -1, dtype=torch.long, device=cols.device)
    if has_neg and negatives is None:
        negatives = cols[:0]
    if has_valid and negatives_valid is None:
        negatives_valid = torch.ones(negatives.shape[0], dtype=torch.bool, device=cols.device)
    return labels, negatives, negatives_valid


def unique_unlabelled(labels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Labels with each unlabelled entry (``label < 0``) replaced by ``-1 - id``: shared with nobody."""
    return torch.where(labels < 0, -1 - ids, labels)


def contrastive_sides(
    rows: torch.Tensor,
    cols: torch.Tensor,
    labels: torch.Tensor | None = None,
    negatives: torch.Tensor | None = None,
    negatives_valid: torch.Tensor | None = None,
    *,
    gather_on: bool,
    ring: bool = False,
) -> tuple[Side, Side]:
    """Rows and candidate columns of a contrastive score matrix, with the metadata that masks it.

    ``rows[B,D]`` (this rank's, already scaled) and ``cols[B,D]`` (this rank's positives:
    column ``offset + i`` is row i's target); ``negatives[M,D]`` with ``negatives_valid[M]``
    are extra columns with no label and id -1. Without ``ring`` the columns are gathered from
    every rank (with gradient) when ``gather_on``; with ``ring`` they stay this rank's own
    (padded to the largest rank's count) for `tiled_logsumexp`'s ring to pass around.
    ``labels[B]`` are integers >= 0; a negative label (or a rank passing none while another
    passes some) means "no label": that row shares its label with nobody.
    """
    n = rows.shape[0]
    if labels is not None:
        if labels.is_floating_point():
            raise ValueError(f"labels must be integer ids (>= 0, or < 0 for no label), got dtype {labels.dtype}")
        labels = labels.long()  # one dtype on every rank: the gathered buffers must match
    if gather_on and is_dist():
        labels, negatives, negatives_valid = agree_optional(cols, labels, negatives, negatives_valid)
    if ring:
        offset = sum(all_gather_sizes(n, rows.device)[: get_rank()])
        col_offset = offset
    else:
        (cols, offset), (labels_all, _) = gather(cols, gather_on), gather(labels, gather_on)
        negatives, _ = gather(negatives, gather_on)
        negatives_valid, _ = gather(negatives_valid, gather_on)
        col_offset = 0
    labels_cols = labels if ring else labels_all
    row_meta = {"id": offset + torch.arange(n, device=rows.device)}
    col_meta = {"id": col_offset + torch.arange(cols.shape[0], device=rows.device)}
    if labels is not None:
        row_meta["label"] = unique_unlabelled(labels, row_meta["id"])
        col_meta["label"] = unique_unlabelled(labels_cols, col_meta["id"])
    if negatives is not None:
        m = negatives.shape[0]
        cols = torch.cat([cols, negatives.to(cols.dtype)])
        col_meta["id"] = torch.cat([col_meta["id"], col_meta["id"].new_full((m,), -1)])
        if labels is not None:  # negatives carry no label: any value, never compared (id -1)
            col_meta["label"] = torch.cat([col_meta["label"], col_meta["label"].new_zeros(m)])
        if negatives_valid is not None:
            valid = torch.ones(cols.shape[0] - m, dtype=torch.bool, device=rows.device)
            col_meta["valid"] = torch.cat([valid, negatives_valid])
    col_side = Side(cols, col_meta)
    return Side(rows, row_meta), (ring_pad(col_side) if ring else col_side)
