"""Stream sharded data sets (tar / Parquet / JSONL shards, ``datasets`` objects) into training steps.

``open_stream(spec, batch_size, collate_fn)`` returns a `StreamLoader`, a drop-in for
`TaskLoader` (``steps(end)``, ``step``, ``state_dict``, ``load_state_dict``)::

    loader = open_stream("shards/{00000..01023}.tar", 64, collator, num_workers=4)
    start = load_checkpoint(ckpt, model=..., optimizer=..., sampler=loader)
    for step, batches, sources in loader.steps(end):
        ...

Everything is a pure function of ``seed``:

- Split and shuffle: each DataLoader worker of each rank is one `ShardReader` per source
  (data/shard_stream.py: disjoint shares of the shards, a bounded block shuffle).
- Mixing: the source of micro-step ``t`` is ``WeightedTaskSampler.draw(t)`` over the source
  weights: the same on every rank; step ``t`` is built by worker ``t % W`` from its own readers.
- Resume: the loader's state is the micro-step plus each worker's reader states: O(workers x
  sources), never O(data).
- ``epochs=n`` on several ranks: ranks agree on the last step with one tiny all-reduce per
  step, so no rank runs a step (and its collectives) that another rank skips.

Bad samples (undecodable image, missing caption, malformed JSON) are skipped, counted
(``loader.skipped``) and logged with their ``shard:member``; a shard that cannot be opened or
is corrupt raises ``ShardError`` naming it, or with ``skip_bad_shards`` is skipped and counted
(``loader.bad_shards``). A resume is refused when the shards (names and sizes; no content hash,
shards can be TBs) or the accumulation differ from the checkpoint's. See docs/streaming.md.
"""

from __future__ import annotations

import glob
import logging
import os
import re
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import torch
from torch.utils.data import DataLoader

if TYPE_CHECKING:
    from .records import Record
    from .shard_formats import DatasetSource, ShardSet

__all__ = ["StreamLoader", "open_stream", "is_stream_spec", "expand_shards"]

log = logging.getLogger(__name__)
_BRACES = re.compile(r"\{[^{}]*(\.\.|,)[^{}]*\}")


def _is_dataset(obj: Any) -> bool:
    return type(obj).__module__.startswith("datasets.")


def is_stream_spec(spec: Any) -> bool:
    """Whether ``spec`` names sharded data for `open_stream` rather than one file for ``load_records``.

    True for: a brace pattern (``data/{00000..01023}.tar``, ``{a,b}.parquet``), a glob
    (``data/*.tar``), a ``.tar`` file, a directory holding ``.tar`` / ``.parquet`` / ``.jsonl``
    files directly, a ``datasets`` object, or a mapping of such (several weighted sources).
    """
    # Here, not at import: `import shards` then loads no other package module (records loads user_errors).
    from .shard_formats import SHARD_KINDS, DatasetSource, ShardSet

    if isinstance(spec, Mapping):
        return bool(spec) and all(is_stream_spec(v) for v in spec.values())
    if _is_dataset(spec) or isinstance(spec, (ShardSet, DatasetSource)):
        return True
    if not isinstance(spec, (str, os.PathLike)):
        return False
    path = os.fspath(spec)
    if _BRACES.search(path) or glob.has_magic(path) or path.lower().endswith(".tar"):
        return True
    return os.path.isdir(path) and any(os.path.splitext(f)[1].lower() in SHARD_KINDS for f in os.listdir(path))


def expand_shards(spec: str | os.PathLike) -> list[str]:
    """The shard paths a spec names: brace patterns expanded (in order), globs and directories
    sorted. Raises ``FileNotFoundError`` naming a shard that does not exist or a pattern that
    matches nothing."""
    from .shard_formats import SHARD_KINDS

    path = os.fspath(spec)
    if os.path.isdir(path):
        found = sorted(os.path.join(path, f) for f in os.listdir(path) if os.path.splitext(f)[1].lower() in SHARD_KINDS)
        if not found:
            raise FileNotFoundError(f"{path}: no {sorted(SHARD_KINDS)} shards in this directory")
        return found
    patterns = [path]
    if _BRACES.search(path):
        try:
            from braceexpand import braceexpand
        except ImportError as e:
            raise ImportError(
                f'brace patterns ({path}) need braceexpand: pip install "vembed-blocks[streaming]"'
            ) from e
        patterns = list(braceexpand(path))
    out: list[str] = []
    for p in patterns:
        matches = sorted(glob.glob(p)) if glob.has_magic(p) else [p]
        if not matches:
            raise FileNotFoundError(f"{p}: the pattern matches no shard")
        missing = next((m for m in matches if not os.path.isfile(m)), None)
        if missing is not None:
            raise FileNotFoundError(f"shard not found: {missing} (from {path})")
        out += matches
    return out


def _as_source(spec: Any, name: str, options: Mapping[str, Any], allow_mixed: bool) -> ShardSet | DatasetSource:
    """One source; a folder's or a glob's files are logged and checked first (`listing.check_listed_files`)."""
    from .shard_formats import DatasetSource, ShardSet

    if isinstance(spec, (ShardSet, DatasetSource)):
        return spec
    if _is_dataset(spec):
        return DatasetSource(spec, name=name, **options)
    paths, path = expand_shards(spec), os.fspath(spec)
    if os.path.isdir(path) or glob.has_magic(path):  # files found by listing, not named one by one
        from .listing import check_listed_files

        check_listed_files(path, paths, allow_mixed=allow_mixed, record_options=options)
    return ShardSet(paths, **options)


class StreamLoader:
    """`TaskLoader`'s interface over streamed sources: ``steps(end)`` yields ``(step, micro_batches,
    their_sources)`` for optimizer steps ``self.step + 1 .. end``, ``grad_accum_steps`` micro-batches
    of ``batch_size`` records (per rank) each, collated by ``collate_fn`` (records without one).

    ``sources``: name -> `ShardSet` / `DatasetSource`. ``weights``: name -> weight (or
    ``"a=0.7,b=0.3"``); ``None`` weighs them equally. ``epochs=None`` streams forever (the
    run's length is ``end``); with ``epochs=n`` ``steps`` ends before the first optimizer step
    that some reader (on any rank: they agree through one all-reduce per step, which needs the
    process group) cannot fill. ``state_dict()`` is the state after the last step
    yielded (JSON-able); resuming needs the same world size, ``num_workers``, batch size,
    ``grad_accum_steps`` and data (each shard's name and size; a dataset's length and fingerprint).
    ``skip_bad_shards``: skip (log, count) a shard that cannot be read instead of stopping. Counts on
    this rank: ``bad_rows`` (bad samples, all sources), ``bad_shards``; ``read_skipped`` is 0 (no file
    is read up front).
    """

    read_skipped = 0

    def __init__(
        self,
        sources: Mapping[str, ShardSet | DatasetSource],
        batch_size: int,
        collate_fn: Callable[[list[Record]], Any] | None = None,
        *,
        weights: Mapping[str, float] | str | None = None,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        num_workers: int = 0,
        grad_accum_steps: int = 1,
        shuffle_buffer: int = 1000,
        epochs: int | None = None,
        decode_images: bool = True,
        skip_bad_shards: bool = False,
    ) -> None:
        if rank is None or world_size is None:
            from ..distributed import get_rank, get_world_size

            rank = get_rank() if rank is None else rank
            world_size = get_world_size() if world_size is None else world_size
        if batch_size < 1 or grad_accum_steps < 1 or num_workers < 0 or not 0 <= rank < world_size:
            raise ValueError(
                "need batch_size >= 1, grad_accum_steps >= 1, num_workers >= 0, 0 <= rank < world_size; got "
                f"{batch_size}, {grad_accum_steps}, {num_workers}, rank={rank}, world_size={world_size}"
            )
        # Imported here, not at import: `import shards` stays light (the workers' side loads on use).
        from .sampler import WeightedTaskSampler, parse_weights
        from .shard_stream import StreamPlan

        if isinstance(weights, str):
            weights = parse_weights(weights)
        draw = WeightedTaskSampler({n: 1 for n in sources}, 1, weights, seed, rank=0, world_size=1)
        self.sources = {n: sources[n] for n in draw.tasks}
        workers = max(1, num_workers)
        self.plan = StreamPlan(
            self.sources,
            draw,
            batch_size,
            collate_fn,
            rank,
            world_size,
            workers,
            int(seed),
            shuffle_buffer,
            epochs,
            decode_images,
            skip_bad_shards,
        )
        self.num_workers, self.seed, self.accum = num_workers, int(seed), grad_accum_steps
        self.step_rows = batch_size * world_size * grad_accum_steps  # rows per step, all ranks (TaskLoader's)
        self._state: dict[str, Any] = {
            "kind": "stream",
            "step": 0,
            "seed": self.seed,
            "world_size": world_size,
            "workers": workers,
            "batch_size": batch_size,
            "grad_accum_steps": grad_accum_steps,
            "readers": [{} for _ in range(workers)],
        }
        self._listing: dict[str, Any] | None = None  # the sources' shards and sizes, stat'ed when first needed

    @property
    def step(self) -> int:
        """Optimizer steps done: the next is ``self.step + 1``."""
        return int(self._state["step"]) // self.accum

    @property
    def skipped(self) -> dict[str, int]:
        """Bad samples skipped so far on this rank, per source (as of the last step yielded)."""
        return {n: sum(int(w[n]["skipped"]) for w in self._state["readers"] if n in w) for n in self.sources}

    @property
    def bad_rows(self) -> int:
        """Bad samples skipped so far on this rank, all sources together (as of the last step yielded)."""
        return sum(self.skipped.values())

    @property
    def bad_shards(self) -> int:
        """Shards skipped as unreadable (``skip_bad_shards``) by this rank's readers so far; a shard
        read by several readers (sliced) or in several epochs counts each time."""
        return sum(int(r.get("bad_shards", 0)) for w in self._state["readers"] for r in w.values())

    def sources_listing(self) -> dict[str, Any]:
        """Per source, what fixes its data: ``{"shards": [[name, bytes], ...]}`` for a `ShardSet`
        (names relative to the shards' common folder), ``{"rows", "units", "fingerprint"}`` for a
        `DatasetSource`. Computed (one stat per shard) on first use, then kept."""
        if self._listing is None:
            from .shard_stream import source_listing

            self._listing = {name: source_listing(source) for name, source in self.sources.items()}
        return self._listing

    def state_dict(self) -> dict[str, Any]:
        return {**self._state, "sources": self.sources_listing()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key in ("kind", "seed", "world_size", "workers", "batch_size"):
            if state.get(key) != self._state[key]:
                raise ValueError(
                    f"stream state has {key}={state.get(key)!r} but this loader has {self._state[key]!r}; "
                    "resume with the same seed, world size, num_workers and batch size"
                )
        from .loader import _check_same_accum
        from .shard_stream import listing_changes

        _check_same_accum(state, self.accum)
        if state.get("sources") is not None:
            changes = listing_changes(state["sources"], self.sources_listing())
            if changes:
                raise ValueError(
                    "the streamed data differs from the checkpoint's: " + "; ".join(changes) + ". Resume with the "
                    "data the checkpoint was trained on, or start a new run"
                )
        unknown = sorted({n for w in state["readers"] for n in w} - set(self.sources))
        if unknown:
            raise ValueError(f"stream state has readers of sources {unknown}; this loader has {sorted(self.sources)}")
        run = {k: v for k, v in state.items() if k != "sources"}
        self._state = {**run, "grad_accum_steps": self.accum, "readers": [dict(w) for w in state["readers"]]}

    def steps(self, end: int) -> Iterator[tuple[int, list[Any], list[str]]]:
        """``(step, micro_batches, their_sources)`` for optimizer steps ``self.step + 1 .. end`` (1-based).

        ``micro_batches``: ``grad_accum_steps`` collated batches of ``batch_size`` records each;
        ``their_sources``: the source name of each micro-batch (the same on every rank).
        """
        start = int(self._state["step"])
        if start % self.accum:
            raise ValueError(f"stream state at micro-step {start} is not a multiple of {self.accum}")
        agree = self.plan.epochs is not None and self.plan.world_size > 1
        if agree:
            _check_process_group(self.plan.world_size, self.plan.epochs)
        from .shard_stream import StreamBatches

        data = StreamBatches(self.plan, start, max(0, end - self.step) * self.accum, self._state["readers"])
        generator = torch.Generator().manual_seed(self.seed)  # never draws from the global RNG
        loader = DataLoader(data, batch_size=None, num_workers=self.num_workers, generator=generator)
        batches, names = [], []
        readers = [dict(w) for w in self._state["readers"]]
        for item in loader:
            if item.get("end"):
                log.warning(
                    "source %r ran out at micro-step %d (epochs=%s)", item["source"], item["step"], self.plan.epochs
                )
                if agree:
                    _every_rank_has(False)  # the others are waiting on this step's vote
                return
            readers[item["worker"]] = item["state"]
            batches.append(item["batch"])
            names.append(item["source"])
            if len(batches) == self.accum:
                if agree and not _every_rank_has(True):
                    log.warning("another rank's data ran out at step %d (epochs=%s)", self.step + 1, self.plan.epochs)
                    return
                self._state = {**self._state, "step": item["step"] + 1, "readers": [dict(w) for w in readers]}
                yield (item["step"] + 1) // self.accum, batches, names
                batches, names = [], []


def _check_process_group(world_size: int, epochs: int) -> None:
    from ..distributed import get_world_size, is_dist

    if not is_dist() or get_world_size() != world_size:
        raise ValueError(
            f"epochs={epochs} with world_size={world_size} needs the process group of those ranks (they agree "
            "on the last step with one all-reduce per step, since their shares can run out at different "
            "steps); initialise it before steps(), or stream endlessly with epochs=None"
        )


def _every_rank_has(ok: bool) -> bool:
    """Whether ``ok`` holds on every rank: one all-reduce of one int, on the backend's device."""
    import torch.distributed as dist

    from ..distributed import any_rank

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    return not any_rank([not ok], device)[0]


def open_stream(
    spec: Any,
    batch_size: int,
    collate_fn: Callable[[list[Record]], Any] | None = None,
    *,
    weights: Mapping[str, float] | str | None = None,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    num_workers: int = 0,
    grad_accum_steps: int = 1,
    shuffle_buffer: int = 1000,
    epochs: int | None = None,
    decode_images: bool = True,
    skip_bad_shards: bool = False,
    allow_mixed: bool = False,
    **record_options: Any,
) -> StreamLoader:
    """A `StreamLoader` over ``spec``: a shard spec (see `is_stream_spec`), a ``datasets`` object,
    a `ShardSet` / `DatasetSource`, or a mapping name -> any of those (mixed by ``weights``).

    ``record_options`` go to every source: ``columns``, ``format``, ``task``, ``t2i_mode``,
    ``inverse``, ``language`` (as ``read_records``) and, for ``datasets`` objects, ``image_root``.
    ``skip_bad_shards``: skip (log, count) shards that cannot be read instead of stopping.
    A folder or glob is listed and checked first (`listing.check_listed_files`: one log line per
    file; a ``UserError`` for files named like a validation split or of several row formats unless
    ``allow_mixed``), which parses the first rows of up to 64 files; otherwise nothing is read here:
    the first shard is opened by the first ``steps`` call.
    """
    specs = dict(spec) if isinstance(spec, Mapping) else {"train": spec}
    sources = {name: _as_source(s, name, record_options, allow_mixed) for name, s in specs.items()}
    return StreamLoader(
        sources,
        batch_size,
        collate_fn,
        weights=weights,
        seed=seed,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        grad_accum_steps=grad_accum_steps,
        shuffle_buffer=shuffle_buffer,
        epochs=epochs,
        decode_images=decode_images,
        skip_bad_shards=skip_bad_shards,
    )
