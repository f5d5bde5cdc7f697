"""EmbedWriter / EmbedStore: values round-trip, lazy access, ids, crash repair and corrupt shards."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from torch.utils.data import DataLoader

from vembed_blocks.data import TaskBatches, WeightedTaskSampler
from vembed_blocks.data.embed_store import (
    EmbedStore,
    EmbedWriter,
    StoreError,
    collate_embeddings,
    ensure_meta,
    shard_name,
)


def _write(root, rank, world, n, shard_size, per_token=False, seed=0):
    """Records n_i = rank::world in shards of ``shard_size``; returns {id: {side: tensor}}."""
    g = torch.Generator().manual_seed(seed)
    writer, written = EmbedWriter(root, rank), {}
    mine = list(range(rank, n, world))
    for k in range(0, len(mine), shard_size):
        rows, emb = [], {"query": [], "positive": []}
        for n_i in mine[k : k + shard_size]:
            q = torch.randn(n_i % 3 + 1, 4, generator=g) if per_token else torch.randn(4, generator=g)
            p = torch.randn(4, generator=g)
            rows.append({"id": f"{n_i}.0", "n": n_i, "num_source_images": n_i % 3})
            emb["query"].append(q)
            emb["positive"].append(p)
            written[f"{n_i}.0"] = {"query": q, "positive": p}
        if not writer.is_done(k // shard_size):  # what a resumed extraction does
            writer.write(k // shard_size, rows, emb)
    return written


def test_roundtrip_two_ranks_ordered_by_source_position(tmp_path):
    written = {**_write(tmp_path, 0, 2, 11, 3), **_write(tmp_path, 1, 2, 11, 3)}
    store = EmbedStore(tmp_path)
    assert len(store) == 11 and store.ids == [f"{i}.0" for i in range(11)]
    assert store.sides == ("positive", "query")
    assert store.groups.tolist() == [i % 3 for i in range(11)]
    for i, rid in enumerate(store.ids):
        for side in ("query", "positive"):
            assert torch.equal(store[i][side], written[rid][side])
            assert torch.equal(store.get(rid)[side], written[rid][side])
    assert store.info(4)["shard"] == shard_name(0, 0) and store.info(4)["row"] == 2
    batch = collate_embeddings([store[0], store[1]])
    assert batch["query"].shape == (2, 4)


def test_per_token_is_ragged_and_collates_with_mask(tmp_path):
    written = _write(tmp_path, 0, 1, 5, 2, per_token=True)
    store = EmbedStore(tmp_path)
    for rid, emb in written.items():
        assert torch.equal(store.get(rid)["query"], emb["query"])
    batch = collate_embeddings([store[i] for i in range(5)])
    assert batch["query"].shape == (5, 3, 4) and batch["query_mask"].sum(1).tolist() == [1, 2, 3, 1, 2]
    assert torch.equal(batch["query"][1, :2], written["1.0"]["query"]) and batch["query"][0, 1:].abs().sum() == 0


def test_missing_id_names_the_id_and_the_store(tmp_path):
    _write(tmp_path, 0, 1, 3, 2)
    store = EmbedStore(tmp_path)
    with pytest.raises(KeyError, match=r"'nope'.*" + str(tmp_path).replace("\\", "\\\\")):
        store.get("nope")
    with pytest.raises(IndexError):
        store[3]


def test_store_pickles_and_feeds_task_batches(tmp_path):
    for name in ("a", "b"):
        _write(tmp_path / name, 0, 1, 6, 4, seed=len(name))
    tasks = {name: EmbedStore(tmp_path / name) for name in ("a", "b")}
    tasks["a"][0]  # open a file handle: the pickled copy must not carry it
    clone = pickle.loads(pickle.dumps(tasks["a"]))
    assert torch.equal(clone[5]["query"], tasks["a"][5]["query"])
    sampler = WeightedTaskSampler(
        {k: len(v) for k, v in tasks.items()}, 2, {"a": 1, "b": 1}, seed=3, rank=0, world_size=1
    )
    loader = DataLoader(TaskBatches(tasks, sampler, collate_embeddings, steps=4), batch_size=None, num_workers=2)
    items = list(loader)
    plain = list(TaskBatches(tasks, sampler, collate_embeddings, steps=4))
    assert [it["task"] for it in items] == [it["task"] for it in plain]
    for a, b in zip(items, plain):
        assert torch.equal(a["batch"]["query"], b["batch"]["query"])


def test_writer_repairs_interrupted_appends_and_is_resumable(tmp_path):
    _write(tmp_path, 0, 1, 7, 3)  # shards 0, 1 (3 rows) and 2 (1 row)
    index = tmp_path / "index-00000.jsonl"
    lines = index.read_text().splitlines(keepends=True)
    # crash mid-append of shard 1: one full line of it and half of the next; plus a stale temp file
    index.write_text("".join(lines[:4]) + lines[4][:10])
    (tmp_path / f".{shard_name(0, 5)}.tmp").write_bytes(b"partial")
    with pytest.raises(StoreError, match="truncated line"):
        EmbedStore(tmp_path)
    assert len(EmbedStore(tmp_path, strict=False)) == 3  # only shard 0 is complete
    writer = EmbedWriter(tmp_path, 0)
    assert [writer.is_done(k) for k in range(3)] == [True, False, False]
    assert index.read_text() == "".join(lines[:3])  # the partial tail was dropped, atomically
    assert not (tmp_path / f".{shard_name(0, 5)}.tmp").exists()
    written = _write(tmp_path, 0, 1, 7, 3)  # the rerun writes shards 1 and 2 only
    store = EmbedStore(tmp_path)
    assert store.ids == [f"{i}.0" for i in range(7)]
    assert torch.equal(store.get("6.0")["query"], written["6.0"]["query"])
    with pytest.raises(ValueError, match="already written"):
        EmbedWriter(tmp_path, 0).write(0, [{"id": "0.0"}], {"query": [torch.zeros(4)]})


def test_writer_rerun_skips_done_shards_without_duplicating(tmp_path):
    _write(tmp_path, 0, 1, 4, 2)
    writer = EmbedWriter(tmp_path, 0)
    assert writer.is_done(0) and writer.is_done(1) and writer.records_done == 4
    assert len(EmbedStore(tmp_path)) == 4


def test_corrupt_missing_and_mismatched_shards(tmp_path):
    _write(tmp_path, 0, 1, 6, 2)
    path = tmp_path / shard_name(0, 1)
    data = path.read_bytes()
    path.write_bytes(data[:-7])  # truncated: the header no longer covers the file
    with pytest.raises(StoreError, match=rf"{shard_name(0, 1)}: unreadable shard"):
        EmbedStore(tmp_path)
    assert EmbedStore(tmp_path, strict=False).ids == ["0.0", "1.0", "4.0", "5.0"]
    os.remove(path)
    with pytest.raises(StoreError, match="missing or incompletely indexed"):
        EmbedStore(tmp_path)
    # a shard overwritten by another extraction: its ids no longer match the index
    _write(tmp_path / "other", 0, 1, 6, 2, seed=1)
    os.replace(tmp_path / "other" / shard_name(0, 2), tmp_path / shard_name(0, 1))
    with pytest.raises(StoreError, match="does not match its index"):
        EmbedStore(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="no index"):
        EmbedStore(tmp_path / "empty")


def test_duplicate_ids_and_meta_mismatch(tmp_path):
    _write(tmp_path, 0, 1, 3, 2)
    _write(tmp_path, 1, 1, 3, 2)  # a second "rank" with the same records: a wrong world size
    with pytest.raises(StoreError, match="duplicate record ids"):
        EmbedStore(tmp_path)
    ensure_meta(tmp_path / "m", {"world_size": 2, "options": {"inverse": True}})
    ensure_meta(tmp_path / "m", {"world_size": 2, "options": {"inverse": True}})
    with pytest.raises(StoreError, match="other settings"):
        ensure_meta(tmp_path / "m", {"world_size": 3, "options": {"inverse": True}})
    assert json.loads((tmp_path / "m" / "meta.json").read_text())["world_size"] == 2
