"""Ragged data across ranks, end to end: clip_t2i (InfoNCE and SigLIP) and text_t2t.

The training file is built from the sampler's own draws so that at step 1 rank 0's rows have
hard negatives (some rows more than others, one none) and labels (two rows share one) while
rank 1's have neither, and at step 2 only rank 1's rows have negatives. A 2-rank torchrun run
must finish (before the losses agreed on optional inputs it hung in gloo) and log, step by
step, the same global-batch loss as one process on the same global batches (dropout off, so
the two runs see identical numbers). Both runs use ``--max-grad-norm 0`` (= no clipping):
with no weight decay the export must differ from the initial weights (0 passed to
``clip_grad_norm_`` zeroed every gradient and the run exported the unchanged model).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _recipes import load_script, rank_rows, torchrun, train_log
from _tiny_models import tiny_bert, tiny_siglip
from safetensors.torch import load_file

from vembed_blocks import demo as demo_data

clip_t2i = load_script("clip_t2i")
text_t2t = load_script("text_t2t")
B, STEPS = 6, 3  # rows per rank, steps per run


def make_ragged(rows: list[dict], path: Path) -> str:
    """Step 0: rank 0 has negatives (2, 1, 1, 0, 2, 1 per row) and labels, rank 1 nothing;
    step 1: rank 1 has negatives only."""
    (r0, r1), (_, s1) = rank_rows(len(rows), B, 0), rank_rows(len(rows), B, 1)
    assert not set(r0) & set(s1)
    rows = [dict(r) for r in rows]
    positives = [r["positive"] for r in rows]
    for k, i in enumerate(r0):
        count = (2, 1, 1, 0, 2, 1)[k]
        rows[i]["negatives"] = [positives[(i + 1 + j) % len(rows)] for j in range(count)]
        rows[i]["label"] = "shared" if k < 2 else f"label-{k}"
    for k, i in enumerate(s1):
        rows[i]["negatives"] = [positives[(i + 5) % len(rows)]] if k % 2 == 0 else []
    for r in rows:
        if not r.get("negatives"):
            r.pop("negatives", None)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert all("negatives" not in rows[i] and "label" not in rows[i] for i in r1)  # the seam is really there
    assert any("negatives" in rows[i] for i in r0) and all("label" in rows[i] for i in r0)
    return str(path)


def assert_same_losses(two_ranks: Path, one_process: Path) -> None:
    a, b = train_log(two_ranks), train_log(one_process)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=1e-5), (step, a, b)


def assert_trained(initial: dict[str, torch.Tensor], final: Path) -> None:
    moved = load_file(str(final / "model.safetensors"))
    assert max((moved[k].float() - v.float()).abs().max().item() for k, v in initial.items() if k in moved) > 1e-4


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("ragged_clip")
    train, _ = demo_data.render_demo(str(root), per_combo=1, seed=0)
    rows = [json.loads(line) for line in Path(train).read_text().splitlines()]
    words = sorted(
        {w for t in demo_data.TEMPLATES for w in t.replace(",", " ").split() if "{" not in w}
        | set(demo_data.SHAPES)
        | set(demo_data.COLOURS)
        | set(demo_data.POSITIONS)
    )
    return {
        "data": make_ragged(rows, root / "ragged.jsonl"),  # next to train.jsonl: same relative image paths
        "clip": demo_data.build_tiny_clip(str(root / "clip"), quick=True),
        "siglip": tiny_siglip(str(root / "siglip"), words),
    }


@pytest.mark.parametrize("loss,chunk,accum", [("infonce", "4", "1"), ("siglip", "0", "1"), ("infonce", "0", "2")])
def test_clip_ragged_two_ranks_equal_one_process(images, tmp_path, loss, chunk, accum):
    """InfoNCE through GradCache; SigLIP (hard negatives as negative-only columns) without; InfoNCE
    with 2 accumulated micro-batches per step (the ragged ones are then the first step's two)."""
    model = images["clip" if loss == "infonce" else "siglip"]
    run = [
        "--model",
        model,
        "--data",
        images["data"],
        "--loss",
        loss,
        "--chunk-size",
        chunk,
        "--max-steps",
        str(STEPS),
        "--max-grad-norm",
        "0",
        "--weight-decay",
        "0",
        "--lr",
        "1e-3",
        "--num-workers",
        "0",
        "--log-every",
        "1",
    ]
    torchrun("clip_t2i", *run, "--batch-size", str(B), "--output", str(tmp_path / "two"), timeout=240)
    clip_t2i.main([*run, "--batch-size", str(2 * B), "--output", str(tmp_path / "one")])
    assert_same_losses(tmp_path / "two", tmp_path / "one")
    assert_trained(load_file(str(Path(model) / "model.safetensors")), tmp_path / "one" / "final")


def test_text_ragged_two_ranks_equal_one_process(tmp_path):
    """InfoNCE with labels, no GradCache: rank 0 makes three forwards at step 1, rank 1 two."""
    colours, shapes, places = (
        "red green blue yellow".split(),
        "circle square triangle".split(),
        "left right top bottom".split(),
    )
    rows = [
        {"query": f"{c} {s} {p}", "positive": f"there is a {c} {s} at the {p}"}
        for c in colours
        for s in shapes
        for p in places
    ]
    data = make_ragged(rows, tmp_path / "ragged.jsonl")
    model = tiny_bert(str(tmp_path / "bert"), dropout=0.0)
    run = [
        "--model",
        model,
        "--data",
        data,
        "--max-steps",
        str(STEPS),
        "--max-grad-norm",
        "0",
        "--weight-decay",
        "0",
        "--lr",
        "2e-3",
        "--num-workers",
        "0",
        "--log-every",
        "1",
    ]
    torchrun("text_t2t", *run, "--batch-size", str(B), "--output", str(tmp_path / "two"), timeout=240)
    text_t2t.main([*run, "--batch-size", str(2 * B), "--output", str(tmp_path / "one")])
    assert_same_losses(tmp_path / "two", tmp_path / "one")
    assert_trained(load_file(str(Path(model) / "model.safetensors")), tmp_path / "one" / "final")
