"""Per-task batch sizes in WeightedTaskSampler, and a per-task collate in TaskBatches / TaskLoader."""

from __future__ import annotations

import json
from functools import partial

import pytest

from vembed_blocks.data import TaskLoader, WeightedTaskSampler
from vembed_blocks.data.loader import TaskBatches, task_loader
from vembed_blocks.data.records import RecordError

BS = {"a": 3, "b": 5}  # rows per rank
WEIGHTS = {"a": 1.0, "b": 2.0}


def ranks(sizes: dict[str, int], world: int, bs=BS, seed: int = 11) -> list[WeightedTaskSampler]:
    return [WeightedTaskSampler(sizes, bs, WEIGHTS, seed=seed, rank=r, world_size=world) for r in range(world)]


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("sizes", [{"a": 36, "b": 60}, {"a": 31, "b": 47}])  # whole passes / straddling batches
def test_each_task_takes_its_own_batch_on_every_rank(world, sizes):
    samplers = ranks(sizes, world)
    stream = {"a": [], "b": []}  # each task's global batches, concatenated in draw order
    for _ in range(200):
        draws = [next(s) for s in samplers]
        task = draws[0][0]
        assert all(t == task for t, _ in draws)
        assert all(len(rows) == BS[task] for _, rows in draws)
        union = [i for _, rows in draws for i in rows]
        assert len(union) == len(set(union)) == BS[task] * world  # disjoint slices, no row twice in the batch
        assert all(0 <= i < sizes[task] for i in union)
        assert all(s.drawn_rows == BS[task] * world for s in samplers)
        stream[task] += union
    for task, rows in stream.items():
        passes = len(rows) // sizes[task]
        assert passes >= 2, (task, passes)
        for p in range(passes):  # pass p: every row of the task exactly once
            assert sorted(rows[p * sizes[task] : (p + 1) * sizes[task]]) == list(range(sizes[task]))


def test_task_draws_do_not_depend_on_batch_sizes():
    sizes = {"a": 40, "b": 70}
    per_task = WeightedTaskSampler(sizes, BS, WEIGHTS, seed=5, rank=0, world_size=2)
    one = WeightedTaskSampler(sizes, 4, WEIGHTS, seed=5, rank=0, world_size=2)
    assert [next(per_task)[0] for _ in range(300)] == [next(one)[0] for _ in range(300)]


def test_state_records_per_task_batches_and_resumes_exactly():
    sizes = {"a": 31, "b": 47}
    whole = ranks(sizes, 2)
    for _ in range(23):
        for s in whole:
            next(s)
    states = [s.state_dict() for s in whole]
    assert states[0]["global_batch"] == {"a": 6, "b": 10}
    expected = [[next(s) for _ in range(40)] for s in whole]
    for r, state in enumerate(states):
        for saved in (state, json.loads(json.dumps(state))):
            fresh = ranks(sizes, 2)[r]
            fresh.load_state_dict(saved)
            assert [next(fresh) for _ in range(40)] == expected[r]


def test_a_state_of_other_batches_is_refused():
    sizes = {"a": 31, "b": 47}
    state = ranks(sizes, 1)[0].state_dict()
    with pytest.raises(ValueError, match="'b' had global batch 5 .* now 6"):
        WeightedTaskSampler(sizes, {"a": 3, "b": 6}, WEIGHTS, seed=11, rank=0, world_size=1).load_state_dict(state)
    int_state = WeightedTaskSampler(sizes, 3, WEIGHTS, seed=11, rank=0, world_size=1).state_dict()
    with pytest.raises(ValueError, match="global batch 3"):
        ranks(sizes, 1)[0].load_state_dict(int_state)
    with pytest.raises(ValueError, match="global batch"):
        WeightedTaskSampler(sizes, 3, WEIGHTS, seed=11, rank=0, world_size=1).load_state_dict(state)


def test_same_per_task_global_batches_resume_on_another_world_size():
    sizes = {"a": 31, "b": 47}
    two = ranks(sizes, 2)
    for _ in range(7):
        for s in two:
            next(s)
    one = WeightedTaskSampler(sizes, {"a": 6, "b": 10}, WEIGHTS, seed=11, rank=0, world_size=1)  # 3 * 2, 5 * 2
    one.load_state_dict(two[0].state_dict())
    for _ in range(30):
        (task, r0), (_, r1) = next(two[0]), next(two[1])
        assert next(one) == (task, r0 + r1)


def test_bad_per_task_batch_sizes_are_refused_naming_the_task():
    sizes = {"a": 31, "b": 47, "c": 9}
    weights = {"a": 1.0, "b": 1.0}  # c is not drawn: it needs no batch size
    with pytest.warns(UserWarning, match="excluded"):
        s = WeightedTaskSampler(sizes, {"a": 2, "b": 4}, weights, rank=0, world_size=1)
    assert s.batch_size == {"a": 2, "b": 4} and s.global_batch == {"a": 2, "b": 4}
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="'b'"):
        WeightedTaskSampler(sizes, {"a": 2}, weights, rank=0, world_size=1)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="'a'"):
        WeightedTaskSampler(sizes, {"a": 0, "b": 4}, weights, rank=0, world_size=1)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="unknown tasks \\['d'\\]"):
        WeightedTaskSampler(sizes, {"a": 2, "b": 4, "d": 1}, weights, rank=0, world_size=1)


def test_small_streams_are_warned_against_their_own_task_batch():
    with pytest.warns(UserWarning, match=r"smaller than the global batch of their task .*\['b'\]"):
        WeightedTaskSampler({"a": 6, "b": 9}, {"a": 3, "b": 5}, rank=0, world_size=2)  # a: 6 >= 6, b: 9 < 10


def test_int_batch_size_keeps_the_old_state_and_spec():
    s = WeightedTaskSampler({"a": 31, "b": 47}, 4, WEIGHTS, seed=11, rank=1, world_size=2)
    state = s.state_dict()
    assert set(state) == {"step", "seed", "global_batch", "streams", "sizes"}
    assert type(state["global_batch"]) is int and state["global_batch"] == 8
    assert s.batch_size == 4 and s.global_batch == 8 and s.drawn_rows == 8
    assert s.draw_spec().startswith("(11, 8, ['a', 'b'], ")
    per_task = WeightedTaskSampler({"a": 31, "b": 47}, {"a": 4, "b": 4}, WEIGHTS, seed=11, rank=1, world_size=2)
    assert per_task.draw_spec() != s.draw_spec()  # a per-task sampler never matches an int one's draws check


def test_draw_spec_tells_apart_other_per_task_batches():
    sizes = {"a": 31, "b": 47}
    spec = ranks(sizes, 2)[0].draw_spec()
    assert ranks(sizes, 2)[1].draw_spec() == spec  # ranks of one run agree
    assert ranks(sizes, 2, bs={"a": 3, "b": 6})[0].draw_spec() != spec


# --- TaskLoader with a collate per task

TASKS = {"a": [f"a{i}" for i in range(37)], "b": [f"b{i}" for i in range(23)]}
LOADER_BS = {"a": 2, "b": 3}


def tag(task: str, records: list) -> dict:
    return {"task": task, "rows": list(records)}


def strict_tag(task: str, records: list) -> dict:
    bad = [r for r in records if r in ("a5", "b7")]
    if bad:
        raise RecordError("rows.jsonl", f"bad row {bad[0]}")
    return tag(task, records)


def loader_sampler() -> WeightedTaskSampler:
    return WeightedTaskSampler({k: len(v) for k, v in TASKS.items()}, LOADER_BS, WEIGHTS, seed=3, rank=1, world_size=2)


def plain_micro_batches(n: int) -> list[dict]:
    """The reference: the sampler's draws looked up by hand, tagged with their task."""
    s = loader_sampler()
    return [{"task": task, "rows": [TASKS[task][i] for i in rows]} for task, rows in (next(s) for _ in range(n))]


@pytest.mark.parametrize("workers", [0, 2])
def test_each_micro_batch_is_collated_by_its_task_and_resumes(workers):
    collates = {t: partial(tag, t) for t in TASKS}
    loader = TaskLoader(TASKS, loader_sampler(), collates, num_workers=workers, grad_accum_steps=2)
    want = plain_micro_batches(20)
    got, saved = [], None
    for step, batches, streams in loader.steps(10):
        assert [b["task"] for b in batches] == streams  # each tagged by its own task's collate
        assert loader.step_rows == sum(LOADER_BS[t] * 2 for t in streams)  # both micro-batches, both ranks
        got += batches
        if step == 4:
            saved = json.loads(json.dumps(loader.state_dict()))
    assert got == want
    again = TaskLoader(TASKS, loader_sampler(), collates, num_workers=workers, grad_accum_steps=2)
    again.load_state_dict(saved)
    assert again.step == 4
    assert [b for _, batches, _ in again.steps(10) for b in batches] == want[8:]


def test_skip_bad_uses_the_task_collate_per_row():
    collates = {t: partial(strict_tag, t) for t in TASKS}
    loader = TaskLoader(TASKS, loader_sampler(), collates, skip_bad=True)
    want = plain_micro_batches(60)
    got = [b for _, batches, _ in loader.steps(60) for b in batches]
    assert got == [{"task": b["task"], "rows": [r for r in b["rows"] if r not in ("a5", "b7")]} for b in want]
    assert loader.bad_rows == sum(r in ("a5", "b7") for b in want for r in b["rows"]) > 0


def test_a_collate_mapping_missing_a_drawn_task_is_refused():
    with pytest.raises(ValueError, match=r"\['b'\]"):
        TaskLoader(TASKS, loader_sampler(), {"a": partial(tag, "a")})
    with pytest.raises(ValueError, match=r"\['b'\]"):
        TaskBatches(TASKS, loader_sampler(), {"a": partial(tag, "a")})
    with pytest.warns(UserWarning, match="excluded"):
        only_a = WeightedTaskSampler({"a": 37, "b": 23}, {"a": 2}, {"a": 1.0}, rank=0, world_size=1)
    loader = TaskLoader(TASKS, only_a, {"a": partial(tag, "a")})  # b is never drawn: it needs no collate
    assert [b[0]["task"] for _, b, _ in loader.steps(3)] == ["a"] * 3


def test_task_loader_passes_per_task_batches_through():
    collates = {t: partial(tag, t) for t in TASKS}
    loader, rows = task_loader(
        TASKS, collates, batch_size=LOADER_BS, seed=3, rank=1, world_size=2, num_workers=0, weights=WEIGHTS
    )
    assert rows == 37 + 23
    assert loader.sampler.batch_size == LOADER_BS and loader.sampler.global_batch == {"a": 4, "b": 6}
    ((_, batches, _),) = list(loader.steps(1))
    assert batches == plain_micro_batches(1)
