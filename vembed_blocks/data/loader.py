"""`TaskLoader`: the sampler's batches through a DataLoader, plus the state a checkpoint saves.

A recipe's loop needs two things from its data: the next batch, and, when it saves, the
sampler state *after the last batch it trained on* (DataLoader workers run ahead, so the
sampler object in the main process never knows it). `TaskLoader` gives both, so no recipe
keeps that bookkeeping::

    loader = TaskLoader(tasks, sampler, collator, num_workers=2, seed=0, grad_accum_steps=2)
    start = load_checkpoint(ckpt, model=..., optimizer=..., sampler=loader)   # restores it
    for step, batches, streams in loader.steps(end):   # step: 1-based optimizer step
        ...                                            # batches: grad_accum_steps micro-batches
                                                       # streams: their "task" or "task/group" keys
        save_checkpoint(ckpt, model=..., optimizer=..., step=step, sampler=loader)

``steps(end)`` yields optimizer steps ``loader.step + 1 .. end``, each with the
``grad_accum_steps`` micro-batches of consecutive sampler steps; each DataLoader worker builds
every ``num_workers``-th micro-batch (`TaskBatches`), so the sequence is the same for any
worker count and for a resumed run. Every rank must draw the same task at a step (negatives of one
kind): the draws are a pure function of the sampler's seed, batch and weights, so ``steps`` checks once,
with one small all-gather, that every rank's sampler has the same ones.

A resume continues the same run or is refused: the state records the accumulation and, when given,
what the data is (``identity``, e.g. `file_fingerprint`); the sampler adds each stream's row count.

`task_loader` builds the sampler and the loader in one call; `training_batches` does the same for
a file, or streams a sharded set (`shards.open_stream`) behind the same ``steps`` / ``state_dict``.

Imports: torch, `data.sampler` (records, images and shards load inside the functions that use them).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import warnings
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .sampler import WeightedTaskSampler

__all__ = ["TaskBatches", "TaskLoader", "file_fingerprint", "task_loader", "training_batches"]

log = logging.getLogger(__name__)
Collate = Callable[[list[Any]], Any]  # records -> batch


def _data_errors() -> tuple[type[Exception], ...]:
    """The errors that mean "this row's data is bad" (not a bug): a row's image or the row itself."""
    from .images import ImageLoadError
    from .records import RecordError

    return ImageLoadError, RecordError


class TaskBatches(IterableDataset):
    """The sampler's batches as a ``DataLoader`` dataset; identical for any ``num_workers``.

    Use ``DataLoader(TaskBatches(tasks, sampler, collate_fn), batch_size=None, num_workers=N)``.
    Worker ``w`` of ``N`` builds the batches of steps ``(t - first) % N == w`` (each worker replays the
    cheap index draws of the others, never their loading), and the DataLoader's in-order
    round robin puts them back in step order. Each item is a dict
    ``{"step", "task", "stream", "batch", "sampler_state", "bad_rows", "global_rows"}``: ``stream`` is ``task`` or
    ``task/group``, ``batch`` is ``collate_fn(records)`` (``collate_fn[task](records)`` for a mapping task ->
    collate, which must cover every drawn task; the list of records without one), ``global_rows`` the
    draw's rows on all ranks (``sampler.drawn_rows``), and
    ``sampler_state`` is the sampler's state *after* this step: save the one of the last batch you
    trained on, and pass it as ``state`` (or load it into the sampler) to resume exactly. ``steps``
    makes the stream finite.

    ``skip_bad``: when the (task's) ``collate_fn`` raises ``ImageLoadError`` / ``RecordError``, the rows are
    collated one at a time to find the bad ones, which are logged and dropped; the batch is the
    others, in the sampler's order (``bad_rows``: how many were dropped; the draws never change).
    A micro-batch whose rows are all bad is a ``ValueError``.
    """

    def __init__(
        self,
        tasks: Mapping[str, Sequence[Any]],
        sampler: WeightedTaskSampler,
        collate_fn: Collate | Mapping[str, Collate] | None = None,
        steps: int | None = None,
        state: Mapping[str, Any] | None = None,
        skip_bad: bool = False,
    ) -> None:
        missing = sorted(set(sampler.tasks) - set(tasks))
        if missing:
            raise ValueError(f"sampler draws tasks with no records: {missing}")
        _check_collates(collate_fn, sampler)
        self.tasks, self.collate_fn, self.steps, self.skip_bad = tasks, collate_fn, steps, skip_bad
        self.sampler = copy.deepcopy(sampler)  # the caller's sampler is never advanced behind its back
        if state is not None:
            self.sampler.load_state_dict(state)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        sampler = copy.deepcopy(self.sampler)  # every epoch/iterator restarts from the same state
        start = sampler.step
        end = None if self.steps is None else start + self.steps
        while end is None or sampler.step < end:
            step = sampler.step
            stream = sampler.draw(step)[1]
            task, rows = next(sampler)
            # Counted from the start, not from step 0: the DataLoader asks worker 0 for the first batch, so after a
            # resume at an odd step worker 0 must build that one (by step % nw the order came out swapped).
            if (step - start) % nw != wid:
                continue
            batch, bad = self._collate([self.tasks[task][i] for i in rows], step, task)
            yield {
                "step": step,
                "task": task,
                "stream": stream,
                "batch": batch,
                "sampler_state": sampler.state_dict(),
                "bad_rows": bad,
                "global_rows": sampler.drawn_rows,  # all ranks' rows of this draw
            }

    def _collate(self, records: list[Any], step: int, task: str) -> tuple[Any, int]:
        """``(collate_fn(the good records), how many bad ones were dropped)``; see the class docstring."""
        collate = self.collate_fn[task] if isinstance(self.collate_fn, Mapping) else self.collate_fn
        if collate is None:
            return records, 0
        if not self.skip_bad:
            return collate(records), 0
        errors = _data_errors()
        try:
            return collate(records), 0
        except errors:
            pass  # find the bad rows below; the common, clean batch pays for one collate only
        good, bad = [], []
        for record in records:
            try:
                collate([record])
            except errors as e:
                bad.append(e)
                log.warning("dropped a bad row from micro-batch %d (task %r): %s", step, task, e)
            else:
                good.append(record)
        if not good:
            raise ValueError(
                f"every row of micro-batch {step} (task {task!r}, {len(records)} rows) is bad; first error: {bad[0]}"
            ) from bad[0]
        return collate(good), len(bad)


class TaskLoader:
    """Batches of ``sampler`` over ``tasks`` (collated by ``collate_fn``, or per task, see `TaskBatches`), resumable.

    ``state_dict()`` is the sampler state after the last batch ``steps`` yielded (before any:
    the sampler's own) plus ``grad_accum_steps``, ``identity`` and ``bad_rows``: plain Python
    types. ``load_state_dict`` sets where the next ``steps`` starts; it refuses (``ValueError``,
    naming both) a state saved with another ``grad_accum_steps`` or another ``identity`` (a
    JSON-able description of the data, e.g. ``{"train": file_fingerprint(path)}``; keys named
    ``"file"`` are labels and not compared, so a moved or renamed copy resumes). States without
    those keys (older) load. ``seed`` seeds the DataLoader's own generator, so creating its
    iterator never draws from the global RNG (a resumed run would otherwise replay other dropout
    masks than the uninterrupted one). ``skip_bad``: see `TaskBatches`; ``bad_rows`` counts the
    rows dropped on this rank. ``read_skipped``: rows the file reader skipped (reported only).
    """

    def __init__(
        self,
        tasks: Mapping[str, Sequence[Any]],
        sampler: WeightedTaskSampler,
        collate_fn: Collate | Mapping[str, Collate] | None = None,
        num_workers: int = 0,
        seed: int = 0,
        grad_accum_steps: int = 1,
        *,
        identity: Mapping[str, Any] | None = None,
        skip_bad: bool = False,
        read_skipped: int = 0,
    ) -> None:
        if grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
        _check_collates(collate_fn, sampler)
        self.tasks, self.sampler, self.collate_fn = tasks, sampler, collate_fn
        self.num_workers, self.seed, self.accum = num_workers, seed, grad_accum_steps
        # Round-tripped through JSON: plain types (weights_only loads) that compare equal to a loaded copy.
        self.identity = None if identity is None else json.loads(json.dumps(identity))
        self.skip_bad, self.read_skipped, self.bad_shards = skip_bad, int(read_skipped), 0
        self._state = self._with_run(sampler.state_dict(), 0)
        self.step_rows = 0  # rows of the last step yielded, all ranks and micro-batches (may vary)

    def _with_run(self, sampler_state: Mapping[str, Any], bad_rows: int) -> dict[str, Any]:
        return {**sampler_state, "grad_accum_steps": self.accum, "identity": self.identity, "bad_rows": bad_rows}

    @property
    def step(self) -> int:
        """Optimizer steps done: the next is ``self.step + 1`` (sampler steps / ``grad_accum_steps``)."""
        return int(self._state["step"]) // self.accum

    @property
    def bad_rows(self) -> int:
        """Rows this rank dropped as bad (``skip_bad``) so far, as of the last step yielded."""
        return int(self._state["bad_rows"])

    def state_dict(self) -> dict[str, Any]:
        return self._state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        _check_same_data(state.get("identity"), self.identity)
        _check_same_accum(state, self.accum)
        self.sampler.load_state_dict(state)
        self._state = self._with_run(self.sampler.state_dict(), int(state.get("bad_rows", 0)))

    def steps(self, end: int) -> Iterator[tuple[int, list[Any], list[str]]]:
        """``(step, micro_batches, their_streams)`` for optimizer steps ``self.step + 1 .. end`` (1-based).

        A stream is the micro-batch's task, or ``task/group`` when the sampler draws groups."""
        _check_same_draws(self.sampler)
        if int(self._state["step"]) % self.accum:
            raise ValueError(
                f"sampler state at step {self._state['step']} is not a multiple of {self.accum} micro-steps"
            )
        self.sampler.load_state_dict(self._state)
        micro = TaskBatches(
            self.tasks, self.sampler, self.collate_fn, max(0, end - self.step) * self.accum, skip_bad=self.skip_bad
        )
        generator = torch.Generator().manual_seed(self.seed)
        loader = DataLoader(micro, batch_size=None, num_workers=self.num_workers, generator=generator)
        batches, tasks, bad, rows = [], [], self.bad_rows, 0
        for item in loader:
            batches.append(item["batch"])
            tasks.append(item["stream"])
            bad, rows = bad + item["bad_rows"], rows + item["global_rows"]
            if len(batches) == self.accum:
                self._state, self.step_rows = self._with_run(item["sampler_state"], bad), rows
                yield (item["step"] + 1) // self.accum, batches, tasks
                batches, tasks, rows = [], [], 0


def _comparable(value: Any) -> Any:
    """``value`` without its ``"file"`` keys (at any depth): a file's name labels its data, it is not the data."""
    if isinstance(value, Mapping):
        return {k: _comparable(v) for k, v in value.items() if k != "file"}
    if isinstance(value, (list, tuple)):
        return [_comparable(v) for v in value]
    return value


def _check_collates(collate_fn: Any, sampler: WeightedTaskSampler) -> None:
    """``ValueError`` naming the drawn tasks a per-task ``collate_fn`` mapping lacks."""
    missing = sorted(set(sampler.tasks) - set(collate_fn)) if isinstance(collate_fn, Mapping) else []
    if missing:
        raise ValueError(f"collate_fn has no function for drawn tasks {missing}")


def _check_same_data(saved: Mapping[str, Any] | None, now: Mapping[str, Any] | None) -> None:
    """``ValueError`` naming, per key, the saved and the current identity when their data differ."""
    if saved is None or now is None or _comparable(saved) == _comparable(now):
        return
    diffs = [
        f"{key}: saved {saved.get(key)}, now {now.get(key)}"
        for key in sorted(set(saved) | set(now))
        if _comparable(saved.get(key)) != _comparable(now.get(key))
    ]
    raise ValueError(
        "the training data differs from the checkpoint's (" + "; ".join(diffs) + "): resume with the data the "
        "checkpoint was trained on (a moved or renamed copy is fine) or start a new run"
    )


def _check_same_accum(state: Mapping[str, Any], accum: int) -> None:
    """``ValueError`` when ``state`` was saved with another ``grad_accum_steps`` (its steps would be relabelled)."""
    saved = state.get("grad_accum_steps")
    if saved is None or int(saved) == accum:
        return
    micro = int(state["step"])
    raise ValueError(
        f"the checkpoint was saved with grad_accum_steps={saved} (optimizer step {micro // int(saved)} = {micro} "
        f"micro-batches); this run has grad_accum_steps={accum}, which would call that step {micro / accum:g} "
        f"and change the batch of every later step: resume with --grad-accum-steps {saved}"
    )


def file_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """``{"file": base name, "bytes": size, "blake2b": 32 hex digits}`` of a whole file.

    blake2b (16-byte digest) over the whole content, read in 8 MB blocks, so a file edited in place
    differs even at the same length. Costs about 2.8 s per GB (page cache warm; 2.3 s of it hashing)
    on a 2-core shared CPU, once per rank at start-up.
    `TaskLoader` compares identities without ``"file"``: a moved or renamed copy resumes.
    """
    digest, size = hashlib.blake2b(digest_size=16), 0
    buffer = bytearray(8 << 20)
    view = memoryview(buffer)
    with open(path, "rb") as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
            size += n
    return {"file": os.path.basename(os.fspath(path)), "bytes": size, "blake2b": digest.hexdigest()}


def _check_same_draws(sampler: WeightedTaskSampler) -> None:
    """``ValueError`` naming the ranks whose samplers would draw other tasks than rank 0's (e.g. a seed + rank)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, sampler.draw_spec())
    odd = [r for r, other in enumerate(everyone) if other != everyone[0]]
    if odd:
        raise ValueError(
            f"ranks {odd} would draw other tasks than rank 0: their samplers differ (seed, global batch, tasks, "
            f"weights or groups: {everyone[odd[0]]} vs {everyone[0]}); give every rank the same ones"
        )


def task_loader(
    tasks: Mapping[str, Sequence[Any]],
    collate: Collate | Mapping[str, Collate],
    *,
    batch_size: int | Mapping[str, int],
    seed: int,
    rank: int,
    world_size: int,
    num_workers: int = 2,
    grad_accum_steps: int = 1,
    identity: Mapping[str, Any] | None = None,
    skip_bad: bool = False,
    read_skipped: int = 0,
    token_budget: int | None = None,
    lengths: Sequence[int] | None = None,
    **sampler_options: Any,
) -> tuple[TaskLoader, int]:
    """``(TaskLoader, rows per epoch)`` over ``tasks`` (name -> rows): ``batch_size`` rows per rank (or per task), the
    sampler and DataLoader seeded with ``seed``. ``sampler_options`` go to `WeightedTaskSampler`
    (``weights``, ``group_of``, ``group_weights``); ``identity``, ``skip_bad``, ``read_skipped`` to
    `TaskLoader`; rows per epoch counts the tasks it can draw. ``token_budget`` (one task, ``lengths[i]``:
    row ``i``'s tokens) uses `length_batches.TokenBudgetSampler` instead: ``batch_size`` is then unused."""
    sizes = {name: len(rows) for name, rows in tasks.items()}
    ids = dict(seed=seed, rank=rank, world_size=world_size)
    if token_budget is None:
        sampler = WeightedTaskSampler(sizes, batch_size, **ids, **sampler_options)
    else:  # one task; batch_size is unused
        from .length_batches import budget_sampler

        sampler = budget_sampler(tasks, lengths, token_budget, **ids, **sampler_options)
    run = dict(identity=identity, skip_bad=skip_bad, read_skipped=read_skipped)
    loader = TaskLoader(tasks, sampler, collate, num_workers, seed, grad_accum_steps, **run)
    return loader, sum(sizes[name] for name in sampler.tasks)


def training_batches(
    path: str,
    collate: Callable[[list], Any],
    *,
    batch_size: int,
    seed: int,
    rank: int,
    world_size: int,
    num_workers: int = 2,
    grad_accum_steps: int = 1,
    max_steps: int | None = None,
    format: str | None = None,
    skip_bad: bool = False,
    max_bad_fraction: float = 0.01,
    skip_bad_shards: bool = False,
    columns: Mapping[str, str] | None = None,
    delimiter: str | None = None,
    allow_mixed: bool = False,
    token_budget: int | None = None,
    row_length: Callable[[list], Sequence[int]] | None = None,
) -> tuple[Any, int]:
    """``(loader, rows per epoch)`` for a training path: sharded sets stream, a file is one task.

    Shards (a brace pattern such as ``data/{00000..00099}.tar``, a glob, a folder of shards, see
    `shards.is_stream_spec`) become a `StreamLoader` (nothing read before step 1 but, for a folder or
    glob, the first rows of its files: logged one line per file and refused when some file is named like
    a validation split or the row formats differ, unless ``allow_mixed``; its length is unknown, so
    ``max_steps`` is required and rows is 0; ``skip_bad_shards`` skips unreadable shards); a file is read
    with ``load_records``' reader into `task_loader`: ``skip_bad`` skips bad rows (refused when more than
    ``max_bad_fraction`` of the rows are bad; the count is ``loader.read_skipped``) and drops rows whose
    images fail in ``collate`` (``loader.bad_rows``). ``columns`` (canonical field -> the file's column,
    `columns.parse_columns`) and ``format`` apply to both, ``delimiter`` to a CSV file. The file's identity
    (`file_fingerprint` and its record count) goes into the state, so a resume on other data is refused.
    Both give the same ``steps`` / ``state_dict`` interface. ``token_budget`` (a file only; `task_loader`):
    ``row_length(records)`` gives each row's tokens, e.g. `length_batches.lengths_for(collator)`.
    """
    from ..user_errors import UserError
    from .row_files import read_file
    from .shards import is_stream_spec, open_stream

    options = dict(batch_size=batch_size, seed=seed, rank=rank, world_size=world_size, num_workers=num_workers)
    options["grad_accum_steps"] = grad_accum_steps
    if not is_stream_spec(path):
        path = os.fspath(path)
        records, reader = read_file(
            path, skip_bad, max_bad_fraction, format=format, columns=columns, delimiter=delimiter
        )
        if reader.one_label is not None and len(records) > 1:  # same label = not a negative: none are left
            warnings.warn(
                f"{path}: every row has label {reader.one_label!r} and none has negatives; rows with the same label "
                "are not negatives of each other, so a contrastive loss has nothing to contrast (drop the labels?)",
                stacklevel=2,
            )
        identity = {"train": {**file_fingerprint(path), "rows": len(records)}}
        run = dict(identity=identity, skip_bad=skip_bad, read_skipped=reader.skipped, token_budget=token_budget)
        run["lengths"] = row_length(records) if token_budget is not None and row_length is not None else None
        return task_loader({"train": records}, collate, **options, **run)
    if token_budget is not None:
        raise UserError(f"{path} names shards, which stream: a token budget needs a training file's lengths up front")
    # The folder is checked (and its files logged) before the --max-steps error: both are fixed at once.
    stream = dict(format=format, columns=columns, allow_mixed=allow_mixed, skip_bad_shards=skip_bad_shards)
    loader = open_stream(path, collate_fn=collate, **stream, **options)
    if not max_steps:
        raise UserError(f"{path} names shards, whose length is not known up front: give max_steps (--max-steps)")
    return loader, 0
