"""TaskLoader: the same batches for any worker count, and a resumed loader continues exactly."""

from __future__ import annotations

import json

import pytest
import torch

from vembed_blocks.checkpoint import load_checkpoint, save_checkpoint
from vembed_blocks.data import TaskLoader, WeightedTaskSampler

TASKS = {"a": [f"a{i}" for i in range(37)], "b": [f"b{i}" for i in range(23)]}


def sampler() -> WeightedTaskSampler:
    return WeightedTaskSampler({k: len(v) for k, v in TASKS.items()}, 4, weights={"a": 2.0, "b": 1.0}, seed=3)


def plain_draws(steps: int) -> list[tuple[int, str, list[str]]]:
    """The reference: the sampler's draws, looked up by hand."""
    s, out = sampler(), []
    for step in range(1, steps + 1):
        task, rows = next(s)
        out.append((step, task, [TASKS[task][i] for i in rows]))
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_same_batches_for_any_worker_count(workers):
    loader = TaskLoader(TASKS, sampler(), num_workers=workers, seed=0)
    assert loader.step == 0
    assert [(step, batches[0]) for step, batches, _ in loader.steps(12)] == [(s, b) for s, _, b in plain_draws(12)]
    assert loader.step == 12


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_through_a_checkpoint_continues_exactly(tmp_path, workers):
    """Resumed at an odd step (7) with 2 workers: worker 0 must build the first batch after the resume (the
    workers' share counted from step 0 swapped steps 8 and 9)."""
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = TaskLoader(TASKS, sampler(), num_workers=workers)
    got = []
    for step, (batch,), (task,) in first.steps(20):
        got.append((step, task, batch))
        if step == 7:
            save_checkpoint(str(tmp_path), model=model, optimizer=opt, step=step, sampler=first)
            break
    json.dumps(first.state_dict())  # a plain, JSON-able state
    second = TaskLoader(TASKS, sampler(), num_workers=workers)
    assert load_checkpoint(str(tmp_path), model=model, optimizer=opt, sampler=second) == 7 and second.step == 7
    got += [(step, tasks[0], batches[0]) for step, batches, tasks in second.steps(20)]
    assert got == plain_draws(20)


def test_accumulation_groups_consecutive_micro_batches():
    loader = TaskLoader(TASKS, sampler(), num_workers=2, grad_accum_steps=3)
    steps = list(loader.steps(4))
    flat = plain_draws(12)
    assert [s for s, _, _ in steps] == [1, 2, 3, 4] and loader.step == 4
    assert [b for _, batches, _ in steps for b in batches] == [b for _, _, b in flat]
    assert [t for _, _, tasks in steps for t in tasks] == [t for _, t, _ in flat]


def _ranks_with_seeds(rank: int, world_size: int) -> str:
    """Rank 1 seeds its sampler with seed + rank (a common slip): ``steps`` must refuse before any batch."""
    from vembed_blocks.data import TaskLoader, WeightedTaskSampler

    same = WeightedTaskSampler({"a": 37, "b": 23}, 4, seed=3, rank=rank, world_size=world_size)
    assert len(list(TaskLoader(TASKS, same).steps(2))) == 2  # equal samplers: no complaint
    odd = WeightedTaskSampler({"a": 37, "b": 23}, 4, seed=3 + rank, rank=rank, world_size=world_size)
    try:
        next(TaskLoader(TASKS, odd).steps(2))
    except ValueError as e:
        return str(e)
    return "no error"


def test_ranks_whose_samplers_differ_are_refused():
    from _multiproc import run_ranks

    for message in run_ranks(_ranks_with_seeds, 2, timeout=120):
        assert message.startswith("ranks [1] would draw other tasks than rank 0"), message
