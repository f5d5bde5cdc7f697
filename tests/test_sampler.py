"""WeightedTaskSampler: task frequencies, cross-rank agreement, exact resume, groups, DataLoader workers."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
import torch

from vembed_blocks.data.loader import TaskBatches
from vembed_blocks.data.records import IndexedRecords
from vembed_blocks.data.row_files import load_task_dir
from vembed_blocks.data.sampler import (
    WeightedTaskSampler,
    _Stream,
    parse_group_weights,
    parse_weights,
)

SIZES = {"a": 1000, "b": 300, "c": 50}


def test_task_frequencies_match_weights():
    weights = {"a": 0.5, "b": 1.2, "c": 1.0}
    s = WeightedTaskSampler(SIZES, batch_size=4, weights=weights, seed=7, rank=0, world_size=1)
    steps = 20_000
    counts = Counter(next(s)[0] for _ in range(steps))
    total = sum(weights.values())
    for task, w in weights.items():
        share = w / total  # a: 0.185, b: 0.444, c: 0.370
        assert abs(counts[task] / steps - share) < 0.02, (task, counts[task] / steps, share)
        assert abs(counts[task] / steps - share) / share < 0.05


def test_default_weights_are_task_sizes():
    s = WeightedTaskSampler(SIZES, batch_size=2, rank=0, world_size=1)
    counts = Counter(next(s)[0] for _ in range(20_000))
    assert abs(counts["a"] / 20_000 - 1000 / 1350) < 0.02


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ranks_agree_on_task_and_get_disjoint_rows(world):
    bs = 8
    ranks = [
        WeightedTaskSampler(SIZES, bs, {"a": 1, "b": 1, "c": 1}, seed=3, rank=r, world_size=world) for r in range(world)
    ]
    checked = 0
    for _ in range(300):
        before = ranks[0].state_dict()["streams"]
        draws = [next(s) for s in ranks]
        task = draws[0][0]
        assert all(t == task and len(idx) == bs for t, idx in draws)
        rows = [i for _, idx in draws for i in idx]
        assert all(0 <= i < SIZES[task] for i in rows)
        if before[task][1] + bs * world <= SIZES[task]:  # the global batch lies inside one pass
            assert len(set(rows)) == bs * world
            checked += 1
    assert checked > 150


def test_disjoint_within_a_pass():
    world, bs = 4, 8
    ranks = [WeightedTaskSampler({"x": 96}, bs, seed=1, rank=r, world_size=world) for r in range(world)]
    # 96 rows / 32 per global batch = 3 steps per pass: every pass covers all rows exactly once.
    for _ in range(2):
        rows = []
        for _ in range(3):
            step_rows = [i for s in ranks for i in next(s)[1]]
            assert len(set(step_rows)) == world * bs
            rows += step_rows
        assert sorted(rows) == list(range(96))


def test_passes_reshuffle_and_large_tasks_are_not_exhausted():
    s = WeightedTaskSampler({"x": 10}, 5, seed=0, rank=0, world_size=1)
    p1 = next(s)[1] + next(s)[1]
    p2 = next(s)[1] + next(s)[1]
    assert sorted(p1) == sorted(p2) == list(range(10)) and p1 != p2
    big = WeightedTaskSampler({"big": 10**9}, 4, seed=0, rank=0, world_size=1)
    assert len(next(big)[1]) == 4  # no O(n) work until a pass is actually walked...
    state = big.state_dict()
    assert state["streams"] == {"big": [0, 4]}


def test_resume_reproduces_the_uninterrupted_stream():
    kw = dict(task_sizes=SIZES, batch_size=4, weights={"a": 1, "b": 2, "c": 3}, seed=11, world_size=2)
    full = WeightedTaskSampler(rank=1, **kw)
    stream = [next(full) for _ in range(400)]
    part = WeightedTaskSampler(rank=1, **kw)
    for _ in range(137):
        next(part)
    state = json.loads(json.dumps(part.state_dict()))  # survives a JSON checkpoint
    resumed = WeightedTaskSampler(rank=1, **kw)
    resumed.load_state_dict(state)
    assert [next(resumed) for _ in range(400 - 137)] == stream[137:]
    # Same global batch on a different world size resumes too; a different global batch refuses.
    other = WeightedTaskSampler(SIZES, 8, {"a": 1, "b": 2, "c": 3}, seed=11, rank=0, world_size=1)
    other.load_state_dict(state)
    with pytest.raises(ValueError, match="global batch"):
        WeightedTaskSampler(SIZES, 4, {"a": 1, "b": 2, "c": 3}, seed=11, rank=0, world_size=1).load_state_dict(state)


def test_resume_refuses_a_task_or_group_of_another_size():
    saved = WeightedTaskSampler({"train": 1000}, 4, seed=0, rank=0, world_size=1)
    next(saved)
    state = json.loads(json.dumps(saved.state_dict()))
    assert state["sizes"] == {"train": 1000}
    with pytest.raises(ValueError, match="task 'train' had 1000 rows when the checkpoint was saved, now 1003"):
        WeightedTaskSampler({"train": 1003}, 4, seed=0, rank=0, world_size=1).load_state_dict(state)
    older = WeightedTaskSampler({"train": 1003}, 4, seed=0, rank=0, world_size=1)
    older.load_state_dict({k: v for k, v in state.items() if k != "sizes"})  # a state from before sizes: no check
    assert older.step == 1
    # a row moved between groups keeps the task's size but not its groups'
    grouped = WeightedTaskSampler({"e": 6}, 2, seed=0, rank=0, world_size=1, group_of={"e": [0, 0, 0, 1, 1, 1]})
    other = WeightedTaskSampler({"e": 6}, 2, seed=0, rank=0, world_size=1, group_of={"e": [0, 0, 1, 1, 1, 1]})
    with pytest.raises(ValueError, match="stream 'e/0' had 3 rows when the checkpoint was saved, now 2"):
        other.load_state_dict(grouped.state_dict())


def test_group_weights():
    groups = [0] * 40 + [1] * 40 + [2] * 20 + [3] * 10  # e.g. number of source images per row
    s = WeightedTaskSampler(
        {"edit": 110, "t2i": 30},
        2,
        {"edit": 1, "t2i": 1},
        seed=5,
        rank=0,
        world_size=1,
        group_of={"edit": groups},
        group_weights=parse_group_weights("0=1,1=1,2=2,3=0"),
    )
    by_group = Counter()
    for _ in range(20_000):
        task, idx = next(s)
        if task == "edit":
            g = {groups[i] for i in idx}
            assert len(g) == 1  # a batch never mixes groups
            by_group[g.pop()] += 1
    n = sum(by_group.values())
    assert by_group[3] == 0
    for g, share in ((0, 0.25), (1, 0.25), (2, 0.5)):
        assert abs(by_group[g] / n - share) < 0.02, (g, by_group[g] / n)


def test_impossible_configurations_raise():
    with pytest.raises(ValueError, match="sum to zero"):
        WeightedTaskSampler(SIZES, 2, {"a": 0, "b": 0, "c": 0}, rank=0, world_size=1)
    with pytest.raises(ValueError, match="unknown tasks"):
        WeightedTaskSampler(SIZES, 2, {"a": 1, "zz": 1}, rank=0, world_size=1)
    with pytest.raises(ValueError, match="no rows"):
        WeightedTaskSampler({"a": 0}, 2, {"a": 1}, rank=0, world_size=1)
    with pytest.warns(UserWarning, match=r"excluded from sampling: \['b', 'c'\]"):
        s = WeightedTaskSampler(SIZES, 2, {"a": 1}, rank=0, world_size=1)
    assert {next(s)[0] for _ in range(50)} == {"a"}
    with pytest.raises(ValueError, match="none of its groups"):
        WeightedTaskSampler(
            {"e": 4}, 2, {"e": 1}, rank=0, world_size=1, group_of={"e": [3, 3, 3, 3]}, group_weights={3: 0, 1: 1}
        )
    with pytest.raises(ValueError, match="4 rows"):
        WeightedTaskSampler({"e": 4}, 2, {"e": 1}, rank=0, world_size=1, group_of={"e": [1]})


def test_weighted_group_that_no_task_has_warns_and_is_never_drawn():
    groups = [0, 0, 1, 1, 1, 3, 3, 3]  # seed-004 default weights on data without 2-source rows
    with pytest.warns(UserWarning, match=r"groups \['2'\] have weight but no rows in any sampled task"):
        s = WeightedTaskSampler(
            {"edit": 8},
            2,
            {"edit": 1},
            seed=4,
            rank=0,
            world_size=1,
            group_of={"edit": groups},
            group_weights=parse_group_weights("0=1,1=1,2=1,3=0"),
        )
    drawn = Counter()
    for _ in range(400):
        task, idx = next(s)
        g = {groups[i] for i in idx}
        assert task == "edit" and len(g) == 1
        drawn[g.pop()] += 1
    assert set(drawn) == {0, 1} and abs(drawn[0] - drawn[1]) < 80  # weight 1 each; 3 has weight 0
    with pytest.warns(UserWarning, match=r"groups \['5'\] have weight but no rows"):
        WeightedTaskSampler(
            {"e": 4}, 2, {"e": 1}, rank=0, world_size=1, group_of={"e": [1, 1, 2, 2]}, group_weights={1: 1, 2: 1, 5: 1}
        )


def _global_batches(ranks: list[WeightedTaskSampler], steps: int) -> list[tuple[str, list[int]]]:
    """(task, global batch) per step: the ranks' rows concatenated in rank order."""
    out = []
    for _ in range(steps):
        draws = [next(s) for s in ranks]
        assert len({task for task, _ in draws}) == 1
        out.append((draws[0][0], [i for _, idx in draws for i in idx]))
    return out


def _assert_passes_use_every_row_once(stream: list[int], rows: list[int]) -> None:
    n = len(rows)
    assert len(stream) >= 2 * n
    for p in range(len(stream) // n):
        assert Counter(stream[p * n : (p + 1) * n]) == Counter(rows), p


def test_no_row_twice_in_a_global_batch_across_passes():
    # 1,000 rows, 128 per step: 1000 % 128 != 0, so a batch straddles most pass boundaries.
    world, bs = 4, 32
    ranks = [WeightedTaskSampler({"a": 1000}, bs, seed=0, rank=r, world_size=world) for r in range(world)]
    batches = _global_batches(ranks, 450)
    dup = [k for k, (_, rows) in enumerate(batches) if len(set(rows)) != len(rows)]
    assert dup == [] and all(len(rows) == 128 for _, rows in batches)
    _assert_passes_use_every_row_once([i for _, rows in batches for i in rows], list(range(1000)))


def test_no_row_twice_with_groups_and_tasks_near_the_global_batch():
    world, bs = 4, 8  # global batch 32
    group_sizes = {0: 200, 1: 33, 2: 63, 3: 64}  # 33 = G + 1, 63 = 2G - 1, 64 = 2G
    labels = [g for g, n in group_sizes.items() for _ in range(n)]
    random.Random(0).shuffle(labels)
    sizes = {"exact": 32, "plus1": 33, "mid": 50, "big": 1000, "edit": len(labels)}
    weights = {"exact": 1, "plus1": 2, "mid": 1, "big": 1, "edit": 3}
    kw = dict(seed=9, world_size=world, group_of={"edit": labels}, group_weights={0: 1, 1: 2, 2: 1, 3: 1})
    ranks = [WeightedTaskSampler(sizes, bs, weights, rank=r, **kw) for r in range(world)]
    streams: dict[tuple[str, int | None], list[int]] = {}
    for task, rows in _global_batches(ranks, 2500):
        assert len(set(rows)) == len(rows) == world * bs, task
        group = None
        if task == "edit":
            (group,) = {labels[i] for i in rows}
        streams.setdefault((task, group), []).extend(rows)
    assert len(streams) == 8
    for (task, group), stream in streams.items():
        members = list(range(sizes[task])) if group is None else [i for i, g in enumerate(labels) if g == group]
        _assert_passes_use_every_row_once(stream, members)


class _LazyStream(_Stream):
    _CACHE_ROWS = 100  # walk 1,000 rows the way a >2^20-row stream is walked: no pass in memory


def test_big_streams_move_only_a_prefix_and_match_small_ones():
    lazy, full = _LazyStream(1000, None, (5, 6), 128), _Stream(1000, None, (5, 6), 128)
    assert lazy._lazy and not full._lazy
    batches = [lazy.take().tolist() for _ in range(80)]  # 10 passes
    assert all(len(set(b)) == 128 for b in batches)
    _assert_passes_use_every_row_once([i for b in batches for i in b], list(range(1000)))
    assert batches == [full.take().tolist() for _ in range(80)]


def test_resume_at_and_around_pass_boundaries():
    world, bs, steps = 4, 32, 500
    sizes = {"a": 1000, "m": 150, "p": 129}  # 150 and 129 < 2 * 128: tails nest over passes

    def make() -> list[WeightedTaskSampler]:
        weights = {"a": 1, "m": 1, "p": 1}
        return [WeightedTaskSampler(sizes, bs, weights, seed=3, rank=r, world_size=world) for r in range(world)]

    ranks = make()
    states, batches, straddling = [], [], []
    for k in range(steps):
        key = ranks[0].draw(k)[1]
        if ranks[0].state_dict()["streams"][key][1] + world * bs > sizes[key]:  # cursor offset
            straddling.append(k)
        batches += _global_batches(ranks, 1)
        states.append(json.loads(json.dumps(ranks[0].state_dict())))  # state after step k
    assert all(len(set(rows)) == len(rows) for _, rows in batches)
    assert len(straddling) > 100
    points = {1, 2, 7, 250}  # mid-pass; then resume 2 steps before, right before, right after a straddling step
    for k in straddling[:12] + straddling[-4:]:
        points |= {k - 2, k - 1, k}
    for j in sorted(p for p in points if 0 <= p < steps - 1):  # resume after step j
        resumed = make()
        for s in resumed:
            s.load_state_dict(states[j])
        end = steps if j == 250 else min(steps, j + 1 + 40)
        assert _global_batches(resumed, end - j - 1) == batches[j + 1 : end], j


def test_parsers():
    assert parse_weights("dataset_a=0.5, dataset_b=1.2,dataset_c=1") == {
        "dataset_a": 0.5,
        "dataset_b": 1.2,
        "dataset_c": 1.0,
    }
    assert parse_group_weights("0=1,1=1,2=1,3=0") == {0: 1.0, 1: 1.0, 2: 1.0, 3: 0.0}
    for bad, msg in [
        ("", "empty"),
        ("a=1,", "expected name=weight"),
        ("a", "expected name=weight"),
        ("=1", "expected name=weight"),
        ("a=x", "not a number"),
        ("a=-1", ">= 0"),
        ("a=nan", "finite"),
        ("a=1,a=2", "duplicate"),
    ]:
        with pytest.raises(ValueError, match=msg):
            parse_weights(bad)
    with pytest.raises(ValueError, match="must be an integer"):
        parse_group_weights("one=1")


def _task_dir(tmp_path):
    for task, n in (("alpha", 23), ("beta", 9)):
        (tmp_path / task).mkdir()
        rows = [json.dumps({"query": f"{task} q{i}", "positive": f"{task} p{i}"}) for i in range(n)]
        (tmp_path / task / "train.jsonl").write_text("\n".join(rows) + "\n")
    return load_task_dir(tmp_path)


def _texts(records):
    return [r.query.text for r in records]


def test_dataloader_workers_give_the_same_batches(tmp_path):
    tasks = _task_dir(tmp_path)
    assert isinstance(tasks["alpha"], IndexedRecords) and len(tasks["alpha"]) == 23
    assert tasks["beta"][4].query.text == "beta q4" and tasks["beta"][4].task == "beta"
    sampler = WeightedTaskSampler(
        {k: len(v) for k, v in tasks.items()}, 3, {"alpha": 2, "beta": 1}, seed=2, rank=1, world_size=2
    )
    runs = {}
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(
            TaskBatches(tasks, sampler, _texts, steps=12), batch_size=None, num_workers=workers
        )
        runs[workers] = [(b["step"], b["task"], b["batch"]) for b in loader]
    assert runs[0] == runs[2] and [s for s, _, _ in runs[0]] == list(range(12))
    expected = [(task, [f"{task} q{i}" for i in idx]) for task, idx in (next(sampler) for _ in range(12))]
    assert [(t, b) for _, t, b in runs[0]] == expected
    # Resume from the state carried by batch 5: the rest of the stream is the same.
    sampler = WeightedTaskSampler(
        {k: len(v) for k, v in tasks.items()}, 3, {"alpha": 2, "beta": 1}, seed=2, rank=1, world_size=2
    )
    loader = torch.utils.data.DataLoader(TaskBatches(tasks, sampler, _texts, steps=12), batch_size=None)
    state = [b["sampler_state"] for b in loader][5]
    tail = [(b["step"], b["task"], b["batch"]) for b in TaskBatches(tasks, sampler, _texts, steps=6, state=state)]
    assert tail == runs[0][6:]
