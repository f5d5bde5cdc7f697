"""TokenBudgetSampler: the budget per rank, each row once per pass, ranks disjoint and in agreement, exact
resume (also through TaskLoader / training_batches and DataLoader workers), refused resumes, length grouping,
and the tokenizer helpers against the collator's own padding."""

from __future__ import annotations

import functools
import json
import warnings

import numpy as np
import pytest

from vembed_blocks.data.length_batches import (
    TokenBudgetSampler,
    lengths_for,
    row_lengths,
    row_texts,
    token_lengths,
)
from vembed_blocks.data.records import Item, Record
from vembed_blocks.data.sampler import WeightedTaskSampler
from vembed_blocks.user_errors import UserError

BUDGET = 512
LENGTHS = np.random.default_rng(5).integers(1, 201, 1000).tolist()  # 1..200 tokens: BUDGET >= 2 * the longest


def _ranks(lengths, budget, world, **kw) -> list[TokenBudgetSampler]:
    return [TokenBudgetSampler(lengths, budget, rank=r, world_size=world, **kw) for r in range(world)]


def _steps(samplers: list[TokenBudgetSampler], n: int) -> list[list[list[int]]]:
    """``n`` steps of every rank: ``[step][rank] -> rows``; every rank must name the same task."""
    out = []
    for _ in range(n):
        draws = [next(s) for s in samplers]
        assert {t for t, _ in draws} == {"train"}
        out.append([rows for _, rows in draws])
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
def test_each_rank_fits_the_budget_and_ranks_split_one_global_batch(world):
    samplers = _ranks(LENGTHS, BUDGET, world, seed=3, window=180)  # 5 windows a pass, the last of 280 rows
    lengths = np.asarray(LENGTHS)
    one = samplers[0]
    assert len({s.draw_spec() for s in samplers}) == 1
    steps, ragged = 0, 0
    for p in range(2):
        for w in range(one.windows):
            for glob in one.window_batches(p, w):  # rank 0's view of the global batches, in draw order
                shares = [rows for _, rows in (next(s) for s in samplers)]
                for r, rows in enumerate(shares):
                    assert rows == glob[r::world].tolist()  # rank r: sorted positions r::world
                    assert len(rows) >= 1
                    assert len(rows) * lengths[rows].max() <= BUDGET, (p, w, r, lengths[rows])
                union = [i for rows in shares for i in rows]
                assert len(set(union)) == len(union) == len(glob)  # disjoint, no row twice, nothing lost
                assert max(map(len, shares)) - min(map(len, shares)) <= 1
                ragged += len({len(rows) for rows in shares}) > 1
                steps += 1
    assert all(s.step == steps for s in samplers)
    if world > 1:
        assert ragged > 0  # the sizes really were ragged somewhere, and the split still held


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_pass_uses_each_row_exactly_once_and_passes_differ(world):
    samplers = _ranks(LENGTHS, BUDGET, world, seed=11, window=180)
    passes = []
    for p in range(3):
        n = samplers[0].batches_per_pass(p)
        rows = [i for step in _steps(samplers, n) for share in step for i in share]
        assert sorted(rows) == list(range(len(LENGTHS))), p
        assert samplers[0].state_dict()["pass"] == p + 1 and samplers[0].state_dict()["batch"] == 0
        passes.append(rows)
    assert passes[0] != passes[1] != passes[2]


def test_batches_group_similar_lengths_far_tighter_than_random_batches():
    lengths = np.random.default_rng(6).integers(1, 501, 4000)
    s = TokenBudgetSampler(lengths, 2048, seed=0, rank=0, world_size=2)
    batches = [b for w in range(s.windows) for b in s.window_batches(0, w)]
    sizes = [len(b) for b in batches]
    spread = np.mean([np.ptp(lengths[b]) for b in batches])
    shuffled = np.random.default_rng(1).permutation(len(lengths))
    cuts = np.cumsum(sizes)[:-1]
    random_spread = np.mean([np.ptp(lengths[b]) for b in np.split(shuffled, cuts)])
    assert random_spread > 300 and spread < 0.1 * random_spread, (spread, random_spread)
    # and the budget is used: the padded tokens per rank micro-batch average over 80% of it
    used = [len(b[r::2]) * lengths[b[r::2]].max() for b in batches for r in range(2)]
    assert np.mean(used) > 0.8 * 2048, np.mean(used)
    assert sum(sizes) == len(lengths) and max(sizes) > 3 * min(sizes)  # rows per step vary with length
    # a window's batches come in a shuffled order, not short to long: draw place and mean length uncorrelated
    counts = [len(s.window_batches(0, w)) for w in range(s.windows)]
    place = [i / n for n in counts for i in range(n)]
    means = [lengths[b].mean() for b in batches]
    assert abs(np.corrcoef(place, means)[0, 1]) < 0.4, np.corrcoef(place, means)[0, 1]


def test_rows_longer_than_the_budget_get_a_micro_batch_each_and_a_short_window_end_joins_the_batch_before():
    lengths = [20] * 100 + [600] * 10  # budget 512: 25 short rows per rank, one long row per rank
    with pytest.warns(UserWarning, match="10 of 110 rows are longer than the token budget"):
        s = TokenBudgetSampler(lengths, 512, rank=0, world_size=2)
    batches = s.window_batches(0, 0)
    assert sorted(map(len, batches)) == [2] * 5 + [50, 50]
    assert all(len(b) == 2 for b in batches if np.asarray(lengths)[b].max() == 600)
    # 11 long rows on 2 ranks: the 11th cannot have a batch of its own without leaving a rank empty,
    # and 2 + 1 < 2 * 2 rows cannot make two batches: it joins the one before (the documented exception).
    with pytest.warns(UserWarning):
        odd = TokenBudgetSampler([20] * 100 + [600] * 11, 512, rank=0, world_size=2).window_batches(0, 0)
    assert sorted(map(len, odd)) == [2] * 4 + [3, 50, 50]
    # a short end with enough rows before it takes world rows from that batch instead: all within budget
    tail = TokenBudgetSampler([100] * 11, 500, rank=0, world_size=2).window_batches(0, 0)  # 5 per rank max
    assert sorted(map(len, tail)) == [2, 9]  # greedy gives [10, 1], one rank would get no row
    assert all(len(b[r::2]) * 100 <= 500 for b in tail for r in range(2))


def _roundtrip(state: dict) -> dict:
    return json.loads(json.dumps(state))


@pytest.mark.parametrize("world", [1, 3])
def test_resume_from_json_state_continues_exactly_also_across_a_pass_boundary(world):
    make = lambda: _ranks(LENGTHS, BUDGET, world, seed=7, window=180)
    first = make()[0].batches_per_pass(0)
    at = [1, 17, first - 1, first, first + 1, first + 40]  # around the end of pass 0
    whole = _steps(make(), first + 100)
    for k in at:
        run = make()
        _steps(run, k)
        states = [_roundtrip(s.state_dict()) for s in run]
        assert len(json.dumps(states[0])) < 300  # O(1): a few integers, whatever the data size
        resumed = make()
        for s, state in zip(resumed, states):
            s.load_state_dict(state)
        assert _steps(resumed, 60) == whole[k : k + 60], k
        assert resumed[0].step == k + 60


def test_resume_is_refused_for_other_lengths_seed_budget_world_window_or_batching():
    s = TokenBudgetSampler(LENGTHS, BUDGET, seed=7, rank=0, world_size=2)
    for _ in range(5):
        next(s)
    state = _roundtrip(s.state_dict())
    edited = list(LENGTHS)
    edited[500] += 1  # same row count, one row's length changed
    cases = [
        (TokenBudgetSampler(edited, BUDGET, seed=7, rank=0, world_size=2), "lengths_crc32"),
        (TokenBudgetSampler(LENGTHS[:-1], BUDGET, seed=7, rank=0, world_size=2), "rows: saved 1000, now 999"),
        (TokenBudgetSampler(LENGTHS, BUDGET, seed=8, rank=0, world_size=2), "seed: saved 7, now 8"),
        (TokenBudgetSampler(LENGTHS, 256, seed=7, rank=0, world_size=2), "token_budget: saved 512, now 256"),
        (TokenBudgetSampler(LENGTHS, BUDGET, seed=7, rank=0, world_size=3), "world_size: saved 2, now 3"),
        (TokenBudgetSampler(LENGTHS, BUDGET, seed=7, rank=0, world_size=2, window=100), "window_rows"),
    ]
    for other, what in cases:
        with pytest.raises(ValueError, match=what):
            other.load_state_dict(state)
        assert other.step == 0  # nothing half-loaded
    weighted = WeightedTaskSampler({"train": len(LENGTHS)}, 4, seed=7, rank=0, world_size=2).state_dict()
    with pytest.raises(ValueError, match="saved without a token budget"):
        s.load_state_dict(weighted)


# ----------------------------------------------------------------------------- through the loader


WORDS = "a the cat dog bird red green blue sky circle square photo".split()


def _tokenizer():
    from vembed_blocks.demo import word_level_tokenizer

    return word_level_tokenizer(WORDS, ("[PAD]", "[UNK]", "[CLS]", "[SEP]"), "[CLS] $A [SEP]")


def _write(path, n: int = 120) -> list[dict]:
    rng = np.random.default_rng(2)
    rows = []
    for i in range(n):
        q = " ".join(rng.choice(WORDS, int(rng.integers(1, 40))))
        rows.append({"query": f"{q} {i}", "positive": " ".join(rng.choice(WORDS, int(rng.integers(1, 12))))})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _file_loader(path, collate, workers: int, world: int = 1, rank: int = 0):
    from vembed_blocks.data.loader import training_batches

    lengths = functools.partial(row_lengths, tokenizer=_tokenizer(), max_length=32)
    options = dict(batch_size=999, seed=4, rank=rank, world_size=world, num_workers=workers, grad_accum_steps=2)
    return training_batches(str(path), collate, token_budget=96, row_length=lengths, **options)


def _queries(records) -> list[str]:
    return [r.query.text for r in records]


def test_training_batches_with_a_token_budget_same_for_any_workers_and_resume_exactly(tmp_path):
    from vembed_blocks.data.collate import TextCollator

    path = tmp_path / "train.jsonl"
    _write(path)
    loader, rows = _file_loader(path, _queries, workers=0)
    assert rows == 120 and isinstance(loader.sampler, TokenBudgetSampler)
    plain = [(step, batches) for step, batches, _ in loader.steps(12)]
    two = [(step, batches) for step, batches, _ in _file_loader(path, _queries, workers=2)[0].steps(12)]
    assert two == plain and [s for s, _ in plain] == list(range(1, 13))
    sizes = {len(b) for _, batches in plain for b in batches}
    assert len(sizes) > 2  # rows per micro-batch vary (batch_size=999 means nothing here)
    # resume at optimizer step 5 (micro-batch 10), the state through JSON, with 2 workers
    first = _file_loader(path, _queries, workers=0)[0]
    list(zip(range(5), first.steps(12)))
    state = _roundtrip(first.state_dict())
    resumed = _file_loader(path, _queries, workers=2)[0]
    resumed.load_state_dict(state)
    assert resumed.step == 5
    assert [(step, batches) for step, batches, _ in resumed.steps(12)] == plain[5:]
    # the collator's real padded tensors fit the budget on every side (query width <= the row's length)
    collator = TextCollator(_tokenizer(), max_length=32)
    for _, batches, _ in _file_loader(path, collator, workers=0)[0].steps(12):
        for batch in batches:
            for side in ("query", "positive"):
                ids = batch[side]["input_ids"]
                assert ids.shape[0] * ids.shape[1] <= 96, (side, tuple(ids.shape))


def test_training_batches_ranks_share_each_global_batch_and_a_pass_covers_the_file(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = _write(path)
    ranks = [_file_loader(path, _queries, workers=0, world=2, rank=r)[0] for r in range(2)]
    micro = ranks[0].sampler.batches_per_pass(0)
    got = [[b for _, batches, _ in loader.steps((micro + 1) // 2) for b in batches][:micro] for loader in ranks]
    seen = []
    for a, b in zip(*got):
        assert a and b and not set(a) & set(b) and abs(len(a) - len(b)) <= 1
        seen += a + b
    assert sorted(seen) == sorted(r["query"] for r in rows)  # pass 0: every row once, over both ranks


def test_token_budget_with_shards_or_several_tasks_or_no_lengths_is_a_clear_error(tmp_path):
    from vembed_blocks.data.loader import task_loader, training_batches

    folder = tmp_path / "shards"
    folder.mkdir()
    _write(folder / "train.jsonl", 10)
    options = dict(batch_size=4, seed=0, rank=0, world_size=1, num_workers=0, max_steps=5)
    with pytest.raises(UserError, match="names shards.*token budget"):
        training_batches(str(folder), list, token_budget=64, row_length=lambda rs: [1] * len(rs), **options)
    with pytest.raises(UserError, match="needs each row's length"):
        training_batches(str(folder / "train.jsonl"), list, token_budget=64, **options)
    two = {"a": [1, 2], "b": [3]}
    with pytest.raises(UserError, match="one training file"):
        task_loader(two, list, batch_size=1, seed=0, rank=0, world_size=1, token_budget=8, lengths=[1, 1])
    with pytest.raises(UserError, match="2 row lengths for the 3 rows"):
        task_loader({"a": [1, 2, 3]}, list, batch_size=1, seed=0, rank=0, world_size=1, token_budget=8, lengths=[1, 1])


# ----------------------------------------------------------------------------- the tokenizer helpers


def test_row_lengths_equal_the_collators_padded_width_of_each_row():
    from vembed_blocks.data.collate import TextCollator

    tok = _tokenizer()
    records = [
        Record(Item(text="the cat " * k), Item(text="a dog"), [Item(text="red sky " * (7 - k))], source=f"f:{k}")
        for k in range(1, 7)
    ]
    collator = TextCollator(tok, max_length=12, query_instruction="a ", doc_instruction="photo ")
    width = [
        max(collator([r])[side]["input_ids"].shape[1] for side in ("query", "positive", "negatives")) for r in records
    ]
    assert width == [12, 12, 11, 11, 12, 12]  # the longer of query / negative, truncated at 12
    assert lengths_for(collator)(records) == width
    assert row_lengths(records, tok, max_length=12, query_instruction="a ", doc_instruction="photo ") == width
    untruncated = token_lengths([row_texts(r) for r in records], tok, max_length=None, batch=2)
    assert untruncated == [max(2 * k, 2 * (7 - k)) + 2 for k in range(1, 7)]  # words + [CLS] [SEP]
    assert row_texts(records[0], "a ", "photo ") == ["a the cat ", "photo a dog", "photo " + "red sky " * 6]


def test_rows_with_images_are_refused_by_name():
    row = Record(Item(text="a cat"), Item(images=("/data/cat.jpg",)), source="train.jsonl:7")
    with pytest.raises(UserError, match="train.jsonl:7: has images; token budgets are for text rows"):
        row_texts(row)


def test_nothing_is_warned_per_step():
    s = TokenBudgetSampler(LENGTHS, BUDGET, rank=0, world_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3 * s.batches_per_pass(0)):
            next(s)
