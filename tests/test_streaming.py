"""Streaming sharded data (vembed_blocks/data/shards.py, shard_stream.py, shard_formats.py):
split, order, resume, mixing, bad samples, formats, in-memory images."""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile

import numpy as np
import pytest
import torch
from _multiproc import run_ranks
from PIL import Image

from vembed_blocks.data import (
    DatasetSource,
    ShardError,
    ShardImage,
    ShardReader,
    ShardSet,
    StreamLoader,
    expand_shards,
    is_stream_spec,
    load_image,
    open_stream,
)


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (i % 256, (3 * i) % 256, 7)).save(buf, format="PNG")
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_tars(folder, shards: int, per_shard: int, bad: dict[int, str] | None = None) -> list[str]:
    """img2dataset-style shards: ``{key}.png`` + ``{key}.txt`` + ``{key}.json``; ``bad[i]`` spoils sample i."""
    bad, paths, n = bad or {}, [], 0
    for s in range(shards):
        paths.append(os.path.join(folder, f"{s:05d}.tar"))
        with tarfile.open(paths[-1], "w") as tf:
            for _ in range(per_shard):
                key, how = f"{n:06d}", bad.get(n)
                _add(tf, f"{key}.png", b"not an image" if how == "image" else _png(n))
                if how != "caption":
                    _add(tf, f"{key}.txt", f"caption {n}".encode())
                _add(tf, f"{key}.json", b"{broken" if how == "json" else json.dumps({"key": key, "n": n}).encode())
                n += 1
    return paths


def texts(records) -> list[str]:
    return [r.query.text for r in records]


def read_all(source, reader: int, readers: int, **kw) -> list:
    r, out = ShardReader(source, reader, readers, **kw), []
    while (rec := r.next_record()) is not None:
        out.append(rec)
    return out


def run(loader, end: int) -> list[tuple[int, list[str], list[str]]]:
    return [(step, [texts(b) for b in batches], names) for step, batches, names in loader.steps(end)]


# ----------------------------------------------------------------------------- split and order


@pytest.mark.parametrize("shards", [3, 6])  # fewer shards than the 4 readers (member modulo), and more
def test_every_sample_once_per_epoch_across_2_ranks_x_2_workers(tmp_path, shards):
    per = 30 // shards
    source = ShardSet(write_tars(tmp_path, shards, per))
    every = {f"caption {i}" for i in range(shards * per)}
    epochs = [[], []]
    for reader in range(4):  # reader = rank * workers + worker
        got = texts(read_all(source, reader, 4, shuffle_buffer=4, epochs=2, seed=3))
        assert got, reader
        # epoch by epoch: the reader's first epoch is the first len(share) records
        share = texts(read_all(source, reader, 4, shuffle_buffer=4, epochs=1, seed=3))
        epochs[0] += share
        epochs[1] += got[len(share) :]
    for epoch in epochs:
        assert sorted(epoch) == sorted(every) and len(epoch) == len(every)  # each exactly once
    assert epochs[0] != epochs[1]  # a fresh shard order / shuffle per epoch


def test_order_depends_only_on_the_seed(tmp_path):
    spec = str(tmp_path / "{00000..00003}.tar")
    write_tars(tmp_path, 4, 6)
    a = run(open_stream(spec, 2, seed=5, shuffle_buffer=4), 8)
    b = run(open_stream(spec, 2, seed=5, shuffle_buffer=4), 8)
    c = run(open_stream(spec, 2, seed=6, shuffle_buffer=4), 8)
    assert a == b and a != c
    flat = [t for _, batches, _ in a for b in batches for t in b]
    assert len(flat) == 16 and len(set(flat)) == 16  # 16 of the 24 samples, none twice
    assert flat != sorted(flat, key=lambda t: int(t.split()[1]))  # shuffled
    # the same with 2 DataLoader workers in the same process group layout is again seed-only
    w2 = run(open_stream(spec, 2, seed=5, shuffle_buffer=4, num_workers=2), 8)
    assert w2 == run(open_stream(spec, 2, seed=5, shuffle_buffer=4, num_workers=2), 8)


# ----------------------------------------------------------------------------- resume


def _mixed_sources(folder) -> dict:
    """A tar source and a JSONL source whose edit rows give two records each (resume mid-row)."""
    tars = write_tars(folder, 3, 9)
    img = os.path.join(folder, "img.png")
    with open(img, "wb") as f:
        f.write(_png(1))
    jsonl = []
    for s in range(2):
        jsonl.append(os.path.join(folder, f"edit-{s}.jsonl"))
        with open(jsonl[-1], "w") as f:
            for i in range(10):
                n = s * 10 + i
                row = {"source_image": "img.png", "target_image": "img.png", "instruction": f"edit {n}"}
                f.write(json.dumps({**row, "inverse_instruction": f"undo {n}"}) + "\n")
    return {"pairs": ShardSet(tars), "edits": ShardSet(jsonl)}


def _interrupted(make, stop: int, end: int) -> tuple[list, list]:
    whole = run(make(), end)
    first = make()
    head = run(first, stop)
    state = json.loads(json.dumps(first.state_dict()))  # plain JSON, as small as promised
    assert len(json.dumps(state)) < 2000
    second = make()
    second.load_state_dict(state)
    assert second.step == stop
    return whole, head + run(second, end)


@pytest.mark.parametrize("rank", [0, 1])
def test_resume_mid_shard_two_workers(tmp_path, rank):
    sources = _mixed_sources(tmp_path)

    def make():
        return StreamLoader(
            sources,
            3,
            weights={"pairs": 2.0, "edits": 1.0},
            seed=1,
            rank=rank,
            world_size=2,
            num_workers=2,
            grad_accum_steps=2,
            shuffle_buffer=4,
        )

    whole, resumed = _interrupted(make, 3, 7)
    assert resumed == whole and len(whole) == 7
    names = {n for _, _, ns in whole for n in ns}
    assert names == {"pairs", "edits"}  # both sources drawn, so both kinds of reader state resumed


def _two_rank_resume(rank, world_size, folder):
    from vembed_blocks.checkpoint import load_checkpoint, save_checkpoint

    spec = os.path.join(folder, "{00000..00003}.tar")

    def make():  # rank and world size from the process group
        return open_stream(spec, 2, seed=4, shuffle_buffer=5, grad_accum_steps=1)

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    whole = run(make(), 9)
    first, head = make(), []
    for step, batches, names in first.steps(9):
        head.append((step, [texts(b) for b in batches], names))
        if step == 4:
            save_checkpoint(os.path.join(folder, "ckpt"), model=model, optimizer=opt, step=step, sampler=first)
            break
    second = make()
    assert load_checkpoint(os.path.join(folder, "ckpt"), model=model, optimizer=opt, sampler=second) == 4
    return whole, head + run(second, 9), _uneven_epoch(folder)


def _uneven_epoch(folder) -> tuple[list[int], int]:
    """One epoch where one rank's share (10 rows) outlasts the other's (4 rows): the steps each rank ran."""
    shards = [_write_text_source(folder, "big", 10), _write_text_source(folder, "small", 4)]
    loader = StreamLoader({"train": ShardSet(shards)}, 2, epochs=1, seed=2, grad_accum_steps=1)
    return [step for step, _, _ in loader.steps(100)], loader.step


def test_two_real_ranks_resume_through_checkpoint_and_agree_on_the_last_epoch_step(tmp_path):
    write_tars(tmp_path, 4, 10)  # 2 shards per rank: 20 samples, more than the 18 that 9 steps take
    results = run_ranks(_two_rank_resume, 2, str(tmp_path), timeout=120)
    for whole, resumed, _ in results:
        assert resumed == whole and len(whole) == 9
    # the ranks read disjoint samples and the same source at every step
    seen = [{t for _, batches, _ in whole for b in batches for t in b} for whole, _, _ in results]
    assert not seen[0] & seen[1] and len(seen[0]) == len(seen[1]) == 18
    # epochs=1 with shares of 10 and 4 rows, 2 per step: both ranks stop after min(10, 4) // 2 = 2 steps
    # (without agreement the longer share would run a 3rd step alone and hang its collectives)
    for steps_run, step_after in (r[2] for r in results):
        assert steps_run == [1, 2] and step_after == 2


def test_epochs_on_several_ranks_need_the_process_group(tmp_path):
    spec = _write_text_source(tmp_path, "rows", 8).replace("rows.jsonl", "{rows,rows}.jsonl")
    loader = open_stream(spec, 2, epochs=1, rank=0, world_size=2)
    with pytest.raises(ValueError, match="epochs=1 with world_size=2 needs the process group"):
        next(loader.steps(1))
    assert len(run(open_stream(spec, 2, rank=0, world_size=2), 3)) == 3  # endless needs no agreement


# ----------------------------------------------------------------------------- weighted mixing

_M = (1 << 64) - 1


def _splitmix(*keys: int) -> int:  # written out again from the splitmix64 definition
    h = 0x9E3779B97F4A7C15
    for k in keys:
        h = ((h ^ (k & _M)) * 0xBF58476D1CE4E5B9) & _M
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _M
        h ^= h >> 31
    return h


def _write_text_source(folder, name: str, rows: int) -> str:
    path = os.path.join(folder, f"{name}.jsonl")
    with open(path, "w") as f:
        for i in range(rows):
            f.write(json.dumps({"query": f"{name} q{i}", "positive": f"{name} p{i}"}) + "\n")
    return path


def test_weighted_mixing_matches_the_draw_and_the_weights(tmp_path):
    weights = {"a": 0.5, "b": 0.3, "c": 0.2}
    srcs = {n: ShardSet([_write_text_source(tmp_path, n, 50)]) for n in weights}
    steps = 3000
    per_rank = [
        [ns[0] for _, _, ns in StreamLoader(srcs, 1, weights=weights, seed=9, rank=r, world_size=2).steps(steps)]
        for r in (0, 1)
    ]
    assert per_rank[0] == per_rank[1]  # the same source on every rank at every step
    names, cum = sorted(weights), np.cumsum([weights[n] for n in sorted(weights)])
    expected = []
    for t in range(steps):
        u = (_splitmix(9, t, 0) >> 11) / float(1 << 53) * cum[-1]
        expected.append(names[int(np.searchsorted(cum, u, side="right"))])
    assert per_rank[0] == expected
    counts = np.array([per_rank[0].count(n) for n in names])
    p = np.array([weights[n] for n in names])
    chi2 = float((((counts - steps * p) ** 2) / (steps * p)).sum())
    assert chi2 < 13.8  # chi-square, 2 degrees of freedom, p = 0.001


# ----------------------------------------------------------------------------- bad input


def test_corrupt_members_are_skipped_counted_and_named(tmp_path, caplog):
    paths = write_tars(tmp_path, 2, 6, bad={1: "image", 4: "caption", 8: "json"})
    with caplog.at_level(logging.WARNING):
        loader = open_stream(str(tmp_path / "*.tar"), 3, epochs=1, shuffle_buffer=100)
        got = [t for _, batches, _ in run(loader, 10) for b in batches for t in b]
    assert sorted(got, key=lambda t: int(t.split()[1])) == [f"caption {i}" for i in range(12) if i not in (1, 4, 8)]
    assert loader.skipped == {"train": 3}
    log = caplog.text
    for member in (f"{paths[0]}:000001.png", f"{paths[0]}:000004", f"{paths[1]}:000008.json"):
        assert member in log, log


def test_unreadable_shards_are_errors_naming_them(tmp_path):
    write_tars(tmp_path, 2, 2)
    with pytest.raises(FileNotFoundError, match="00002.tar"):
        expand_shards(str(tmp_path / "{00000..00002}.tar"))
    junk = tmp_path / "junk" / "00000.tar"
    junk.parent.mkdir()
    junk.write_bytes(b"\x01" * 2048)
    with pytest.raises(ShardError, match=str(junk)):
        run(open_stream(str(junk.parent), 1), 1)
    good = tmp_path / "00000.tar"
    cut = tmp_path / "cut" / "00000.tar"
    cut.parent.mkdir()
    raw = good.read_bytes()
    cut.write_bytes(raw[:1024] + b"\x07" * 512 + raw[1536:])  # a spoiled header after the first member
    with pytest.raises(ShardError, match=str(cut)):
        run(open_stream(str(cut), 1, epochs=1), 5)


def test_is_stream_spec(tmp_path):
    write_tars(tmp_path, 1, 1)
    (tmp_path / "one.jsonl").write_text("")
    (tmp_path / "tasks" / "a").mkdir(parents=True)
    assert is_stream_spec("d/{00000..00009}.tar") and is_stream_spec("d/*.parquet") and is_stream_spec("x.tar")
    assert is_stream_spec(str(tmp_path)) and is_stream_spec({"a": "d/*.tar", "b": "e/{0,1}.jsonl"})
    assert not is_stream_spec(str(tmp_path / "one.jsonl")) and not is_stream_spec(str(tmp_path / "tasks"))
    assert not is_stream_spec("train.parquet") and not is_stream_spec(None)


def test_a_folder_of_shards_is_listed_and_still_streams(tmp_path, caplog):
    # Up to 64 files: one log line each, formats from their first readable row (a bad first row is not fatal).
    few = tmp_path / "few"
    few.mkdir()
    write_tars(few, 2, 3)
    with caplog.at_level(logging.INFO, logger="vembed_blocks.data"):
        loader = open_stream(str(few), 2)
    assert caplog.messages == [
        f"{few}: reading 2 data files:",
        "  00000.tar: tar, 10.2 KB, t2i",
        "  00001.tar: tar, 10.2 KB, t2i",
    ]
    assert sorted(t for _, (b,), _ in run(loader, 3) for t in b) == [f"caption {n}" for n in range(6)]
    (few / "00002.jsonl").write_text('{"query": "q", "positive": "p"}\n')
    with pytest.raises(ValueError, match=r"different kinds \(tar: 00000.tar, 00001.tar; jsonl: 00002.jsonl\)"):
        open_stream(str(few), 2)
    lines = tmp_path / "lines"
    lines.mkdir()
    (lines / "a.jsonl").write_text('{broken\n{"query": "q", "positive": "p"}\n')
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vembed_blocks.data"):
        open_stream(str(lines), 1)
    assert caplog.messages[1] == "  a.jsonl: jsonl, 2 rows, t2t"
    # More: the first file is opened, the rest stat'ed, and one summary line stands for them all.
    many = tmp_path / "many"
    many.mkdir()
    write_tars(many, 65, 1)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vembed_blocks.data"):
        open_stream(str(many), 1)
    assert caplog.messages == [
        f"{many}: reading 65 data files; formats from the first file only (over 64 files):",
        "  00000.tar: tar, 10.2 KB, t2i, 00001.tar .. 00064.tar, 665.6 KB in all",
    ]


# ----------------------------------------------------------------------------- formats agree


def _key(r):
    return (r.query.text, tuple(map(str, r.query.images)), tuple(map(str, r.positive.images)), r.positive.text, r.label)


def test_parquet_and_datasets_give_the_jsonl_records(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    for i in range(4):
        (tmp_path / f"im{i}.png").write_bytes(_png(i))
    rows = [
        {
            "query": f"caption {i}",
            "positive": f"im{i % 4}.png",
            "label": f"l{i % 3}",
            "negatives": [f"im{(i + 1) % 4}.png"],
        }
        for i in range(20)
    ]
    for s in range(2):
        part = rows[s * 10 : (s + 1) * 10]
        with open(tmp_path / f"part-{s}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
        pq.write_table(pa.Table.from_pylist(part), tmp_path / f"part-{s}.parquet", row_group_size=3)
    root = str(tmp_path)
    want = sorted(_key(r) for r in read_all(ShardSet(expand_shards(f"{root}/part-*.jsonl")), 0, 1, epochs=1))
    assert len(want) == 20 and want[0][2] == (os.path.join(root, "im0.png"),)
    ds = datasets.Dataset.from_list(rows)
    for source in (
        ShardSet(expand_shards(f"{root}/part-{{0,1}}.parquet")),
        DatasetSource(ds, image_root=root, rows_per_unit=7),
        DatasetSource(ds.to_iterable_dataset(num_shards=2), image_root=root),
    ):
        for readers in (1, 3):  # one reader, and three splitting the units between them
            got = [r for k in range(readers) for r in read_all(source, k, readers, epochs=1, shuffle_buffer=4)]
            assert sorted(_key(r) for r in got) == want, (source, readers)
    # image bytes in a Parquet column decode to the files' pixels
    blob = [{"query": r["query"], "positive": (tmp_path / r["positive"]).read_bytes()} for r in rows[:5]]
    pq.write_table(pa.Table.from_pylist(blob), tmp_path / "bytes.parquet")
    got = read_all(ShardSet([str(tmp_path / "bytes.parquet")]), 0, 1, epochs=1, shuffle_buffer=1)
    for rec, row in zip(got, rows):
        expected = np.asarray(Image.open(tmp_path / row["positive"]).convert("RGB"))
        assert np.array_equal(np.asarray(rec.positive.images[0].image), expected)


def test_collator_gets_tar_images(tmp_path):
    from _tiny_models import tiny_siglip
    from transformers import AutoProcessor

    from vembed_blocks.data import DualEncoderCollator

    write_tars(tmp_path, 2, 4)
    proc = AutoProcessor.from_pretrained(tiny_siglip(str(tmp_path / "model")))
    # the call a recipe's load_data makes
    spec, collate = str(tmp_path / "*.tar"), DualEncoderCollator(proc)
    loader = open_stream(
        spec, 4, collate, seed=0, rank=0, world_size=1, num_workers=2, grad_accum_steps=2, format="t2i"
    )
    (step, batches, tasks), *rest = list(loader.steps(2))
    assert step == 1 and len(batches) == 2 and tasks == ["train", "train"] and len(rest) == 1
    assert batches[0]["positive"]["pixel_values"].shape == (4, 3, 32, 32)
    assert batches[0]["query"]["input_ids"].shape[0] == 4


# ----------------------------------------------------------------------------- in-memory images


def _oriented_jpeg() -> bytes:
    """A 12x6 gradient JPEG whose EXIF says "rotate 90 degrees clockwise to display" (orientation 6)."""
    pixels = np.zeros((6, 12, 3), np.uint8)
    pixels[..., 0] = np.arange(12) * 20
    pixels[..., 1] = np.arange(6)[:, None] * 40
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def _half_transparent_png() -> bytes:
    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, np.array([0, 64, 128, 255])[:, None]
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    return buf.getvalue()


def test_shard_image_from_tar_bytes_loads_like_the_file_on_disk(tmp_path):
    from vembed_blocks.data import ImageLoadError

    files = {"a.jpg": _oriented_jpeg(), "b.png": _half_transparent_png()}
    tar = tmp_path / "00000.tar"
    with tarfile.open(tar, "w") as tf:
        for name, data in files.items():
            (tmp_path / name).write_bytes(data)
            _add(tf, name, data)
            _add(tf, name.split(".")[0] + ".txt", b"caption")
    for decode in (False, True):  # bytes only, and the reader's decoded picture
        records = read_all(ShardSet([str(tar)]), 0, 1, epochs=1, shuffle_buffer=1, decode=decode)
        in_tar = {os.path.basename(r.positive.images[0]).split(":")[-1]: r.positive.images[0] for r in records}
        assert sorted(in_tar) == sorted(files)
        for name, image in in_tar.items():
            assert isinstance(image, ShardImage) and not os.path.exists(image) and image.data == files[name]
            disk = str(tmp_path / name)
            for cap in (None, 5):
                got, want = load_image(image, max_side=cap), load_image(disk, max_side=cap)
                assert got.mode == "RGB" and np.array_equal(np.asarray(got), np.asarray(want)), (name, cap, decode)
    # the references, written out: orientation 6 shows the stored pixels turned 90 degrees clockwise ...
    raw = np.asarray(Image.open(tmp_path / "a.jpg").convert("RGB"))
    assert np.array_equal(np.asarray(load_image(in_tar["a.jpg"])), np.rot90(raw, k=-1))
    # ... and transparency is composited onto white: 200 * a + 255 * (1 - a) in red, 255 * (1 - a) elsewhere
    alpha = np.array([0, 64, 128, 255], np.float64)[:, None] / 255  # per row, the same across the 5 columns
    want = np.zeros((4, 5, 3))
    want[..., 0] = 200 * alpha + 255 * (1 - alpha)
    want[..., 1] = want[..., 2] = 255 * (1 - alpha)
    assert np.abs(np.asarray(load_image(in_tar["b.png"]), np.float64) - want).max() <= 1
    with pytest.raises(ImageLoadError, match=r"00000.tar:k.jpg: OSError|00000.tar:k.jpg: Unidentified"):
        load_image(ShardImage(f"{tar}:k.jpg", b"not an image"))


def test_clip_t2i_trains_on_tar_shards_two_ranks_and_resumes_exactly(tmp_path):
    """The shared --data flag takes shards: 2 ranks x 2 workers train on a brace pattern of tar shards, and a run
    split by --stop-at / --resume reproduces the straight run's losses (the stream's state is in the checkpoint)."""
    import math

    from _recipes import torchrun, train_log
    from _tiny_models import tiny_siglip

    write_tars(tmp_path, 4, 16)
    model = tiny_siglip(str(tmp_path / "model"))
    flags = ["--data", str(tmp_path / "{00000..00003}.tar"), "--model", model, "--batch-size", "4"]
    flags += ["--max-steps", "4", "--num-workers", "2", "--loss", "siglip", "--lr", "1e-3"]
    flags += ["--ignore-input-check"]  # flat-colour shards and a tiny vocabulary: this test is about the resume
    torchrun("clip_t2i", *flags, "--output", str(tmp_path / "straight"))
    torchrun("clip_t2i", *flags, "--output", str(tmp_path / "split"), "--stop-at", "2")
    torchrun("clip_t2i", *flags, "--output", str(tmp_path / "split"), "--resume")
    straight, split = train_log(tmp_path / "straight"), train_log(tmp_path / "split")
    assert sorted(straight) == sorted(split) == [1, 2, 3, 4] and all(math.isfinite(v) for v in straight.values())
    for step in (3, 4):
        assert split[step] == pytest.approx(straight[step], abs=1e-5), (straight, split)
    assert (tmp_path / "straight" / "final" / "config.json").exists()


# ----------------------------------------------------------------------------- a resume continues the same run


def test_resume_refuses_other_shards_and_other_accumulation(tmp_path):
    import shutil

    import datasets

    paths = write_tars(_mkdir(tmp_path / "a"), 3, 4)

    def make(folder: str = "a", pattern: str = "*.tar", **kw) -> StreamLoader:
        return open_stream(str(tmp_path / folder / pattern), 2, **{"seed": 1, "shuffle_buffer": 3, **kw})

    whole = run(make(grad_accum_steps=2), 4)
    first = make(grad_accum_steps=2)
    head = run(first, 2)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["grad_accum_steps"] == 2
    assert state["sources"] == {"train": {"shards": [[os.path.basename(p), os.path.getsize(p)] for p in paths]}}
    shutil.copytree(tmp_path / "a", tmp_path / "moved")  # the same shards elsewhere resume, exactly
    moved = make("moved", grad_accum_steps=2)
    moved.load_state_dict(state)
    assert head + run(moved, 4) == whole
    old = {k: v for k, v in state.items() if k not in ("sources", "grad_accum_steps")}  # a state from before them
    again = make(grad_accum_steps=2)
    again.load_state_dict(old)
    assert head + run(again, 4) == whole

    write_tars(_mkdir(tmp_path / "added"), 4, 4)  # the same three shards and one more
    write_tars(_mkdir(tmp_path / "removed"), 2, 4)
    shutil.copytree(tmp_path / "a", tmp_path / "grown")
    with open(tmp_path / "grown" / "00001.tar", "ab") as f:
        f.write(b"\0" * 512)  # still a valid tar, 512 bytes longer
    size = os.path.getsize(paths[1])
    refused = {
        "added": "shards added 00003.tar",
        "removed": "shards removed 00002.tar",
        "grown": f"shards changed 00001.tar \\({size} -> {size + 512} bytes\\)",
    }
    for folder, message in refused.items():
        with pytest.raises(ValueError, match=f"streamed data differs from the checkpoint's: source 'train': {message}"):
            make(folder, grad_accum_steps=2).load_state_dict(state)
    with pytest.raises(ValueError, match="shards in another order"):
        make("a", "{00002,00000,00001}.tar", grad_accum_steps=2).load_state_dict(state)
    with pytest.raises(ValueError, match="saved with grad_accum_steps=2 .*this run has grad_accum_steps=1"):
        make().load_state_dict(state)

    # a datasets source records its length and fingerprint
    rows = [{"query": f"q{i}", "positive": f"p{i}"} for i in range(10)]
    ds = datasets.Dataset.from_list(rows)
    saved = open_stream(ds, 2).state_dict()
    assert saved["sources"] == {"train": {"rows": 10, "units": 1, "fingerprint": ds._fingerprint}}
    with pytest.raises(ValueError, match="source 'train' was .*'rows': 10.*now .*'rows': 11"):
        open_stream(datasets.Dataset.from_list(rows + rows[:1]), 2).load_state_dict(saved)


def _mkdir(path):
    path.mkdir()
    return path


def test_bad_shards_are_skipped_counted_and_resumed_with_skip_bad_shards(tmp_path, caplog):
    paths = write_tars(tmp_path, 3, 4, bad={0: "image"})  # samples 0..11, 4 per shard; sample 0's image is bad
    with tarfile.open(paths[1]) as tf:  # shard 1 (samples 4..7) breaks off inside sample 6's image
        cut = tf.getmember("000006.png").offset_data + 10
    with open(paths[1], "r+b") as f:
        f.truncate(cut)
    garbage = tmp_path / "00003.tar"
    garbage.write_bytes(b"\x01" * 2048)
    spec = str(tmp_path / "*.tar")
    with pytest.raises(ShardError, match=r"0000[13]\.tar"):
        run(open_stream(spec, 1, epochs=1), 100)
    with caplog.at_level(logging.WARNING):
        loader = open_stream(spec, 1, epochs=1, shuffle_buffer=100, skip_bad_shards=True)
        got = [t for _, batches, _ in run(loader, 100) for b in batches for t in b]
    # the samples read before shard 1 broke off (4, 5) stay; the garbage shard gives none
    assert sorted(got) == sorted(f"caption {i}" for i in (1, 2, 3, 4, 5, 8, 9, 10, 11))
    assert loader.bad_shards == 2 and loader.bad_rows == 1 and loader.read_skipped == 0
    assert f"bad shard {paths[1]}" in caplog.text and f"bad shard {garbage}" in caplog.text

    def make() -> StreamLoader:
        return open_stream(spec, 2, seed=3, epochs=2, shuffle_buffer=3, skip_bad_shards=True)

    straight = make()
    whole = run(straight, 100)
    assert len(whole) == 9 and straight.bad_shards == 4  # 9 good samples x 2 epochs / 2; 2 bad shards x 2 epochs
    mid_block = 0
    for stop in range(1, 9):  # resume after every step, some of them inside a block that read a bad shard
        first = make()
        head = run(first, stop)
        state = json.loads(json.dumps(first.state_dict()))
        mid_block += state["readers"][0]["train"]["block_bad"] > 0
        second = make()
        second.load_state_dict(state)
        assert head + run(second, 100) == whole and second.bad_shards == 4, stop
    assert mid_block
