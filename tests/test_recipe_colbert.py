"""recipes/colbert.py end to end: a tiny BERT (ColBERT) on 2 gloo ranks, a tiny Qwen3-VL (ColQwen) in-process.

- torchrun, 2 ranks, FSDP2 + GradCache on token outputs + ragged hard negatives + a 16-d
  projection: the loss drops on a memorisable toy task, MaxSim retrieval improves, a run split
  by --stop-at/--resume reproduces the later losses, and the export (HF folder + projection)
  reproduces the recipe's final MaxSim metrics when loaded with from_pretrained;
- plain python (world size 1), the VLM encoder detected from the config, Matryoshka token dims
  and activation checkpointing: the loss drops and the export loads;
- torchrun, 2 ranks, ragged across ranks (ColBERT and ColQwen): at step 1 rank 0 has hard negatives
  and string labels and rank 1 neither; the logged loss is one process's loss on the global batch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _recipes import assert_ragged_step0, load_script, ragged_rows, torchrun, train_log
from _tiny_models import tiny_bert, tiny_qwen3vl
from safetensors.torch import load_file
from test_recipe_qwen3 import shapes_dataset

from vembed_blocks import ColBERT, Matryoshka
from vembed_blocks.data import FixedNegatives

colbert = load_script("colbert")


def pets_dataset(root: Path) -> tuple[str, str]:
    """12 query/passage pairs (colour x cat/dog); train rows carry 0, 1 or 2 hard negatives."""
    sides = ["left", "right", "top", "bottom"]
    rows = [
        {"query": f"the {c} {a}", "positive": f"a photo of a {c} {a} at the {sides[(i + j) % 4]}"}
        for i, c in enumerate("red green blue yellow purple white".split())
        for j, a in enumerate(["cat", "dog"])
    ]
    val = [dict(r) for r in rows]
    for i, r in enumerate(rows):
        r["negatives"] = [rows[(i + 1 + j) % len(rows)]["positive"] for j in range(i % 3)]
    for name, part in (("train.jsonl", rows), ("val.jsonl", val)):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    return str(root / "train.jsonl"), str(root / "val.jsonl")


def common(model: str, train: str, val: str, out: Path, *extra: str) -> list[str]:
    return [
        "--model",
        model,
        "--data",
        train,
        "--val-data",
        val,
        "--output",
        str(out),
        "--batch-size",
        "6",
        "--chunk-size",
        "4",
        "--num-negatives",
        "1",
        "--dim",
        "16",
        "--lr",
        "3e-3",
        "--num-workers",
        "0",
        "--log-every",
        "1",
        *extra,
    ]


def test_torchrun_text_colbert_learns_resumes_and_exports(tmp_path):
    train, val = pets_dataset(tmp_path)
    bert = tiny_bert(str(tmp_path / "bert"))
    straight, split = tmp_path / "straight", tmp_path / "split"
    torchrun(
        "colbert", *common(bert, train, val, straight, "--max-steps", "6", "--save-every", "3", "--eval-every", "3")
    )
    torchrun("colbert", *common(bert, train, val, split, "--max-steps", "6", "--stop-at", "3"))
    assert not (split / "final").exists()
    torchrun("colbert", *common(bert, train, val, split, "--max-steps", "6", "--resume"))

    a, b = train_log(straight), train_log(split)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    assert max(a[5], a[6]) < a[1] - 0.5, a
    for step in (4, 5, 6):
        assert b[step] == pytest.approx(a[step], abs=1e-5), (step, a, b)
    metrics = json.loads((split / "metrics.json").read_text())
    assert metrics["after"]["mrr@10"] > metrics["before"]["mrr@10"] + 0.2, metrics
    assert (straight / "eval_log.jsonl").exists()

    # Export: BertModel + projection; MaxSim with them reproduces the recipe's final metrics.
    from transformers import AutoTokenizer, BertModel

    from vembed_blocks import TextCollator, maxsim, retrieval_metrics
    from vembed_blocks.embed import retrieval_set

    final = split / "final"
    meta = json.loads((final / "colbert.json").read_text())
    assert meta["encoder"] == "text" and meta["dim"] == 16
    model, proj = (
        BertModel.from_pretrained(final).eval(),
        load_file(str(final / "colbert_projection.safetensors"))["weight"],
    )
    collator = TextCollator(AutoTokenizer.from_pretrained(final), max_length=256)
    rs = retrieval_set(colbert.load_records(val, None))

    def tokens(items, is_query):
        x = collator.encode(items, is_query)
        with torch.no_grad():
            return F.normalize(model(**x).last_hidden_state @ proj.T, dim=-1), x["attention_mask"].bool()

    got = retrieval_metrics(maxsim(*tokens(rs.queries, True), *tokens(rs.docs, False)), rs.relevant, ks=(1, 5, 10))
    for name, value in metrics["after"].items():
        assert got[name] == pytest.approx(value, abs=1e-4), name


def test_single_process_colqwen_learns_and_exports(tmp_path):
    train, val = shapes_dataset(tmp_path)
    qwen = tiny_qwen3vl(str(tmp_path / "qwen"))
    out = tmp_path / "colqwen"
    result = colbert.main(
        common(
            qwen,
            train,
            val,
            out,
            "--max-steps",
            "4",
            "--mrl-dims",
            "16,8",
            "--grad-checkpointing",
            "--batch-size",
            "12",
            "--lr",
            "5e-3",
        )
    )  # one process: all 12 pairs every step
    losses = result["losses"]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.3, losses
    assert result["after"]["mrr@10"] > result["before"]["mrr@10"], result
    assert json.loads((out / "final" / "colbert.json").read_text())["encoder"] == "vlm"  # detected from the config

    from transformers import Qwen3VLModel

    Qwen3VLModel.from_pretrained(out / "final")
    assert load_file(str(out / "final" / "colbert_projection.safetensors"))["weight"].shape == (16, 32)


def one_process_loss(argv: list[str], records: list) -> float:
    """The recipe's loss on ``records`` (the global batch) in one process, before any update."""
    args = colbert.parse_args(argv)
    torch.manual_seed(args.seed)  # as main() does before building: the projection's initial weights
    parts = colbert.build(args, torch.device("cpu"))
    batch, k, b = FixedNegatives(parts.collator, args.num_negatives)(records), args.num_negatives, len(records)

    def encode(x: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return colbert.token_embeddings(args, parts, x), x["attention_mask"].bool()

    with torch.no_grad():
        (q, qm), (d, dm) = encode(batch["query"]), encode(batch["positive"])
        extra = {}
        if k:
            n, nm = encode(batch["negatives"])
            nm = nm.view(b, k, -1) & batch["negatives_mask"][..., None]  # a padded slot: no real token
            extra = {"negatives": n.view(b, k, n.shape[1], -1), "negatives_mask": nm}
        loss = ColBERT(temperature=args.temperature)
        if args.mrl_dims:
            loss = Matryoshka(loss, [int(d) for d in args.mrl_dims.split(",")])
        return loss(q, qm, d, dm, **extra).item()


def test_torchrun_ragged_negatives_and_labels(tmp_path):
    """At step 1 only rank 0 has hard negatives (0-2 a row) and string labels (which ColBERT does not
    use): text ColBERT with --num-negatives 2 and 0, and ColQwen with 2, finish with finite losses,
    and step 1's loss equals one process on the global batch. With 0 the data's negatives are left out
    and the recipe warns."""
    (tmp_path / "pets").mkdir()
    (tmp_path / "shapes").mkdir()
    runs = [
        ("pets", pets_dataset(tmp_path / "pets")[0], tiny_bert(str(tmp_path / "bert"), dropout=0.0), k) for k in (2, 0)
    ]
    runs.append(("shapes", shapes_dataset(tmp_path / "shapes")[0], tiny_qwen3vl(str(tmp_path / "qwen")), 2))
    for name, train, model, k in runs:
        rows = [json.loads(line) for line in Path(train).read_text().splitlines()]
        negative, label = (
            (lambda i, m: rows[(i + 4 + m) % len(rows)]["positive"]),
            (lambda i: rows[i]["query"].split()[1]),
        )
        ragged, step0 = ragged_rows(rows, 3, negative, label)  # label: the colour
        data = Path(train).with_name("ragged.jsonl")  # next to the images it may name
        data.write_text("".join(json.dumps(r) + "\n" for r in ragged))
        records = colbert.load_records(str(data), None)
        assert_ragged_step0(records, step0)  # the sampler really gives rank 0 all of them and rank 1 none at step 0
        out = tmp_path / f"{name}-k{k}"
        argv = [
            "--model",
            model,
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
            "--dim",
            "16",
            "--max-steps",
            "3",
            "--lr",
            "3e-3",
            "--num-workers",
            "0",
            "--log-every",
            "1",
        ]
        logs = torchrun("colbert", *argv, timeout=240, stderr=True)
        losses = train_log(out)
        assert sorted(losses) == [1, 2, 3] and all(map(math.isfinite, losses.values())), (name, k, losses)
        want = one_process_loss(argv, [records[i] for i in step0[0] + step0[1]])
        assert losses[1] == pytest.approx(want, abs=1e-4), (name, k, losses, want)
        assert ("--num-negatives is 0" in logs) == (k == 0), logs[-3000:]


def test_false_negative_rules_mask_and_log_their_counts(tmp_path):
    """Every --fn-* rule on (the guide: the same tiny BERT as a mean-pooled single-vector embedder, frozen),
    GradCache chunks, a fixed negative per row: one batch of 8 rows where rows 0 and 1 share a positive, so each
    step masks at least those 2 duplicates; the log counts every rule's masked candidates and the loss is finite."""
    train, _ = pets_dataset(tmp_path)
    rows = [json.loads(line) for line in Path(train).read_text().splitlines()[:8]]
    rows[1]["positive"] = rows[0]["positive"]
    data = tmp_path / "dup.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bert = tiny_bert(str(tmp_path / "bert"))
    fn = [
        "--fn-duplicates",
        "--fn-margin",
        "0.1",
        "--fn-weight",
        "0.5",
        "--fn-guide",
        bert,
        "--fn-guide-margin",
        "0.05",
    ]
    run = common(bert, str(data), train, tmp_path / "fn", "--batch-size", "8", "--max-steps", "2", *fn)
    del run[run.index("--val-data") : run.index("--val-data") + 2]  # no evaluation: the log is what is checked
    result = colbert.main(run)
    assert all(math.isfinite(x) for x in result["losses"])
    logged = [json.loads(line) for line in (tmp_path / "fn" / "train_log.jsonl").read_text().splitlines()]
    assert len(logged) == 2 and all(r["masked_duplicates"] >= 2 for r in logged), logged
    assert all(0 <= r[f"masked_{k}"] <= 8 * 15 for r in logged for k in ("margin", "guide")), logged  # 8 x 15 pairs
