"""recipes/qwen3_fsdp.py end to end on a tiny random Qwen3-VL.

- torchrun, 2 gloo ranks, FSDP2 + GradCache (VLM chunks, some without images) + checkpointing +
  Matryoshka on edit-format rows: the loss drops on a memorisable toy task, retrieval
  improves, a run split by --stop-at/--resume reproduces the later losses, and the exported
  folder loads with from_pretrained and reproduces the recipe's final metrics;
- plain python (world size 1) with LoRA and ragged hard negatives: the export has the adapters merged;
- torchrun, 2 ranks, ragged across ranks: at step 1 rank 0 has hard negatives and string labels and
  rank 1 neither; the logged loss is one process's loss on the global batch (--num-negatives 2 and 0).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _recipes import assert_ragged_step0, load_script, ragged_rows, torchrun, train_log
from _tiny_models import tiny_qwen3vl
from PIL import Image

qwen3 = load_script("qwen3_fsdp")

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 190),
    "white": (245, 245, 245),
}


def shapes_dataset(root: Path) -> tuple[str, str]:
    """12 captioned images (colour x circle/square); train rows carry 0, 1 or 2 hard negatives."""
    rows = []
    yy, xx = np.mgrid[:48, :48]
    for colour, rgb in COLOURS.items():
        for shape in ("circle", "square"):
            img = np.full((48, 48, 3), 90, np.uint8)
            inside = (
                (abs(yy - 24) < 12) & (abs(xx - 24) < 12)
                if shape == "square"
                else (yy - 24) ** 2 + (xx - 24) ** 2 < 140
            )
            img[inside] = rgb
            Image.fromarray(img).save(root / f"{colour}_{shape}.png")
            rows.append({"query": f"a {colour} {shape}", "positive": f"{colour}_{shape}.png"})
    val = [dict(r) for r in rows]
    for i, r in enumerate(rows):
        r["negatives"] = [rows[(i + 1 + j) % len(rows)]["positive"] for j in range(i % 3)]
    for name, part in (("train.jsonl", rows), ("val.jsonl", val)):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    return str(root / "train.jsonl"), str(root / "val.jsonl")


def edit_dataset(root: Path) -> str:
    """The same 12 targets in the edit format; every third query also shows the other shape of its
    colour, so with small chunks some ranks' chunks have images and others' none."""
    rows = [
        {
            "source_image": f"{c}_{'square' if s == 'circle' else 'circle'}.png" if (i + j) % 3 == 0 else None,
            "target_image": f"{c}_{s}.png",
            "instruction": f"a {c} {s}",
        }
        for i, c in enumerate(COLOURS)
        for j, s in enumerate(("circle", "square"))
    ]
    (root / "edit.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(root / "edit.jsonl")


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("qwen3")
    train, val = shapes_dataset(root)
    return {"train": train, "val": val, "edit": edit_dataset(root), "model": tiny_qwen3vl(str(root / "model"))}


def common(toy: dict[str, str], out: Path, *extra: str, data: str = "train") -> list[str]:
    return [
        "--model",
        toy["model"],
        "--data",
        toy[data],
        "--val-data",
        toy[data],
        "--output",
        str(out),
        "--batch-size",
        "6",
        "--chunk-size",
        "4",
        "--num-negatives",
        "1",
        "--lr",
        "3e-3",
        "--num-workers",
        "0",
        "--log-every",
        "1",
        *extra,
    ]


def test_torchrun_fsdp_learns_resumes_and_exports(toy, tmp_path):
    # Edit-format rows (images on some queries only) and chunks of 2: ranks disagree on whether a
    # chunk runs the vision tower, which FSDP2 must survive. Hard negatives: the LoRA test below.
    straight, split = tmp_path / "straight", tmp_path / "split"
    flags = [
        "--max-steps",
        "6",
        "--grad-checkpointing",
        "--mrl-dims",
        "32,16",
        "--chunk-size",
        "2",
        "--num-negatives",
        "0",
    ]
    torchrun("qwen3_fsdp", *common(toy, straight, *flags, "--save-every", "3", "--eval-every", "3", data="edit"))
    torchrun("qwen3_fsdp", *common(toy, split, *flags, "--stop-at", "3", data="edit"))
    assert not (split / "final").exists()
    torchrun("qwen3_fsdp", *common(toy, split, *flags, "--resume", data="edit"))

    a, b = train_log(straight), train_log(split)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    assert a[6] < a[1] - 0.3, a  # learnable: 12 pairs seen every step
    for step in (4, 5, 6):
        assert b[step] == pytest.approx(a[step], abs=1e-5), (step, a, b)
    metrics = json.loads((straight / "metrics.json").read_text())
    assert metrics["after"]["mrr@10"] > metrics["before"]["mrr@10"], metrics
    evals = [json.loads(line) for line in (straight / "eval_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [3] and 0 < evals[0]["loss"] < 20  # validation loss (FSDP2, 2 ranks)

    # The export is a plain Qwen3VLModel folder; embedding val with it reproduces the recipe's metrics.
    from transformers import Qwen3VLModel

    from vembed_blocks import VLMCollator, retrieval_metrics
    from vembed_blocks.embed import retrieval_set
    from vembed_blocks.vlm import load_vlm_processor, vlm_embed

    model = Qwen3VLModel.from_pretrained(split / "final").eval()
    collator = VLMCollator(load_vlm_processor(str(split / "final")))
    rs = retrieval_set(qwen3.load_records(toy["edit"], None))
    with torch.no_grad():
        q = F.normalize(vlm_embed(model, collator.encode(rs.queries, True)), dim=-1)
        d = F.normalize(vlm_embed(model, collator.encode(rs.docs, False)), dim=-1)
    got = retrieval_metrics(q @ d.T, rs.relevant, ks=(1, 5, 10))
    after = json.loads((split / "metrics.json").read_text())["after"]
    assert {"dim32/recall@1", "dim16/recall@1"} <= set(after)  # --mrl-dims 32,16: the metrics at each width too
    for name, value in after.items():
        if name.startswith("dim16/"):  # the first 16 dimensions, renormalised
            q16, d16 = F.normalize(q[:, :16], dim=-1), F.normalize(d[:, :16], dim=-1)
            got16 = retrieval_metrics(q16 @ d16.T, rs.relevant, ks=(1, 5, 10))
            assert got16[name.split("/", 1)[1]] == pytest.approx(value, abs=1e-4), name
        else:  # the full width (32: the model's) under both names
            assert got[name.split("/", 1)[-1]] == pytest.approx(value, abs=1e-4), name


def test_single_process_lora_merges_into_the_export(toy, tmp_path):
    out = tmp_path / "lora"
    result = qwen3.main(common(toy, out, "--max-steps", "2", "--lora", "4", "--lr", "1e-2"))  # with real hard negatives
    assert len(result["losses"]) == 2 and "after" in result

    from safetensors.torch import load_file
    from transformers import Qwen3VLModel

    exported = load_file(str(out / "final" / "model.safetensors"))
    assert not any("lora" in k for k in exported)
    base = load_file(str(Path(toy["model"]) / "model.safetensors"))
    key = next(k for k in base if k.endswith("self_attn.q_proj.weight"))
    assert not torch.equal(exported[key], base[key])  # the adapter was folded into the weight
    Qwen3VLModel.from_pretrained(out / "final")


def one_process_loss(argv: list[str], records: list) -> float:
    """The recipe's loss on ``records`` (the global batch) in one process, before any update."""
    from transformers import AutoModel

    from vembed_blocks import InfoNCE, Matryoshka, VLMCollator
    from vembed_blocks.data import FixedNegatives
    from vembed_blocks.vlm import load_vlm_processor, vlm_embed

    args = qwen3.parse_args(argv)
    model = AutoModel.from_pretrained(args.model, dtype=torch.float32).eval()
    collator = VLMCollator(
        load_vlm_processor(args.model),
        query_instruction=args.query_instruction,
        doc_instruction=args.doc_instruction,
        max_image_side=args.max_image_side,
    )
    batch, k = FixedNegatives(collator, args.num_negatives)(records), args.num_negatives
    with torch.no_grad():
        q, p = vlm_embed(model, batch["query"]), vlm_embed(model, batch["positive"])
        extra = {"labels": batch["labels"]} if "labels" in batch else {}
        if k:
            negatives = vlm_embed(model, batch["negatives"]).view(len(records), k, -1)
            extra.update(negatives=negatives, negatives_mask=batch["negatives_mask"])
        loss = InfoNCE(temperature=args.temperature)
        if args.mrl_dims:
            loss = Matryoshka(loss, [int(d) for d in args.mrl_dims.split(",")])
        return loss(q, p, **extra).item()


def test_torchrun_fsdp_ragged_negatives_and_labels(toy, tmp_path):
    """At step 1 only rank 0 has hard negatives (0-2 a row) and string labels: the FSDP2 run finishes,
    every loss is finite, and step 1's loss equals one process on the global batch. With
    --num-negatives 0 the data's negatives are left out (the recipe warns) and the labels still count."""
    rows = [json.loads(line) for line in Path(toy["train"]).read_text().splitlines()]
    negative, label = (lambda i, m: rows[(i + 4 + m) % len(rows)]["positive"]), (lambda i: rows[i]["query"].split()[1])
    ragged, step0 = ragged_rows(rows, 3, negative, label)  # label: the colour
    data = Path(toy["train"]).with_name("ragged.jsonl")  # next to the images it names
    data.write_text("".join(json.dumps(r) + "\n" for r in ragged))
    records = qwen3.load_records(str(data), None)
    assert_ragged_step0(records, step0)  # the sampler really gives rank 0 all of them and rank 1 none at step 0
    for k in (2, 0):
        out = tmp_path / f"k{k}"
        argv = [
            "--model",
            toy["model"],
            "--data",
            str(data),
            "--output",
            str(out),
            "--batch-size",
            "3",
            "--chunk-size",
            "2",
            "--num-negatives",
            str(k),
            "--max-steps",
            "3",
            "--lr",
            "3e-3",
            "--num-workers",
            "0",
            "--log-every",
            "1",
        ]
        logs = torchrun("qwen3_fsdp", *argv, timeout=240, stderr=True)
        losses = train_log(out)
        assert sorted(losses) == [1, 2, 3] and all(map(math.isfinite, losses.values())), losses
        want = one_process_loss(argv, [records[i] for i in step0[0] + step0[1]])
        assert losses[1] == pytest.approx(want, abs=1e-4), (k, losses, want)
        assert ("--num-negatives is 0" in logs) == (k == 0), logs[-3000:]


def test_false_negative_rules_mask_and_log_their_counts(toy, tmp_path):
    """Every --fn-* rule on (the guide: the same tiny Qwen3-VL, frozen), GradCache chunks, a fixed negative per
    row: one batch of 8 rows where rows 0 and 1 share a positive image, so each step masks at least those 2
    duplicates; the log counts every rule's masked candidates per step and the loss stays finite."""
    rows = [json.loads(line) for line in Path(toy["train"]).read_text().splitlines()[:8]]
    rows[1]["positive"] = rows[0]["positive"]
    data = Path(toy["train"]).with_name("dup.jsonl")
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fn = ["--fn-duplicates", "--fn-margin", "0.1", "--fn-weight", "0.5", "--fn-guide", toy["model"]]
    run = common(toy, tmp_path / "fn", "--data", str(data), "--batch-size", "8", "--max-steps", "2", *fn)
    del run[run.index("--val-data") : run.index("--val-data") + 2]  # no evaluation: the log is what is checked
    result = qwen3.main([*run, "--fn-guide-margin", "0.05"])
    assert all(math.isfinite(x) for x in result["losses"])
    logged = [json.loads(line) for line in (tmp_path / "fn" / "train_log.jsonl").read_text().splitlines()]
    assert len(logged) == 2 and all(r["masked_duplicates"] >= 2 for r in logged), logged
    assert all(0 <= r[f"masked_{k}"] <= 8 * 15 for r in logged for k in ("margin", "guide")), logged  # 8 x 15 pairs
