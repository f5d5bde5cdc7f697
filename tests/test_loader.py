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


# ----------------------------------------------------------------------------- a resume continues the same run


def _write_rows(path, n: int) -> None:
    path.write_text("".join(json.dumps({"query": f"q{i:03d}", "positive": f"p{i:03d}"}) + "\n" for i in range(n)))


def _texts(records) -> list[str]:
    return [r.query.text for r in records]


def _file_loader(path, **kw):
    from vembed_blocks.data import training_batches

    options = dict(batch_size=4, seed=1, rank=0, world_size=1, num_workers=0, grad_accum_steps=2)
    return training_batches(str(path), _texts, **{**options, **kw})[0]


def _run(loader, end: int) -> list:
    return [(step, batches) for step, batches, _ in loader.steps(end)]


def test_resume_refuses_other_data_and_other_accumulation(tmp_path):
    import hashlib
    import shutil

    from vembed_blocks.data import file_fingerprint

    path = tmp_path / "train.jsonl"
    _write_rows(path, 40)
    whole = _run(_file_loader(path), 6)
    first = _file_loader(path)
    head = _run(first, 3)
    state = first.state_dict()
    assert json.loads(json.dumps(state)) == state  # plain types only (extras load with weights_only=True)
    content = path.read_bytes()
    fingerprint = {"file": "train.jsonl", "bytes": len(content), "rows": 40}
    fingerprint["blake2b"] = hashlib.blake2b(content, digest_size=16).hexdigest()
    assert state["identity"] == {"train": fingerprint}
    assert state["grad_accum_steps"] == 2 and state["sizes"] == {"train": 40} and state["step"] == 6

    # a renamed copy in another folder is the same data: it resumes, exactly
    (tmp_path / "moved").mkdir()
    shutil.copy(path, tmp_path / "moved" / "renamed.jsonl")
    moved = _file_loader(tmp_path / "moved" / "renamed.jsonl")
    moved.load_state_dict(state)
    assert head + _run(moved, 6) == whole

    # one row edited in place (same byte length), one row appended: other data, refused naming old and new
    edited = tmp_path / "edited" / "train.jsonl"
    edited.parent.mkdir()
    edited.write_bytes(content.replace(b"p007", b"p70x"))
    assert edited.stat().st_size == len(content)
    with pytest.raises(ValueError, match="differs from the checkpoint") as err:
        _file_loader(edited).load_state_dict(state)
    assert fingerprint["blake2b"] in str(err.value) and file_fingerprint(edited)["blake2b"] in str(err.value)
    longer = tmp_path / "longer" / "train.jsonl"
    longer.parent.mkdir()
    _write_rows(longer, 41)
    with pytest.raises(ValueError, match="'rows': 40.*'rows': 41"):
        _file_loader(longer).load_state_dict(state)

    # another accumulation would relabel the steps (6 micro-batches = step 3 of 2, "step 1.5" of 4)
    with pytest.raises(ValueError, match="saved with grad_accum_steps=2 .*this run has grad_accum_steps=4"):
        _file_loader(path, grad_accum_steps=4).load_state_dict(state)

    # a state from before these keys still loads
    old = {k: v for k, v in state.items() if k not in ("sizes", "grad_accum_steps", "identity", "bad_rows")}
    again = _file_loader(path)
    again.load_state_dict(old)
    assert head + _run(again, 6) == whole


def test_same_global_batch_on_another_world_size_still_resumes():
    """2 ranks x 4 rows saved, 1 rank x 8 rows resumed: the global batch is the same, so the draws continue."""

    def make(batch: int, rank: int, world: int) -> TaskLoader:
        sizes = {k: len(v) for k, v in TASKS.items()}
        s = WeightedTaskSampler(sizes, batch, weights={"a": 2.0, "b": 1.0}, seed=3, rank=rank, world_size=world)
        return TaskLoader(TASKS, s, grad_accum_steps=2, identity={"tasks": sorted(TASKS)})

    whole = _run(make(8, 0, 1), 8)
    ranks = [make(4, r, 2) for r in range(2)]
    heads = [_run(r, 3) for r in ranks]
    for (s0, b0), (s1, b1), (s, b) in zip(heads[0], heads[1], whole[:3]):  # rank 0's rows, then rank 1's
        assert s0 == s1 == s and [x + y for x, y in zip(b0, b1)] == b
    resumed = make(8, 0, 1)
    resumed.load_state_dict(ranks[0].state_dict())
    assert resumed.step == 3 and _run(resumed, 8) == whole[3:]


# ----------------------------------------------------------------------------- bad rows


def _image_rows(folder, n: int, bad: set[int]) -> str:
    """``n`` t2i rows, each with its own 2x2 PNG; the images of the rows in ``bad`` are not images."""
    from PIL import Image

    rows = []
    for i in range(n):
        image = folder / f"im{i}.png"
        if i in bad:
            image.write_bytes(b"not a png")
        else:
            Image.new("RGB", (2, 2), (i, 2 * i, 3)).save(image)
        rows.append(json.dumps({"query": f"q{i}", "positive": image.name}))
    path = folder / "train.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def _pixels(records) -> list[tuple[str, int]]:
    """A collate that decodes each positive image: (query, sum of the red channel)."""
    import numpy as np

    from vembed_blocks.data import load_image

    return [(r.query.text, int(np.asarray(load_image(r.positive.images[0]))[..., 0].sum())) for r in records]


def test_skip_bad_drops_exactly_the_bad_rows_and_counts_them(tmp_path):
    from vembed_blocks.data import ImageLoadError, training_batches

    (tmp_path / "clean").mkdir()
    (tmp_path / "spoilt").mkdir()
    options = dict(batch_size=4, seed=5, rank=0, world_size=1, grad_accum_steps=1)
    clean = training_batches(_image_rows(tmp_path / "clean", 12, set()), _pixels, num_workers=0, **options)[0]
    reference = _run(clean, 6)  # 2 passes over 12 rows: row 5 is drawn twice
    spoilt = _image_rows(tmp_path / "spoilt", 12, {5})
    loader = training_batches(spoilt, _pixels, num_workers=2, skip_bad=True, **options)[0]
    got, counts = [], []
    for step, batches, _ in loader.steps(6):
        got.append((step, batches))
        counts.append(loader.bad_rows)
    # each batch is a plain collate of its good rows, in the sampler's order; the other batches are untouched
    assert got == [(s, [[row for row in b if row[0] != "q5"] for b in batches]) for s, batches in reference]
    drawn = [sum(row[0] == "q5" for b in batches for row in b) for _, batches in reference]
    assert sum(drawn) == 2 and counts == [sum(drawn[: k + 1]) for k in range(6)]
    assert loader.state_dict()["bad_rows"] == 2 and loader.bad_shards == 0 and loader.read_skipped == 0
    resumed = training_batches(spoilt, _pixels, num_workers=0, skip_bad=True, **options)[0]
    resumed.load_state_dict(loader.state_dict())
    assert resumed.bad_rows == 2  # the count goes on across a resume
    # without skip_bad the image error stops the run, naming the image
    with pytest.raises(ImageLoadError, match="im5.png"):
        _run(training_batches(spoilt, _pixels, num_workers=0, **options)[0], 6)
    # a micro-batch of bad rows only cannot be trained on
    (tmp_path / "all").mkdir()
    worst = training_batches(_image_rows(tmp_path / "all", 4, {0, 1, 2, 3}), _pixels, skip_bad=True, **options)[0]
    with pytest.raises(ValueError, match="every row of micro-batch 0"):
        _run(worst, 1)


def test_too_many_bad_rows_in_the_file_are_refused(tmp_path):
    from vembed_blocks.data import RecordError

    path = tmp_path / "train.jsonl"
    rows = [json.dumps({"query": f"q{i}", "positive": f"p{i}"}) for i in range(50)]
    rows[17] = json.dumps({"query": "no positive"})
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(RecordError, match="train.jsonl:18"):
        _file_loader(path)
    with pytest.raises(ValueError, match=r"1 of 50 rows are bad \(2% > --max-bad-fraction 1%\); first errors:\n.*:18"):
        _file_loader(path, skip_bad=True)
    loader = _file_loader(path, skip_bad=True, max_bad_fraction=0.02)
    assert loader.read_skipped == 1 and loader.state_dict()["sizes"] == {"train": 49}
    csv = tmp_path / "train.csv"  # CSV is read into a list: the count comes through all the same
    csv.write_text("query,positive\n" + "".join(f"q{i},{'' if i == 3 else f'p{i}'}\n" for i in range(10)))
    with pytest.raises(ValueError, match=r"1 of 10 rows are bad \(10% > --max-bad-fraction 5%\)"):
        _file_loader(csv, skip_bad=True, max_bad_fraction=0.05)
    assert _file_loader(csv, skip_bad=True, max_bad_fraction=0.1).read_skipped == 1


def test_a_file_whose_rows_all_share_one_label_warns_that_nothing_is_left_to_contrast(tmp_path):
    import json
    import warnings

    from vembed_blocks.data.loader import training_batches

    def write(rows):
        path = tmp_path / "t.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(path)

    same = [{"query": f"q{i}", "positive": f"p{i}", "label": "cat"} for i in range(4)]
    options = dict(batch_size=2, seed=0, rank=0, world_size=1, num_workers=0)
    with pytest.warns(UserWarning, match=r"every row has label 'cat' and none has negatives"):
        training_batches(write(same), list, **options)
    for other in ({"query": "q", "positive": "p"}, {**same[0], "label": "dog"}, {**same[0], "negatives": ["n"]}):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # an unlabelled row, another label or a hard negative: negatives exist
            training_batches(write([*same, other]), list, **options)


# ----------------------------------------------------------------------------- collation off the critical path


class _WhereCollated:
    """A collator that records which process built each batch (and what it would have tokenised)."""

    def __call__(self, records) -> dict:
        import os

        return {"pid": torch.tensor([os.getpid()]), "rows": torch.tensor([len(records)])}


@pytest.mark.parametrize("recipe", ["text_t2t", "clip_t2i"])
def test_the_recipes_collate_in_dataloader_workers(tmp_path, recipe):
    """Tokenisation and image decoding (the collator) run in the DataLoader's worker processes, which work
    ahead of the loop, never in the training process between the forward passes of a step."""
    import os
    from types import SimpleNamespace

    from _recipes import load_script

    path = tmp_path / "train.jsonl"
    _write_rows(path, 64)
    module = load_script(recipe)
    args = module.parse_args(["--data", str(path), "--model", "unused", "--output", str(tmp_path / "run")])
    assert args.num_workers >= 1
    args.grad_accum_steps = 2
    loader, _ = module.load_data(args, SimpleNamespace(collator=_WhereCollated()), str(path), 0, 1)
    pids = [int(b["pid"]) for _, micro, _ in loader.steps(3) for b in micro]
    assert len(pids) == 6 and os.getpid() not in pids and len(set(pids)) == args.num_workers
