"""recipes/qwen3_fsdp.py --tasks: one policy per task (issue 27), on 2 gloo ranks with FSDP2 and GradCache.

Two tasks of a tiny random Qwen3-VL: "caption" (text -> image retrieval, 3 rows a rank, in-batch negatives on,
T = 0.05) and "colour" (image -> its colour's name, 2 rows a rank, in-batch negatives off, T = 0.1, its own
instruction, Matryoshka widths 32 and 16); both with 0-2 hard negatives a row (ragged within and across ranks,
padded to 2 and masked). Checked against references written here:
- the task of every step is the sampler's draw with per-task batch sizes, and every loss is finite;
- the first step's loss (a colour step) equals the in-batch-off loss of the global batch computed in one process:
  per row, cross-entropy of [own positive, own real negatives] at each width, summed over widths, averaged;
- a run stopped at step 3 and resumed logs the uninterrupted run's losses at steps 4-6;
- a fault on one rank: step 1's colour row on rank 1 has a broken image and --skip-bad drops it there alone, so
  that rank encodes fewer rows and GradCache chunks (FSDP2 needs as many collectives: the run must not hang);
  the loss is the in-batch-off mean over the three rows left;
- metrics.json holds per-task metrics and per-width ones; the colour accuracy equals one recomputed from the
  exported folder with the task's instruction; vlm_embedding.json records each task's instructions.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _recipes import load_script, torchrun, train_log
from _tiny_models import tiny_qwen3vl
from test_recipe_qwen3 import COLOURS, shapes_dataset

from vembed_blocks.data import WeightedTaskSampler

qwen3 = load_script("qwen3_fsdp")
BATCH = {"caption": 3, "colour": 2}
SEED = 9  # steps colour, colour, caption, colour, caption, colour: both tasks before and after step 3


def colour_rows(root: Path) -> str:
    names = list(COLOURS)
    rows = [
        {"query_image": f"{c}_{s}.png", "positive": c, "negatives": [names[(i + 1 + m) % 6] for m in range(i % 3)]}
        for i, c in enumerate(names)
        for s in ("circle", "square")
    ]
    (root / "colour.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(root / "colour.jsonl")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("qwen3_tasks")
    train, val = shapes_dataset(root)
    colour = colour_rows(root)
    caption = dict(name="caption", data=train, val_data=val, batch_size=3, num_negatives=2)
    classify = dict(name="colour", data=colour, val_data=colour, batch_size=2, in_batch_negatives=False)
    classify.update(temperature=0.1, num_negatives=2, query_instruction="the colour", mrl_dims=[32, 16])
    (root / "tasks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (caption, classify)))
    rows = [json.loads(line) for line in Path(colour).read_text().splitlines()]
    rows[first_step_rows()[2]]["query_image"] = "broken.png"  # rank 1's first row at step 1
    (root / "broken.png").write_bytes(b"not a png")
    (root / "colour_bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    classify["data"] = str(root / "colour_bad.jsonl")
    (root / "tasks_bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (caption, classify)))
    out = {"tasks": str(root / "tasks.jsonl"), "tasks_bad": str(root / "tasks_bad.jsonl"), "colour": colour}
    return {**out, "model": tiny_qwen3vl(str(root / "model"))}


def argv(setup: dict, out: Path, *extra: str, tasks: str = "tasks") -> list[str]:
    flags = ["--model", setup["model"], "--tasks", setup[tasks], "--output", str(out), "--seed", str(SEED)]
    flags += ["--chunk-size", "2", "--max-steps", "6", "--lr", "3e-3", "--num-workers", "0", "--log-every", "1"]
    return [*flags, *extra]


def drawn_tasks(steps: int) -> list[str]:
    sampler = WeightedTaskSampler({"caption": 12, "colour": 12}, BATCH, {"caption": 1, "colour": 1}, seed=SEED)
    return [next(sampler)[0] for _ in range(steps)]


def first_step_rows() -> list[int]:
    """The colour rows of both ranks at step 0, rank 0's first."""
    rows = []
    for rank in range(2):
        sampler = WeightedTaskSampler({"caption": 12, "colour": 12}, BATCH, {"caption": 1, "colour": 1}, SEED, rank, 2)
        task, mine = next(sampler)
        assert task == "colour" and len(mine) == 2
        rows += mine
    return rows


def colour_loss_by_hand(model_dir: str, colour_file: str, rows: list[int]) -> float:
    """The in-batch-off loss of the global batch, written out: float64 cosines of each row's query with its
    positive and its real negatives, / T, cross-entropy to the positive, summed over widths 32 and 16."""
    from transformers import AutoModel

    from vembed_blocks.data import VLMCollator, read_records
    from vembed_blocks.vlm import load_vlm_processor, vlm_embed

    records = [list(read_records(colour_file))[i] for i in rows]
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    collator = VLMCollator(load_vlm_processor(model_dir), "the colour", "Represent the user's input.", 1024)
    with torch.no_grad():
        q = vlm_embed(model, collator.encode([r.query for r in records], True)).double()
        p = vlm_embed(model, collator.encode([r.positive for r in records], False)).double()
        negs = [
            vlm_embed(model, collator.encode(r.negatives, False)).double() if r.negatives else None for r in records
        ]
    total = 0.0
    for d in (32, 16):
        for i in range(len(records)):
            cand = [p[i, :d]] + ([] if negs[i] is None else list(negs[i][:, :d]))
            cos = torch.stack([F.cosine_similarity(q[i, :d], c, dim=0) for c in cand]) / 0.1
            total += float(torch.logsumexp(cos, 0) - cos[0]) / len(records)
    return total


def test_two_tasks_on_two_ranks_follow_their_policies_and_resume_exactly(setup, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    logs = torchrun("qwen3_fsdp", *argv(setup, straight, "--save-every", "3"), timeout=300, stderr=True)
    torchrun("qwen3_fsdp", *argv(setup, split, "--stop-at", "3"), timeout=300)
    torchrun("qwen3_fsdp", *argv(setup, split, "--resume"), timeout=300)

    logged = [json.loads(line) for line in (straight / "train_log.jsonl").read_text().splitlines()]
    want_tasks = drawn_tasks(6)
    assert [r["task"] for r in logged] == want_tasks and set(want_tasks) == {"caption", "colour"}, logs[-2000:]
    assert all(math.isfinite(r["loss"]) for r in logged), logged
    want = colour_loss_by_hand(setup["model"], setup["colour"], first_step_rows())
    assert logged[0]["loss"] == pytest.approx(want, abs=1e-4), (logged[0], want)
    a, b = train_log(straight), train_log(split)
    for step in (4, 5, 6):
        assert b[step] == pytest.approx(a[step], abs=1e-5), (step, a, b)

    metrics = json.loads((straight / "metrics.json").read_text())
    for side in ("before", "after"):
        keys = set(metrics[side])
        assert {"caption/recall@1", "colour/recall@1", "colour/dim16/recall@1", "colour/dim32/recall@1"} <= keys
        assert not any(k.startswith("caption/dim") for k in keys)  # the caption task has no widths
    spec = json.loads((straight / "final" / "vlm_embedding.json").read_text())
    assert spec["tasks"]["colour"]["query_instruction"] == "the colour"
    assert spec["tasks"]["colour"]["mrl_dims"] == [32, 16] and spec["tasks"]["caption"]["mrl_dims"] == []
    assert colour_accuracy(straight / "final", setup["colour"]) == pytest.approx(
        [metrics["after"]["colour/recall@1"], metrics["after"]["colour/dim16/recall@1"]], abs=1e-6
    )


def test_a_row_dropped_on_one_rank_alone_neither_hangs_nor_biases_the_loss(setup, tmp_path):
    out = tmp_path / "bad"
    logs = torchrun("qwen3_fsdp", *argv(setup, out, "--skip-bad", "--max-steps", "2", tasks="tasks_bad"), stderr=True)
    logged = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert "dropped a bad row" in logs and [r["bad_rows"] for r in logged] == [1, 1], logged
    left = [i for k, i in enumerate(first_step_rows()) if k != 2]
    want = colour_loss_by_hand(setup["model"], setup["colour"], left)
    assert logged[0]["loss"] == pytest.approx(want, abs=1e-4), (logged[0], want)


def colour_accuracy(final: Path, colour_file: str) -> list[float]:
    """Top-1 accuracy over the 6 colour names, full width and the first 16 dimensions, from the export."""
    from transformers import AutoModel

    from vembed_blocks.data import VLMCollator, read_records
    from vembed_blocks.vlm import load_vlm_processor, vlm_embed

    records = list(read_records(colour_file))
    model = AutoModel.from_pretrained(str(final)).eval()
    collator = VLMCollator(load_vlm_processor(str(final)), "the colour", "Represent the user's input.", 1024)
    names = list(COLOURS)
    with torch.no_grad():
        q = vlm_embed(model, collator.encode([r.query for r in records], True)).double()
        d = vlm_embed(model, collator.encode([type(records[0].positive)(text=n) for n in names], False)).double()
    out = []
    for width in (q.shape[1], 16):
        scores = F.normalize(q[:, :width], dim=-1) @ F.normalize(d[:, :width], dim=-1).T
        out.append(sum(names[int(s.argmax())] == r.positive.text for s, r in zip(scores, records)) / len(records))
    return out
