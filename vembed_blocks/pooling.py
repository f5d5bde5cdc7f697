"""Pool token states into one vector per sequence, respecting padding on either side."""

from __future__ import annotations

import torch

__all__ = ["pool", "POOL_METHODS"]

POOL_METHODS = ("mean", "cls", "last", "max", "weighted_mean")


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, method: str = "mean") -> torch.Tensor:
    """Reduce ``hidden[B, L, D]`` to ``[B, D]`` over the real tokens of ``attention_mask[B, L]``.

    - ``mean``: average of real tokens.
    - ``cls``: the first real token (position 0 with right padding).
    - ``last``: the last real token; correct for left and right padding alike, because it
      is found from the mask, not from the sequence length.
    - ``max``: element-wise max over real tokens.
    - ``weighted_mean``: real tokens weighted 1, 2, ..., n by position (later tokens count
      more, as in SGPT for causal models).

    ``mean`` and ``weighted_mean`` accumulate in float32 (or float64 for float64 input) and
    return ``hidden.dtype``, so fp16/bf16 states over thousands of tokens neither overflow nor drift.

    Raises ``ValueError`` on a shape mismatch, an unknown method, or a row with no real token.
    """
    if hidden.dim() != 3:
        raise ValueError(f"pool: hidden must be [B, L, D], got shape {tuple(hidden.shape)}")
    if attention_mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"pool: attention_mask shape {tuple(attention_mask.shape)} does not match "
            f"hidden [B, L] = {tuple(hidden.shape[:2])}"
        )
    if method not in POOL_METHODS:
        raise ValueError(f"pool: unknown method {method!r}; choose one of {', '.join(POOL_METHODS)}")
    mask = attention_mask.bool()
    empty = ~mask.any(dim=1)
    if empty.any():
        raise ValueError(f"pool: rows {empty.nonzero().flatten().tolist()} have no real token in attention_mask")
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    length = hidden.shape[1]
    if method == "cls":
        return hidden[rows, mask.int().argmax(dim=1)]
    if method == "last":
        # argmax returns the first maximum, so search the flipped mask for the last real token.
        return hidden[rows, length - 1 - mask.flip(1).int().argmax(dim=1)]
    if method == "max":
        return hidden.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(dim=1)
    # Accumulate in at least float32: in fp16 the position weights 1..n sum past 65504 by
    # n = 362 (the weighted mean becomes 0, then NaN) and a plain sum of 5,000 tokens of 60.0
    # overflows; bf16 has range but only 8 bits, so long sums drift. The result keeps hidden's dtype.
    acc = torch.promote_types(hidden.dtype, torch.float32)
    weights = mask.to(acc)
    if method == "weighted_mean":
        weights = weights.cumsum(dim=1) * weights
    weights = weights / weights.sum(dim=1, keepdim=True)  # normalised first: the product below is the mean
    # hidden (low precision) * weights (acc) promotes per element, so no float32 copy of hidden is kept.
    return (hidden * weights.unsqueeze(-1)).sum(dim=1).to(hidden.dtype)
