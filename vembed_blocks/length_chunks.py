"""Length-sorted, trimmed chunks: a right-padded text batch encoded without paying for its padding.

A tokenizer pads every row of a batch to the batch's longest row. When lengths spread (queries of 5-20
tokens, documents of 20-400), most of the attention and MLP work is spent on padding. Here the rows are
ordered by real length (``attention_mask`` sums, longest first, stable) and cut into chunks; each chunk
drops the trailing columns that are padding in all of its rows, and the outputs are put back in the
input order:

    emb = encode_in_length_chunks(fn, inputs, chunk_size=8)     # plain training: graphs kept, no replay
    gc = GradCache(chunk_size=32, splitter=LengthSplit)          # GradCache: each chunk trimmed the same way

Exact where the model ignores padded positions: masked attention, positions counted from the left (absolute
or rotary), pooling over ``attention_mask`` (`vembed_blocks.pooling.pool`, every method). That holds for
BERT/MiniLM/BGE/E5 and for CLIP's text tower padded to the longest row; it does not for a model that reads
a fixed position (SigLIP's text tower pools position -1 of a ``padding="max_length"`` batch) - do not
trim those. Outputs then equal the untrimmed ones up to float summation order (tests: <= 1e-6 relative).
With dropout on, a row's dropout mask is drawn for its chunk's shape, so it differs from the untrimmed
run's (same distribution); GradCache still replays each trimmed chunk bit-identically.

Only right-padded batches are trimmed: a left-padded one (Qwen3 / Qwen3-VL decoders, whose rope indices
come from the mask) is sorted but left at full width, and `LengthSplit.trimmed` says so. Imports: torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch

from .gradcache_split import RowSplit, chunk_bounds, find_mask

__all__ = ["LengthSplit", "encode_in_length_chunks", "is_right_padded"]


def is_right_padded(mask: torch.Tensor) -> bool:
    """Whether ``mask[B, L]`` is 0/1 with every row's ones before its zeros (rows of any length, 0 included)."""
    if mask.ndim != 2 or mask.shape[1] == 0:
        return False
    m = mask.ne(0)
    return bool(torch.equal(mask, m.to(mask.dtype)) and not (m[:, 1:] & ~m[:, :-1]).any())


def _take_rows(obj: Any, index: torch.Tensor) -> Any:
    """``obj`` (nested dicts/lists/tuples of tensors) with every tensor's rows in ``index`` order (dim 0)."""
    if isinstance(obj, torch.Tensor):
        return obj.index_select(0, index.to(obj.device)) if obj.ndim else obj
    if isinstance(obj, Mapping):
        out = {k: _take_rows(v, index) for k, v in obj.items()}
        try:
            return type(obj)(out)
        except Exception:
            return out
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_take_rows(v, index) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_take_rows(v, index) for v in obj)
    return obj


class LengthSplit(RowSplit):
    """`GradCache` splitter: rows sorted by real length, each chunk cut to its own longest row.

    ``LengthSplit(inputs)`` reads the first ``attention_mask[B, L]`` in ``inputs`` (see `find_mask`).
    ``split[s:e]`` are rows ``[s, e)`` of the length-sorted batch (longest first); every tensor of the
    mask's shape ``[B, L]`` (``input_ids``, ``attention_mask``, ``token_type_ids``, ``position_ids``) is
    cut to the chunk's longest row, other tensors are only sliced. ``restore(out)`` puts an output
    ``Tensor[B, ...]`` computed in that order back in the input order (`GradCache.encode` calls it).

    Without a 2-D mask the rows keep their order and nothing is trimmed (e.g. an image tower); a mask that
    is not right-padded (left padding) sorts but does not trim: ``trimmed`` is ``False`` then.
    """

    def __init__(self, inputs: Any) -> None:
        super().__init__(inputs)
        mask = find_mask(inputs)
        self.order: torch.Tensor | None = None  # sorted position -> input row
        self.trimmed = False
        self._shape: tuple[int, ...] | None = None
        self._width = 0
        if mask is None or mask.ndim != 2 or mask.shape[0] != self.rows:
            return
        lengths = mask.ne(0).sum(1)
        order = torch.sort(lengths, descending=True, stable=True).indices
        if not torch.equal(order, torch.arange(self.rows, device=order.device)):
            self.order = order
            self.inputs = _take_rows(inputs, order)
        self.trimmed = is_right_padded(mask)
        self._shape = tuple(mask.shape)
        self._lengths = lengths.index_select(0, order).tolist()

    def __getitem__(self, rows: slice) -> Any:
        s, e, step = rows.indices(self.rows)
        if step != 1:
            raise ValueError("a splitter takes contiguous row ranges [s:e]")
        if self.trimmed:  # longest first: row s is the chunk's longest; keep one column for all-empty rows
            self._width = max(1, self._lengths[s]) if e > s else 1
        return self._slice(self.inputs, s, e)

    def _slice(self, obj: Any, s: int, e: int) -> Any:
        out = super()._slice(obj, s, e)
        if self.trimmed and isinstance(obj, torch.Tensor) and tuple(obj.shape) == self._shape:
            return out[:, : self._width].contiguous()
        return out

    def costs(self, bounds: list[tuple[int, int]]) -> list[int]:
        """Padded tokens of each chunk ``[s, e)`` as cut (rows x width): `GradCache` keeps the costliest graphs."""
        width = self._shape[1] if self._shape else 1
        return [(e - s) * (max(1, self._lengths[s]) if self.trimmed else width) for s, e in bounds]

    def padded_tokens(self, chunk_size: int) -> tuple[int, int]:
        """``(B * L, the sum over chunks of rows * width)``: the batch's padded tokens, whole and cut into
        chunks of ``chunk_size`` rows (`costs`; equal when nothing is trimmed)."""
        width = self._shape[1] if self._shape else 1
        return self.rows * width, sum(self.costs(chunk_bounds(self.rows, None, chunk_size, None)[0]))

    def restore(self, out: torch.Tensor) -> torch.Tensor:
        """``out[B, ...]``, rows in sorted order -> the same rows in input order (differentiable)."""
        if self.order is None:
            return out
        inverse = torch.empty_like(self.order)
        inverse[self.order] = torch.arange(self.rows, device=self.order.device)
        return out.index_select(0, inverse.to(out.device))


def encode_in_length_chunks(
    fn: Callable[..., torch.Tensor],
    inputs: Mapping[str, Any],
    chunk_size: int,
    min_saving: float = 0.2,
    min_tokens: int = 2048,
) -> torch.Tensor:
    """``fn(**inputs)`` -> ``Tensor[B, ...]``, computed on length-sorted chunks of ``chunk_size`` rows, each
    trimmed to its longest row (`LengthSplit`), rows back in input order.

    Every chunk keeps its graph (no replay, unlike `GradCache`): memory is at most that of ``fn(**inputs)``
    on the padded batch, and a backward through the result gives the same parameter gradients (exact where
    trimming is, see the module docstring). ``fn`` must return one row per input row with the same trailing
    shape for every chunk (pooled embeddings; pad token outputs to a fixed length yourself).

    Chunks cost calls, so this is one ``fn(**inputs)`` when the batch is not right-padded (nothing to trim),
    holds fewer than ``min_tokens`` padded tokens (a small batch: the calls cost more than the padding; a tiny
    model's demo batch ran at 0.72x chunked), or when chunks would cut less than ``min_saving`` of its
    padded tokens (lengths that hardly spread).
    """
    if chunk_size < 1 or not 0 <= min_saving < 1 or min_tokens < 0:
        raise ValueError(
            f"need chunk_size >= 1, 0 <= min_saving < 1, min_tokens >= 0; got {chunk_size}, {min_saving}, {min_tokens}"
        )
    split = LengthSplit(((), dict(inputs)))
    if not split.trimmed:
        return fn(**inputs)
    padded, trimmed = split.padded_tokens(chunk_size)
    if padded < min_tokens or trimmed > (1 - min_saving) * padded:
        return fn(**inputs)
    outs = [fn(**split[s:e][1]) for s, e in chunk_bounds(len(split), None, chunk_size, None)[0]]
    return split.restore(torch.cat(outs))
