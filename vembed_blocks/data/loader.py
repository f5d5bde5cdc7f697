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

`task_loader` builds the sampler and the loader in one call; `training_batches` does the same for
a file, or streams a sharded set (`shards.open_stream`) behind the same ``steps`` / ``state_dict``.

Imports: torch, `data.sampler` (records and shards load inside `training_batches`).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch.utils.data import DataLoader

from .sampler import TaskBatches, WeightedTaskSampler

__all__ = ["TaskLoader", "task_loader", "training_batches"]


class TaskLoader:
    """Batches of ``sampler`` over ``tasks`` (collated by ``collate_fn``), resumable via ``state_dict``.

    ``state_dict()`` is the sampler state after the last batch ``steps`` yielded (before any:
    the sampler's own); ``load_state_dict`` sets where the next ``steps`` starts. ``seed``
    seeds the DataLoader's own generator, so creating its iterator never draws from the global
    RNG (a resumed run would otherwise replay other dropout masks than the uninterrupted one).
    """

    def __init__(
        self,
        tasks: Mapping[str, Sequence[Any]],
        sampler: WeightedTaskSampler,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        num_workers: int = 0,
        seed: int = 0,
        grad_accum_steps: int = 1,
    ) -> None:
        if grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
        self.tasks, self.sampler, self.collate_fn = tasks, sampler, collate_fn
        self.num_workers, self.seed, self.accum = num_workers, seed, grad_accum_steps
        self._state = sampler.state_dict()

    @property
    def step(self) -> int:
        """Optimizer steps done: the next is ``self.step + 1`` (sampler steps / ``grad_accum_steps``)."""
        return int(self._state["step"]) // self.accum

    def state_dict(self) -> dict[str, Any]:
        return self._state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.sampler.load_state_dict(state)
        self._state = self.sampler.state_dict()

    def steps(self, end: int) -> Iterator[tuple[int, list[Any], list[str]]]:
        """``(step, micro_batches, their_streams)`` for optimizer steps ``self.step + 1 .. end`` (1-based).

        A stream is the micro-batch's task, or ``task/group`` when the sampler draws groups."""
        _check_same_draws(self.sampler)
        if int(self._state["step"]) % self.accum:
            raise ValueError(
                f"sampler state at step {self._state['step']} is not a multiple of {self.accum} micro-steps"
            )
        self.sampler.load_state_dict(self._state)
        micro = TaskBatches(self.tasks, self.sampler, self.collate_fn, steps=max(0, end - self.step) * self.accum)
        generator = torch.Generator().manual_seed(self.seed)
        loader = DataLoader(micro, batch_size=None, num_workers=self.num_workers, generator=generator)
        batches, tasks = [], []
        for item in loader:
            batches.append(item["batch"])
            tasks.append(item["stream"])
            if len(batches) == self.accum:
                self._state = item["sampler_state"]
                yield (item["step"] + 1) // self.accum, batches, tasks
                batches, tasks = [], []


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
    collate: Callable[[list], Any],
    *,
    batch_size: int,
    seed: int,
    rank: int,
    world_size: int,
    num_workers: int = 2,
    grad_accum_steps: int = 1,
    **sampler_options: Any,
) -> tuple[TaskLoader, int]:
    """``(TaskLoader, rows per epoch)`` over ``tasks`` (name -> rows): ``batch_size`` rows per rank, the
    sampler and DataLoader seeded with ``seed``. ``sampler_options`` go to `WeightedTaskSampler`
    (``weights``, ``group_of``, ``group_weights``); rows per epoch counts the tasks it can draw."""
    sizes = {name: len(rows) for name, rows in tasks.items()}
    sampler = WeightedTaskSampler(sizes, batch_size, seed=seed, rank=rank, world_size=world_size, **sampler_options)
    loader = TaskLoader(tasks, sampler, collate, num_workers, seed, grad_accum_steps)
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
) -> tuple[Any, int]:
    """``(loader, rows per epoch)`` for a training path: sharded sets stream, a file is one task.

    Shards (a brace pattern such as ``data/{00000..00099}.tar``, a glob, a folder of shards, see
    `shards.is_stream_spec`) become a `StreamLoader` (nothing read before step 1; its length is
    unknown, so ``max_steps`` is required and rows is 0); anything else is read with
    ``load_records(path, format=format)`` into `task_loader`. Both give the same ``steps`` /
    ``state_dict`` interface, so a loop and its checkpoints do not change.
    """
    from .records import load_records
    from .shards import is_stream_spec, open_stream

    options = dict(seed=seed, rank=rank, world_size=world_size, num_workers=num_workers)
    if not is_stream_spec(path):
        tasks = {"train": load_records(path, format=format)}
        return task_loader(tasks, collate, batch_size=batch_size, grad_accum_steps=grad_accum_steps, **options)
    if not max_steps:
        raise ValueError(f"{path} names shards, whose length is not known up front: give max_steps (--max-steps)")
    return open_stream(path, batch_size, collate, grad_accum_steps=grad_accum_steps, **options), 0
