"""Matryoshka: a loss summed over nested prefixes of the embedding (one model, many usable widths).

Imports only torch; `vembed_blocks.losses` re-exports it.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

__all__ = ["Matryoshka"]


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
