"""How `GradCache.encode` cuts its inputs into row chunks: `RowSplit` (every tensor on dim 0), the chunk
bounds (`chunk_bounds`: by rows or by real tokens), and the check that ``fn`` returned one row per row.

A module of its own so that a splitter for inputs laid out otherwise (`vembed_blocks.vlm.VLMSplit`)
can subclass `RowSplit` without importing the rest of GradCache. `vembed_blocks.gradcache` re-exports it.

Imports: torch only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Iterator

import torch

__all__ = [
    "RowSplit",
    "check_chunk_output",
    "chunk_bounds",
    "chunks_behind",
    "find_mask",
    "run_spare",
    "spare_rng",
    "tensors",
]


class RowSplit:
    """The default splitter: the rows of nested inputs, sliceable like a sequence.

    ``RowSplit(inputs)`` scans ``inputs`` (for `GradCache.encode`: the pair ``(args, kwargs)``
    of the call); ``len(split)`` is the batch size B, and ``split[s:e]`` is ``inputs`` with
    only rows ``[s, e)`` (same structure, tensor views, no copies). Every tensor with a dim, in
    dicts, lists, tuples and namedtuples at any depth, is sliced on dim 0 and must have B rows
    there; 0-d tensors and other values pass through unchanged.

    A splitter is any callable ``splitter(inputs)`` returning an object with ``len()`` and
    ``[s:e]``. For inputs whose rows are laid out otherwise, subclass this one and override
    `_scan_mapping` / `_slice_mapping` (e.g. `vembed_blocks.vlm.VLMSplit`: Qwen-VL's flat
    ``pixel_values``).
    """

    def __init__(self, inputs: Any) -> None:
        self.inputs = inputs
        self.sizes: list[tuple[str, int]] = []  # (path, rows) of every tensor that is split
        self._scan(inputs, "input")
        if not self.sizes:
            raise ValueError("GradCache.encode needs at least one tensor argument with a batch dim to split.")
        self.rows = self.sizes[0][1]
        bad = [f"{p}: {n}" for p, n in self.sizes if n != self.rows]
        if bad:
            raise ValueError(
                f"inconsistent batch sizes in encode inputs ({self.sizes[0][0]} has {self.rows} rows; "
                f"{', '.join(bad)}); every tensor must have the batch on dim 0 (for inputs laid out otherwise, "
                "such as Qwen-VL's flat pixel_values, pass a splitter: GradCache(..., splitter=VLMSplit))."
            )
        if self.rows == 0:
            raise ValueError("GradCache.encode got an empty batch (0 rows).")

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, rows: slice) -> Any:
        s, e, step = rows.indices(self.rows)
        if step != 1:
            raise ValueError("a splitter takes contiguous row ranges [s:e]")
        return self._slice(self.inputs, s, e)

    def _scan(self, obj: Any, path: str) -> None:
        if isinstance(obj, torch.Tensor):
            if obj.ndim:
                self.sizes.append((path, obj.shape[0]))
        elif isinstance(obj, Mapping):
            self._scan_mapping(obj, path)
        elif isinstance(obj, (list, tuple)):
            for i, value in enumerate(obj):
                self._scan(value, f"{path}[{i}]")

    def _scan_mapping(self, m: Mapping, path: str) -> None:
        """Record the row count of every tensor in ``m`` (``self.sizes``); override for special keys."""
        for key, value in m.items():
            self._scan(value, f"{path}.{key}")

    def _slice(self, obj: Any, s: int, e: int) -> Any:
        if isinstance(obj, torch.Tensor):
            return obj[s:e] if obj.ndim else obj
        if isinstance(obj, Mapping):
            out = self._slice_mapping(obj, s, e)
            try:
                return type(obj)(out)
            except Exception:
                return out
        if isinstance(obj, tuple) and hasattr(obj, "_fields"):
            return type(obj)(*(self._slice(v, s, e) for v in obj))
        if isinstance(obj, (list, tuple)):
            return type(obj)(self._slice(v, s, e) for v in obj)
        return obj

    def _slice_mapping(self, m: Mapping, s: int, e: int) -> dict:
        """Rows ``[s, e)`` of every value of ``m`` (keys may be dropped); override for special keys."""
        return {key: self._slice(value, s, e) for key, value in m.items()}


def find_mask(tree: Any) -> torch.Tensor | None:
    """The first ``attention_mask`` tensor in the nested inputs (outer levels first)."""
    if isinstance(tree, Mapping) and isinstance(tree.get("attention_mask"), torch.Tensor):
        return tree["attention_mask"]
    values = tree.values() if isinstance(tree, Mapping) else tree if isinstance(tree, (list, tuple)) else ()
    return next((m for m in map(find_mask, values) if m is not None), None)


def tensors(tree: Any) -> Iterator[torch.Tensor]:
    """Every tensor in the nested inputs (dicts, lists, tuples), depth first."""
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, Mapping):
        for value in tree.values():
            yield from tensors(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from tensors(value)


def chunk_bounds(
    rows: int, tree: Any, chunk_size: int | None, max_tokens: int | None
) -> tuple[list[tuple[int, int]], list[int]]:
    """Row ranges ``[s, e)`` of the chunks, and each chunk's cost (rows, or real tokens).

    ``chunk_size`` caps the rows of a chunk; ``max_tokens`` packs rows greedily by the real tokens
    of the first ``attention_mask`` in ``tree`` (a longer row gets a chunk of its own).
    """
    cap = chunk_size or rows
    if max_tokens is None:
        bounds = [(s, min(s + cap, rows)) for s in range(0, rows, cap)]
        return bounds, [e - s for s, e in bounds]
    mask = find_mask(tree)
    if mask is None or mask.ndim != 2:
        raise ValueError("max_tokens needs a 2-D attention_mask[B, L] in the inputs; use chunk_size instead.")
    bounds, costs, start, used = [], [], 0, 0
    for i, n in enumerate(mask.sum(1).tolist()):
        if i > start and (used + n > max_tokens or i - start >= cap):
            bounds.append((start, i))
            costs.append(used)
            start, used = i, 0
        used += n
    return bounds + [(start, rows)], costs + [used]


def check_chunk_output(out: Any, rows: int, prev: list[torch.Tensor], i: int) -> None:
    """Chunk ``i``'s output is a ``Tensor[rows, ...]`` with the trailing shape of the earlier chunks (``prev``)."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"GradCache: fn must return a Tensor[b, ...], got {type(out).__name__}; encode each output separately."
        )
    if out.ndim == 0 or out.shape[0] != rows or (prev and out.shape[1:] != prev[0].shape[1:]):
        want = f"[{rows}, {', '.join(map(str, prev[0].shape[1:]))}]" if prev else f"[{rows}, ...]"
        raise ValueError(
            f"GradCache: chunk {i} output has shape {list(out.shape)}, expected {want}: fn must return one row "
            "per input row with the same trailing shape for every chunk (pad token outputs to a fixed length)."
        )


def chunks_behind(n: int, sharded: bool) -> int:
    """How many more chunks than ``n`` the busiest rank runs: every FSDP2 forward (and backward) is a collective,
    so a rank with fewer rows (a bad row dropped on it alone, a ragged last batch) must run that many extra
    chunks or the others wait forever. 0 unless ``sharded`` under a process group of several ranks; one
    all-reduce (MAX) of a scalar on the default group otherwise."""
    import torch.distributed as dist

    if not sharded or not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return 0
    on_gpu = dist.get_backend() == "nccl"
    most = torch.tensor([n], device=torch.device("cuda", torch.cuda.current_device()) if on_gpu else "cpu")
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    return int(most.item()) - n


def spare_rng():
    """A context that restores every RNG after it (an extra chunk must not move this rank's random streams)."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return torch.random.fork_rng(devices=[torch.cuda.current_device()] if cuda else [])


def run_spare(fn: Any, split: Any, n: int) -> list[Any]:
    """``n`` forwards of ``split``'s first row without gradient, outputs dropped (`chunks_behind`), RNG spared;
    returns their inputs (replayed with a zero gradient)."""
    spare = [split[0:1] for _ in range(n)]
    with torch.no_grad(), spare_rng():
        for args, kwargs in spare:
            fn(*args, **kwargs)
    return spare
