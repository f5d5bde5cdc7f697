"""WeightedTaskSampler: task frequencies, cross-rank agreement, exact resume, groups, DataLoader workers."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from vembed_blocks.data.records import IndexedRecords
from vembed_blocks.data.sampler import TaskBatches, WeightedTaskSampler, load_task_dir, parse_group_weights, parse_weights

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
    ranks = [WeightedTaskSampler(SIZES, bs, {"a": 1, "b": 1, "c": 1}, seed=3, rank=r, world_size=world) for r in range(world)]
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


def test_group_weights():
    groups = [0] * 40 + [1] * 40 + [2] * 20 + [3] * 10  # e.g. number of source images per row
    s = WeightedTaskSampler({"edit": 110, "t2i": 30}, 2, {"edit": 1, "t2i": 1}, seed=5, rank=0, world_size=1,
                            group_of={"edit": groups}, group_weights=parse_group_weights("0=1,1=1,2=2,3=0"))  # fmt: skip
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
        WeightedTaskSampler({"e": 4}, 2, {"e": 1}, rank=0, world_size=1, group_of={"e": [3, 3, 3, 3]}, group_weights={3: 0, 1: 1})
    with pytest.raises(ValueError, match=r"groups \['5'\] have weight but no rows"):
        WeightedTaskSampler({"e": 4}, 2, {"e": 1}, rank=0, world_size=1, group_of={"e": [1, 1, 2, 2]}, group_weights={1: 1, 2: 1, 5: 1})
    with pytest.raises(ValueError, match="4 rows"):
        WeightedTaskSampler({"e": 4}, 2, {"e": 1}, rank=0, world_size=1, group_of={"e": [1]})


def test_parsers():
    assert parse_weights("dataset_a=0.5, dataset_b=1.2,dataset_c=1") == {"dataset_a": 0.5, "dataset_b": 1.2, "dataset_c": 1.0}
    assert parse_group_weights("0=1,1=1,2=1,3=0") == {0: 1.0, 1: 1.0, 2: 1.0, 3: 0.0}
    for bad, msg in [("", "empty"), ("a=1,", "expected name=weight"), ("a", "expected name=weight"), ("=1", "expected name=weight"),
                     ("a=x", "not a number"), ("a=-1", ">= 0"), ("a=nan", "finite"), ("a=1,a=2", "duplicate")]:  # fmt: skip
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
    sampler = WeightedTaskSampler({k: len(v) for k, v in tasks.items()}, 3, {"alpha": 2, "beta": 1}, seed=2, rank=1, world_size=2)
    runs = {}
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(TaskBatches(tasks, sampler, _texts, steps=12), batch_size=None, num_workers=workers)
        runs[workers] = [(b["step"], b["task"], b["batch"]) for b in loader]
    assert runs[0] == runs[2] and [s for s, _, _ in runs[0]] == list(range(12))
    expected = [(task, [f"{task} q{i}" for i in idx]) for task, idx in (next(sampler) for _ in range(12))]
    assert [(t, b) for _, t, b in runs[0]] == expected
    # Resume from the state carried by batch 5: the rest of the stream is the same.
    sampler = WeightedTaskSampler({k: len(v) for k, v in tasks.items()}, 3, {"alpha": 2, "beta": 1}, seed=2, rank=1, world_size=2)
    loader = torch.utils.data.DataLoader(TaskBatches(tasks, sampler, _texts, steps=12), batch_size=None)
    state = [b["sampler_state"] for b in loader][5]
    tail = [(b["step"], b["task"], b["batch"]) for b in TaskBatches(tasks, sampler, _texts, steps=6, state=state)]
    assert tail == runs[0][6:]
