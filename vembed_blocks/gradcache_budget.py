"""GradCache's graph keeping: which chunks of an ``encode`` call keep their first-pass graph.

A kept chunk is backpropagated directly (no no-grad pass, no replay). `KeepPlanner` decides per chunk:
with ``keep_graphs=k``, the k costliest chunks of the call; with ``memory_budget=bytes``, the first
chunk runs with grad, its footprint is measured (`_Footprint`: CUDA allocator growth, else the
storages saved for backward), and later chunks keep their graphs pro rata of their rows while the
budget, shared with the other pending ``encode`` calls, lasts. `EncodePlan` reports what a call did.

`vembed_blocks.gradcache` (the algorithm) is the only user; ``EncodePlan`` is re-exported there.

Imports: torch, and `vembed_blocks.gradcache_split` (to walk the chunk's tensors).
"""

from __future__ import annotations

import functools
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

import torch
from torch import nn

from .gradcache_split import tensors

__all__ = ["EncodePlan", "KeepPlanner"]


def _modules_of(fn: Any, extra: list[nn.Module]) -> list[nn.Module]:
    """The modules ``fn`` evidently runs: itself, its ``__self__``, a partial's arguments, closure cells, defaults."""
    cands = [*extra, fn, getattr(fn, "__self__", None)]
    if isinstance(fn, functools.partial):
        cands += [fn.func, *fn.args, *fn.keywords.values()]
    cands += [c.cell_contents for c in getattr(fn, "__closure__", None) or () if c.cell_contents is not None]
    cands += [*(getattr(fn, "__defaults__", None) or ()), *(getattr(fn, "__kwdefaults__", None) or {}).values()]
    return [m for m in cands if isinstance(m, nn.Module)]


def _storage(t: torch.Tensor) -> tuple[int, torch.UntypedStorage] | None:
    """``(data_ptr, storage)`` of ``t``'s storage; None for tensor subclasses without one of their own (DTensor)."""
    try:
        storage = t.untyped_storage()
        return storage.data_ptr(), storage
    except (RuntimeError, NotImplementedError, TypeError):
        return None


def _cuda_allocated() -> int:
    """Bytes allocated by tensors on all CUDA devices (0 before CUDA is initialised: nothing can be)."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return 0
    return sum(torch.cuda.memory_allocated(i) for i in range(torch.cuda.device_count()))


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t


class _Footprint:
    """Bytes one forward leaves held until its backward: what a kept graph costs.

    CUDA (the output, or anything the forward left allocated there): the growth of
    ``torch.cuda.memory_allocated`` over the forward (every tensor the graph holds, the output
    included). Otherwise an estimate: the unique storages saved for backward (``saved_tensors_hooks``),
    without those of the inputs and of the parameters and buffers of the modules ``fn`` evidently
    runs (`_modules_of`; a parameter reached otherwise counts: the estimate errs high, so fewer graphs
    are kept, never more). Storage sizes are read after the forward, so FSDP2's resharded (freed)
    parameters count 0. Activation checkpointing: its blocks' inputs count, which is what they hold.
    """

    def __init__(self, chunk: Any, modules: list[nn.Module]) -> None:
        self.chunk, self.modules = chunk, modules
        self.saved: dict[int, torch.UntypedStorage] = {}

    def __enter__(self) -> "_Footprint":
        self.cuda = -_cuda_allocated()
        # Inputs on CUDA: the allocator's count says it all, no hooks (compiled regions may not like them).
        self.hooks = None
        if not any(t.is_cuda for t in tensors(self.chunk)):
            self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)
            self.hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.hooks is not None:
            self.hooks.__exit__(*exc)
        self.cuda += _cuda_allocated()
        owned = [*tensors(self.chunk)]
        for m in self.modules:
            owned += [*m.parameters(), *m.buffers()]
        known = {found[0] for found in map(_storage, owned) if found is not None}
        self.estimate = sum(st.nbytes() for ptr, st in self.saved.items() if ptr not in known)
        # Drop the storages and the hooks (whose bound methods point back here: a cycle that only the
        # cyclic GC would free), so that a graph the caller drops is freed at once.
        self.saved, self.hooks, self.chunk, self.modules = {}, None, None, []

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        found = _storage(t)
        if found is not None:
            self.saved.setdefault(*found)
        # Not ``t`` itself: a saved output would then own its own graph (a cycle that is never freed).
        return t.detach()

    def bytes(self, out: torch.Tensor) -> int:
        return max(0, self.cuda) if out.is_cuda or self.cuda > 0 else self.estimate


@dataclass(frozen=True)
class EncodePlan:
    """What one ``encode`` call did (`GradCache.last_plan`): handy to log while tuning ``memory_budget``.

    ``chunks``: chunks of the call; ``kept``: how many kept their graph (never run without grad, never
    replayed); ``chunk_bytes``: the measured footprint of the first chunk (None without a budget);
    ``held_bytes``: the estimated bytes the kept graphs hold until backward.
    """

    chunks: int
    kept: int
    chunk_bytes: int | None = None
    held_bytes: float = 0


class KeepPlanner:
    """Which chunks of one ``encode`` call keep their graph (``keep_graphs`` or ``memory_budget``).

    ``costs``: each chunk's cost (rows or real tokens); ``held``: bytes the kept graphs of the other
    pending calls hold, read once chunk 0 is measured (their graphs are alive together with ours).
    Per chunk: `with_grad` (run the first pass with grad?), `measure` (the context around that
    forward), `keep` (keep the graph it made?); `plan` reports the call.
    """

    def __init__(self, costs: list[int], keep_graphs: int, budget: float | None, held: Callable[[], float]) -> None:
        self.budget, self._held = budget, held
        # keep_graphs: the costliest chunks (ties: the last ones), they save the most.
        order = sorted(range(len(costs)), key=lambda i: (costs[i], i), reverse=True)
        self._keep = set(order[:keep_graphs]) if budget is None else set()
        # memory_budget: bytes left and per row, once chunk 0 is measured (None until then, or if
        # chunk 0 carries no gradient: nothing to keep then).
        self.left: float | None = None
        self.per_row = 0.0
        self.chunk_bytes: int | None = None
        self.held = 0.0  # estimated bytes this call's kept graphs hold
        self._footprint: _Footprint | None = None

    def with_grad(self, i: int, rows: int) -> bool:
        if self.budget is None:
            return i in self._keep
        if i == 0:  # chunk 0 is measured
            return self.budget > 0
        return self.left is not None and self.per_row * rows <= self.left

    def measure(self, i: int, chunk: Any, fn: Any, modules: list[nn.Module]) -> ContextManager:
        """The context to run chunk ``i``'s forward with grad in: chunk 0's footprint under a budget."""
        if self.budget is None or i != 0:
            return nullcontext()
        self._footprint = _Footprint(chunk, _modules_of(fn, modules))
        return self._footprint

    def keep(self, i: int, rows: int, out: torch.Tensor) -> bool:
        """Whether chunk ``i``'s graph (``out``) is kept; books its estimated bytes against the budget."""
        if not out.requires_grad:
            return False
        if self.budget is None:
            return True
        if i == 0 and self._footprint is not None:
            self.chunk_bytes = self._footprint.bytes(out)
            self.per_row, self.left = self.chunk_bytes / rows, self.budget - self._held()
            self._footprint = None
        size = self.per_row * rows
        if self.left is None or size > self.left:
            return False  # the measured chunk over the budget: replayed like the rest
        self.left, self.held = self.left - size, self.held + size
        return True

    def plan(self, chunks: int, kept: int) -> EncodePlan:
        return EncodePlan(chunks, kept, self.chunk_bytes, self.held)
