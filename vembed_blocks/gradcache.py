"""GradCache: contrastive training with a batch larger than activation memory allows.

``encode`` embeds the batch chunk by chunk without keeping activations, and returns
``Tensor[B, ...]`` that requires grad. The loss is computed on the full batch, so every row
still sees every in-batch negative. When ``backward`` reaches the embeddings, their gradient
``dL/de [B, ...]`` is cached; once the whole backward pass is done, each chunk is re-run
with grad (same RNG, same autocast state) and backpropagated with its slice of that
gradient. By the chain rule this gives exactly the full-batch parameter gradients while
holding one chunk of activations.

Beyond the classic algorithm, some chunks keep their graph from the first pass and are backpropagated
directly (``keep_graphs`` / ``memory_budget``); chunks whose cached gradient is all zero are not replayed.

    gc = GradCache(chunk_size=32)               # or GradCache(max_tokens=8192), memory_budget=8 << 30
    q = gc.encode(model, **query_inputs)        # fn(**chunk) -> Tensor[b, ...]
    p = gc.encode(model, **doc_inputs)
    loss = criterion(q, p)
    loss.backward()                             # replays the chunks here

How inputs are cut into row chunks is the splitter's job (`RowSplit`: every tensor on dim 0);
inputs laid out otherwise bring their own, e.g. ``GradCache(chunk_size=8, splitter=VLMSplit)``
(`vembed_blocks.vlm`) for Qwen-VL's flat ``pixel_values``.

This module is the algorithm (chunk, cache the gradient, replay with the same RNG); `gradcache_split`
cuts inputs into chunks (`RowSplit`), `gradcache_budget` decides which graphs are kept (`EncodePlan`
reports it); both names import from here too. Imports: torch only (not its FSDP package, which costs
seconds: see `_fsdp_module_class`).
"""

from __future__ import annotations

import sys
import weakref
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ._torch_private import fsdp_gradient_sync, queue_backward_callback
from .gradcache_budget import EncodePlan, KeepPlanner
from .gradcache_split import RowSplit, check_chunk_output, chunk_bounds, chunks_behind, run_spare, spare_rng

__all__ = ["GradCache", "RandState", "RowSplit", "CudaRNG", "EncodePlan"]


class CudaRNG:
    """The CUDA generators of all visible devices, as `RandState` snapshots and restores them.

    A device-RNG provider (an entry of `RandState.devices`; another accelerator would bring its own)
    has four methods: ``initialized()``; ``get_states()``, one state per device; ``set_states(states)``;
    ``fresh_states()``, the states the generators held right after their lazy initialisation (their
    seed, offset 0), which is what they held at every moment before it.
    """

    def initialized(self) -> bool:
        return torch.cuda.is_available() and torch.cuda.is_initialized()

    def get_states(self) -> list[torch.Tensor]:
        return [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]

    def set_states(self, states: list[torch.Tensor]) -> None:
        for i, state in enumerate(states):
            torch.cuda.set_rng_state(state, i)

    def fresh_states(self) -> list[torch.Tensor]:
        states = []
        for i in range(torch.cuda.device_count()):
            gen = torch.Generator(device=f"cuda:{i}")  # a new generator: the default one is left alone
            gen.manual_seed(torch.cuda.default_generators[i].initial_seed())
            states.append(gen.get_state())
        return states


class RandState:
    """Snapshot of the CPU generator and of every device generator (`devices`: CUDA, all devices).

    Taken at construction. ``with state.replay():`` runs the block with these states and puts the
    states that were current back afterwards, so a replay draws exactly the random numbers (dropout
    masks) of the first pass without disturbing the training stream. All CUDA devices are captured
    (cheap, host-side seed/offset pairs) because a chunk may touch devices that none of its inputs
    live on.

    CUDA initialises lazily, and reading its generators would initialise it (a context on every
    device, even in a CPU-only run), so a device that is not initialised at construction is not
    read. If the block initialises it, the generators it drew from were fresh ones (their seed,
    offset 0): call `complete` right after the first run of the block to record those (`GradCache`
    does); ``replay`` completes the snapshot itself otherwise (exact unless the seed was changed
    in between). A replay then restores them like any other state and cannot miss a device.
    """

    #: Device-RNG providers captured besides the CPU generator (see `CudaRNG`).
    devices: tuple = (CudaRNG(),)

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self._devices = tuple(self.devices)
        self.device_states: list[list[torch.Tensor] | None] = [
            d.get_states() if d.initialized() else None for d in self._devices
        ]

    def complete(self) -> None:
        """Record the fresh states of device generators that were initialised after the snapshot."""
        for k, dev in enumerate(self._devices):
            if self.device_states[k] is None and dev.initialized():
                self.device_states[k] = dev.fresh_states()

    def _apply(self) -> None:
        torch.set_rng_state(self.cpu)
        self.complete()
        for dev, states in zip(self._devices, self.device_states):
            if states is not None:
                dev.set_states(states)

    @contextmanager
    def replay(self) -> Iterator[None]:
        outer = RandState()
        self._apply()
        try:
            yield
        finally:
            outer._apply()


def _fsdp_module_class() -> type | tuple:
    """FSDP2's ``FSDPModule`` once ``torch.distributed.fsdp`` is loaded, else ``()`` (no isinstance match).

    Why not import it here: it takes seconds, and a module can only be an ``FSDPModule`` if whoever
    sharded it imported that package already.
    """
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return getattr(fsdp, "FSDPModule", ()) if fsdp is not None else ()


def _autocast_state() -> list[tuple[str, bool, torch.dtype]]:
    kinds = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [(k, torch.is_autocast_enabled(k), torch.get_autocast_dtype(k)) for k in kinds]


@contextmanager
def _autocast(state: list[tuple[str, bool, torch.dtype]]) -> Iterator[None]:
    with ExitStack() as stack:
        for kind, enabled, dtype in state:
            stack.enter_context(torch.autocast(kind, dtype=dtype, enabled=enabled))
        yield


@dataclass(eq=False)
class _Record:
    """One ``encode`` call: what is needed to replay its chunks, dropped after replay."""

    fn: Callable[..., torch.Tensor] | None
    chunks: list[Any]  # (args, kwargs) per chunk, or None once done
    states: list[RandState | None]
    bounds: list[tuple[int, int]]
    autocast: list[tuple[str, bool, torch.dtype]]
    kept: dict[int, torch.Tensor] = field(default_factory=dict)  # chunk -> output with its graph
    spare: list[Any] = field(default_factory=list)  # FSDP2: extra one-row chunks, run for the collectives only
    sync: list[nn.Module] = field(default_factory=list)
    grad: torch.Tensor | None = None
    held: float = 0  # estimated bytes of the kept graphs (memory_budget), until backward


class _CachedEmbedding(torch.autograd.Function):
    """Identity on the (detached) embeddings whose backward caches their gradient.

    ``anchor`` is a leaf that requires grad, so that autograd calls our backward even
    though the embeddings were computed without a graph.
    """

    @staticmethod
    def forward(ctx, owner: "GradCache", record: _Record, anchor: torch.Tensor, *outs: torch.Tensor) -> torch.Tensor:
        ctx.owner, ctx.record, ctx.n = owner, record, len(outs)
        return torch.cat(outs, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.record.fn is None:
            raise RuntimeError(
                "GradCache: this encode output was already backpropagated; each encode is replayed once."
            )
        ctx.record.grad = grad
        # The replay must wait until every encode output of this backward has its gradient.
        queue_backward_callback(ctx.owner._flush)
        return (None, None, None) + (None,) * ctx.n


class GradCache:
    """Chunked encoding with cached-gradient replay; parameter gradients equal full-batch ones.

    Args:
        chunk_size: rows per chunk.
        max_tokens: real tokens (``attention_mask`` sum) per chunk; rows are packed greedily,
            a row longer than the budget gets a chunk of its own. May be combined with ``chunk_size``.
        keep_graphs: how many chunks of each ``encode`` call (the largest; ties: the last) keep their graph
            from the first pass instead of being re-run (0 = classic GradCache; each kept graph holds
            that chunk's activations until backward). Default 1. The fixed-count alternative to
            ``memory_budget``: give one or the other.
        memory_budget: bytes that kept graphs may hold at once (``float("inf")``: keep every graph, i.e.
            a plain chunked forward/backward without replay; 0: classic GradCache). The first chunk's
            footprint is measured, later chunks keep their graphs pro rata of their rows while the
            budget (shared by all pending ``encode`` calls) lasts; the rest are replayed
            (`vembed_blocks.gradcache_budget.KeepPlanner`). What each call did is in `last_plan`.
        sync_module: the DDP or FSDP2 module (or a list) whose gradient sync GradCache must
            control. ``fn`` itself (or the module a bound method ``fn`` belongs to) is detected.
            DDP: every chunk but the very last replayed one runs under ``no_sync``, so one
            all-reduce per step. FSDP2: ``set_requires_gradient_sync(False)`` until the last unit; a
            rank with fewer chunks (fewer rows) runs spare one-row chunks, outputs dropped and zero
            gradients, so that every rank runs the same collectives (`gradcache_split.chunks_behind`).
        sync_each_chunk: FSDP2 only: reduce-scatter after every chunk (sharded gradients) instead
            of accumulating unsharded gradients until the end.
        splitter: how ``encode`` inputs are cut into row chunks: a callable ``splitter(inputs)`` (``inputs``
            = the call's ``(args, kwargs)``) returning an object with ``len()`` (rows), ``[s:e]`` (the inputs
            of rows s..e-1) and ``inputs`` (what ``max_tokens`` counts); one that reorders rows also has
            ``restore(out)``. Default `RowSplit` (every tensor on dim 0); `vembed_blocks.vlm.VLMSplit` for
            Qwen-VL inputs; `vembed_blocks.length_chunks.LengthSplit` sorts rows by length and trims padding.
    """

    def __init__(
        self,
        chunk_size: int | None = None,
        max_tokens: int | None = None,
        keep_graphs: int | None = None,
        sync_module: nn.Module | list[nn.Module] | None = None,
        sync_each_chunk: bool = False,
        splitter: Callable[[Any], RowSplit] | None = None,
        memory_budget: float | None = None,
    ) -> None:
        if chunk_size is None and max_tokens is None:
            raise ValueError("GradCache needs chunk_size=<rows> or max_tokens=<real tokens per chunk>.")
        if memory_budget is not None and keep_graphs is not None:
            raise ValueError(
                "GradCache: give memory_budget (bytes: as many graphs as fit are kept) or keep_graphs "
                "(a fixed count per encode call), not both."
            )
        keep_graphs = 1 if keep_graphs is None else keep_graphs
        if (
            (chunk_size is not None and chunk_size < 1)
            or (max_tokens is not None and max_tokens < 1)
            or keep_graphs < 0
            or (memory_budget is not None and not memory_budget >= 0)
        ):
            raise ValueError("chunk_size and max_tokens must be positive, keep_graphs and memory_budget >= 0.")
        mods = (
            [] if sync_module is None else [*sync_module] if isinstance(sync_module, (list, tuple)) else [sync_module]
        )
        if sync_each_chunk and any(isinstance(m, DistributedDataParallel) for m in mods):
            raise ValueError("sync_each_chunk is for FSDP2; DDP must reduce once per step.")
        self.chunk_size, self.max_tokens, self.keep_graphs = chunk_size, max_tokens, keep_graphs
        self.memory_budget = memory_budget
        self.sync_modules, self.sync_each_chunk = mods, sync_each_chunk
        self.splitter = splitter or RowSplit
        self.last_plan: EncodePlan | None = None
        self._anchor = torch.zeros((), requires_grad=True)
        self._pending: list[weakref.ref[_Record]] = []

    def _sync_modules(self, fn: Any) -> list[nn.Module]:
        found = list(self.sync_modules)
        for cand in (fn, getattr(fn, "__self__", None)):
            if isinstance(cand, (DistributedDataParallel, _fsdp_module_class())) and cand not in found:
                found.append(cand)
        return found

    def encode(self, fn: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        """Run ``fn(*args, **kwargs)`` chunk by chunk; return ``Tensor[B, ...]`` that requires grad.

        ``args``/``kwargs`` are cut into row chunks by the splitter (default `RowSplit`: every tensor,
        in nested dicts/lists/tuples too, on dim 0). ``fn`` must return ``Tensor[b, ...]`` for a chunk
        of b rows. Under ``no_grad`` with a model in eval mode this is just a chunked forward.
        """
        split = self.splitter((args, kwargs))
        tree = getattr(split, "inputs", (args, kwargs))  # in the order the chunks are cut (LengthSplit sorts)
        bounds, costs = chunk_bounds(len(split), tree, self.chunk_size, self.max_tokens)
        restore = getattr(split, "restore", lambda out: out)  # a splitter that reorders rows puts them back
        if hasattr(split, "costs"):  # a trimming splitter (LengthSplit): padded tokens, so the widest chunk is kept
            costs = split.costs(bounds)
        if not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
            owners = [*self.sync_modules, fn, getattr(fn, "__self__", None)]
            if any(isinstance(m, nn.Module) and m.training for m in owners):
                raise RuntimeError(
                    "GradCache.encode was called under torch.no_grad()/inference_mode() while the model is in "
                    "training mode, so its output could not carry gradient: call it with grad enabled, or call "
                    "model.eval() first to embed without gradient."
                )
            behind = chunks_behind(len(bounds), _sharded(self._sync_modules(fn)))  # agreed before any forward
            outs = [fn(*chunk[0], **chunk[1]) for chunk in (split[s:e] for s, e in bounds)]
            run_spare(fn, split, behind)
            return restore(torch.cat(outs))
        rec = _Record(fn, [], [], bounds, _autocast_state(), sync=self._sync_modules(fn))
        behind = chunks_behind(len(bounds), _sharded(rec.sync))  # agreed before any forward: those are collectives
        planner = KeepPlanner(costs, self.keep_graphs, self.memory_budget, self._held)
        outs, ran_with_grad, trainable = [], False, False
        for i, (s, e) in enumerate(bounds):
            chunk = split[s:e]
            rec.chunks.append(chunk)
            rec.states.append(RandState())
            if planner.with_grad(i, e - s):
                # The final all-reduce belongs to the last replayed unit.
                with self._no_sync(rec.sync), planner.measure(i, chunk, fn, rec.sync):
                    out = fn(*chunk[0], **chunk[1])
                check_chunk_output(out, e - s, outs, i)
                ran_with_grad, trainable = True, trainable or out.requires_grad
                if planner.keep(i, e - s, out):
                    rec.kept[i] = out
                out = out.detach()  # a graph not kept is replayed like the rest
            else:
                with torch.no_grad():
                    out = fn(*chunk[0], **chunk[1])
                check_chunk_output(out, e - s, outs, i)
            rec.states[i].complete()  # a device (CUDA) initialised by this chunk: record its fresh RNG
            outs.append(out)
        rec.spare = run_spare(fn, split, behind)
        rec.held = planner.held
        self.last_plan = planner.plan(len(bounds), len(rec.kept))
        if ran_with_grad and not trainable:  # frozen tower: its output carries no gradient, nothing to replay
            return restore(torch.cat(outs))
        self._pending.append(weakref.ref(rec))
        return restore(_CachedEmbedding.apply(self, rec, self._anchor, *outs))

    def _held(self) -> float:
        """Estimated bytes held by the kept graphs of pending ``encode`` outputs (``memory_budget``)."""
        return sum(r.held for r in (ref() for ref in self._pending) if r is not None and r.fn is not None)

    @contextmanager
    def _no_sync(self, mods: list[nn.Module]) -> Iterator[None]:
        """DDP ``no_sync`` for a forward+backward that must not all-reduce."""
        with ExitStack() as stack:
            for m in mods:
                if isinstance(m, DistributedDataParallel):
                    stack.enter_context(m.no_sync())
            yield

    def reset(self) -> None:
        """Forget every pending ``encode`` output (e.g. after an exception, or embeddings not trained on)."""
        for ref in self._pending:
            rec = ref()
            if rec is not None:
                _release(rec)
        self._pending = []

    def _flush(self) -> None:
        """Autograd final callback: backpropagate every pending encode output, chunk by chunk."""
        records = [r for r in (ref() for ref in self._pending) if r is not None and r.fn is not None]
        if not any(r.grad is not None for r in records):
            return  # another callback of this backward pass already did the work
        self._pending = []
        try:
            missing = [f"#{k} ({r.bounds[-1][1]} rows)" for k, r in enumerate(records) if r.grad is None]
            if missing:
                raise RuntimeError(
                    f"GradCache: encode output(s) {', '.join(missing)} received no gradient in this backward. "
                    "Every tensor returned by encode must feed the loss that is backpropagated (backward each "
                    "micro-batch's loss before encoding the next, or call gc.reset() to drop unused outputs)."
                )
            self._run([r for r in records if r.grad is not None])
        finally:
            for r in records:
                _release(r)

    def _run(self, ready: list[_Record]) -> None:
        """Kept graphs first (frees their activations early), then replays.

        Each DDP/FSDP module syncs on its own last unit only (towers may be separate modules).
        """
        units = [(r, i) for r in ready for i in sorted(r.kept)]
        units += [(r, i) for r in ready for i in range(len(r.bounds) + len(r.spare)) if i not in r.kept]
        mods = list({id(m): m for r in ready for m in r.sync}.values())
        if not mods:  # a chunk whose cached gradient is all zero contributes nothing (exact)
            units = [(r, i) for r, i in units if bool(r.grad[slice(*r.bounds[i])].any())]
        last = {id(m): max(k for k, (r, _) in enumerate(units) if m in r.sync) for m in mods}
        for m in mods:
            r, i = units[last[id(m)]]
            if isinstance(m, DistributedDataParallel):
                r.kept.pop(i, None)  # DDP decides to all-reduce at forward time: its last unit must be a fresh forward
        fsdp = [m for m in mods if isinstance(m, _fsdp_module_class())] if not self.sync_each_chunk else []
        user_flags = [_user_fsdp_sync(m) for m in fsdp]
        try:
            for k, (r, i) in enumerate(units):
                for m, flag in zip(fsdp, user_flags):
                    m.set_requires_gradient_sync(flag and last[id(m)] == k)
                with self._no_sync([m for m in mods if last[id(m)] != k]):
                    _backprop_chunk(r, i)
        finally:
            for m, flag in zip(fsdp, user_flags):
                m.set_requires_gradient_sync(flag)


def _backprop_chunk(r: _Record, i: int) -> None:
    """Backpropagate chunk ``i``'s cached gradient, through its kept graph or a replay."""
    if i >= len(r.bounds):  # a spare chunk: forward and a zero backward, for FSDP2's collectives only
        args, kwargs = r.spare[i - len(r.bounds)]
        with spare_rng(), _autocast(r.autocast), torch.enable_grad():
            out = r.fn(*args, **kwargs)
        if out.requires_grad:
            torch.autograd.backward(out, torch.zeros_like(out))
        return
    s, e = r.bounds[i]
    grad = r.grad[s:e]
    out = r.kept.pop(i, None)
    if out is None:
        args, kwargs = r.chunks[i]
        with r.states[i].replay(), _autocast(r.autocast), torch.enable_grad():
            out = r.fn(*args, **kwargs)
        if not isinstance(out, torch.Tensor) or out.shape != grad.shape:
            raise RuntimeError(f"GradCache: replaying chunk {i} gave a different output shape than the first pass.")
    r.chunks[i] = r.states[i] = None
    if out.requires_grad:
        torch.autograd.backward(out, grad)


def _release(r: _Record) -> None:
    """Drop everything a record holds (inputs, RNG states, graphs, cached gradient)."""
    r.fn, r.chunks, r.states, r.grad, r.sync, r.held, r.spare = None, [], [], None, [], 0, []
    r.kept.clear()


def _sharded(mods: list[nn.Module]) -> bool:
    return any(isinstance(m, _fsdp_module_class()) for m in mods)


def _user_fsdp_sync(m: nn.Module) -> bool:
    """Whether FSDP2 gradient sync is currently on for ``m`` (what the user set for this step), to put back after."""
    try:
        return fsdp_gradient_sync(m)
    except AttributeError:  # FSDP2's private layout changed (tests/test_torch_private.py fails then): the default
        return True
