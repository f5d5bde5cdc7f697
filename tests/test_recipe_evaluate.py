"""recipes/evaluate.py on every family's export, label relevance, and image-only towers end to end.

- `retrieval_set_by_label` on a hand-built file: corpus, labels, self rows and relevance sets as worked
  out by hand, metrics of a hand-made score matrix equal to hand-computed numbers (the query's own
  item excluded), `evaluate_retrieval_by` against a float64 ranking written here, and bad input (no
  label, two labels) named by file:line; evaluate.py's --help and its flag / data / folder errors.
- evaluate.py on a 2-step export of each family (CLIP demo, text_t2t, qwen3_fsdp, ColBERT, ColQwen): metrics
  equal the recipe's own final metrics (abs 1e-6); topk.jsonl equals a float64 ranking of the saved
  embeddings; the recall curve matches recall@k; TeacherStore reads the text family's files; report.md.
- torchrun, 2 ranks, on the ColBERT export: the same metrics and embeddings as one process.
- image-only towers (their block is tested in test_towers.py): a DINOv2 without a text model trains with
  clip_t2i --format i2i, loads through load_encoder (image vectors = the exported tower's; text refused),
  and evaluate.py's label metrics (every image against all others) equal a float64 reference written here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _recipes import load_script, torchrun
from _tiny_models import tiny_bert, tiny_qwen3vl
from PIL import Image
from safetensors.torch import load_file
from test_encoder import maxsim64, run_recipe
from test_recipe_colbert import pets_dataset
from test_recipe_qwen3 import shapes_dataset
from test_towers import tiny_dinov2

from vembed_blocks.data import DualEncoderCollator, Item, load_records
from vembed_blocks.embed import evaluate_retrieval_by, retrieval_set, retrieval_set_by_label, self_excluded_scores
from vembed_blocks.encoder import load_encoder
from vembed_blocks.metrics import retrieval_metrics
from vembed_blocks.teacher_store import TeacherStore
from vembed_blocks.towers import load_dual_encoder

evaluate = load_script("evaluate")


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ----------------------------------------------------------------------------- label relevance by hand


def label_metrics64(q, d, q_labels, d_labels, self_doc, ks=(1, 5, 10)) -> dict[str, float]:
    """recall@k / mrr@10 by float64 cosine, relevant = same label; query i never sees corpus row self_doc[i]."""
    q = q.double() / q.double().norm(dim=1, keepdim=True)
    d = d.double() / d.double().norm(dim=1, keepdim=True)
    scores = q @ d.T
    out = {f"recall@{k}": 0.0 for k in ks} | {"mrr@10": 0.0}
    for i in range(len(q)):
        others = sorted((j for j in range(len(d)) if j != self_doc[i]), key=lambda j: (-scores[i, j].item(), j))
        hits = [d_labels[j] == q_labels[i] for j in others]
        for k in ks:
            out[f"recall@{k}"] += sum(hits[:k]) / sum(hits) / len(q)
        first = next((r for r, h in enumerate(hits[:10]) if h), None)
        out["mrr@10"] += (0.0 if first is None else 1 / (first + 1)) / len(q)
    return out


LABEL_ROWS = [
    {"query": "a", "positive": "b", "label": "X"},
    {"query": "b", "positive": "a", "label": "X"},
    {"query": "c", "positive": "d", "label": "Y", "negatives": ["e"]},
    {"query": "d", "positive": "f", "label": "Y"},
    {"query": "a", "positive": "g", "label": "X"},  # a repeated query: one query, two positives
]


def test_label_relevance_excludes_the_query_itself_hand_computed(tmp_path):
    rs = retrieval_set_by_label(load_records(write_jsonl(tmp_path / "x.jsonl", LABEL_ROWS), format="t2t"))
    # Corpus: positives in first-appearance order, then the unlabelled negative.
    assert [d.text for d in rs.docs] == ["b", "a", "d", "f", "g", "e"]
    assert rs.doc_labels == ["X", "X", "Y", "Y", "X", None]
    assert [q.text for q in rs.queries] == ["a", "b", "c", "d"] and rs.query_labels == ["X", "X", "Y", "Y"]
    assert rs.self_doc == [1, 0, None, 2]
    assert rs.relevant == [{0, 4}, {1, 4}, {2, 3}, {3}]

    #           b    a    d    f    g    e        (each query's own item scores highest)
    scores = torch.tensor(
        [
            [0.5, 0.9, 0.7, 0.1, 0.2, 0.3],  # a: d b e g f -> relevant b@2, g@4
            [0.9, 0.4, 0.8, 0.6, 0.1, 0.0],  # b: d f a g e -> relevant a@3, g@4
            [0.1, 0.2, 0.3, 0.9, 0.4, 0.5],  # c: f e g d a b -> relevant f@1, d@4
            [0.8, 0.1, 0.9, 0.2, 0.3, 0.4],  # d: b e g f a -> relevant f@4
        ]
    )
    got = retrieval_metrics(self_excluded_scores(rs, scores), rs.relevant, ks=(1, 3, 10))
    lg = lambda r: 1 / math.log2(r + 1)
    want_recall1 = (0 + 0 + 0.5 + 0) / 4
    want_recall3 = (0.5 + 0.5 + 0.5 + 0) / 4
    want_mrr = (1 / 2 + 1 / 3 + 1 + 1 / 4) / 4
    want_ndcg = (
        (lg(2) + lg(4)) / (lg(1) + lg(2))
        + (lg(3) + lg(4)) / (lg(1) + lg(2))
        + (lg(1) + lg(4)) / (lg(1) + lg(2))
        + lg(4) / lg(1)
    ) / 4
    want_map = ((1 / 2 + 2 / 4) / 2 + (1 / 3 + 2 / 4) / 2 + (1 + 2 / 4) / 2 + 1 / 4) / 4
    assert got["recall@1"] == pytest.approx(want_recall1, abs=1e-12)
    assert got["recall@3"] == pytest.approx(want_recall3, abs=1e-12)
    assert got["recall@10"] == pytest.approx(1.0, abs=1e-12)
    assert got["mrr@10"] == pytest.approx(want_mrr, abs=1e-12)
    assert got["ndcg@10"] == pytest.approx(want_ndcg, abs=1e-12)
    assert got["map@10"] == pytest.approx(want_map, abs=1e-12)

    # --queries-in-corpus: each row adds its positive, then its query (c, label Y, after d); c is its own row.
    rs = retrieval_set_by_label(load_records(str(tmp_path / "x.jsonl"), format="t2t"), queries_in_corpus=True)
    assert [d.text for d in rs.docs] == ["b", "a", "d", "c", "f", "g", "e"]
    assert rs.self_doc == [1, 0, 3, 2] and rs.relevant == [{0, 5}, {1, 5}, {2, 4}, {3, 4}]


def test_evaluate_retrieval_by_labels_and_bad_labels_named(tmp_path):
    """evaluate_retrieval_by (what a training recipe's --relevance labels calls) on fixed vectors per text."""
    write_jsonl(tmp_path / "x.jsonl", LABEL_ROWS)
    vectors = dict(zip("abcdefg", torch.randn(7, 5, generator=torch.Generator().manual_seed(1))))
    encode = lambda items, is_query: F.normalize(torch.stack([vectors[it.text] for it in items]), dim=-1)
    got = evaluate_retrieval_by(load_records(str(tmp_path / "x.jsonl"), format="t2t"), encode, "labels", 2)
    corpus = "badfge"  # as above: positives, then the unlabelled negative
    want = label_metrics64(
        torch.stack([vectors[t] for t in "abcd"]),
        torch.stack([vectors[t] for t in corpus]),
        ["X", "X", "Y", "Y"],
        ["X", "X", "Y", "Y", "X", None],
        [1, 0, None, 2],
    )
    assert {k: got[k] for k in want} == pytest.approx(want, abs=1e-9)

    rows = [dict(r) for r in LABEL_ROWS]
    rows[3].pop("label")
    with pytest.raises(ValueError, match=r"y\.jsonl:4: no 'label'"):
        retrieval_set_by_label(load_records(write_jsonl(tmp_path / "y.jsonl", rows), format="t2t"))
    rows[3]["label"] = "X"  # d was labelled Y as row 3's positive
    with pytest.raises(ValueError, match=r"z\.jsonl:4: this query has label 'X', but .*z\.jsonl:3 gave .* 'Y'"):
        retrieval_set_by_label(load_records(write_jsonl(tmp_path / "z.jsonl", rows), format="t2t"))


def test_help_and_bad_input_are_named(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--help"])
    assert e.value.code == 0 and "--relevance labels --queries-in-corpus" in capsys.readouterr().out
    data = write_jsonl(tmp_path / "x.jsonl", [{"query": "a", "positive": "b"}])
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--model", str(tmp_path), "--data", data, "--queries-in-corpus"])
    assert e.value.code == 2 and "--queries-in-corpus needs --relevance labels" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"x\.jsonl:1: no 'label'"):  # the data is checked before the model loads
        evaluate.main(["--model", str(tmp_path / "none"), "--data", data, "--relevance", "labels"])
    with pytest.raises(FileNotFoundError, match=r"--model .*none: no such folder"):
        evaluate.main(["--model", str(tmp_path / "none"), "--data", data, "--output", str(tmp_path / "out")])


# ----------------------------------------------------------------------------- evaluate.py on every family


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("evaluate")
    (root / "shapes").mkdir()
    (root / "pets").mkdir()
    shapes_train, shapes_val = shapes_dataset(root / "shapes")
    pets_train, pets_val = pets_dataset(root / "pets")
    return {
        "root": str(root),
        "shapes_train": shapes_train,
        "shapes_val": shapes_val,
        "pets_train": pets_train,
        "pets_val": pets_val,
        "bert": tiny_bert(str(root / "bert"), dropout=0.0),
        "qwen": tiny_qwen3vl(str(root / "qwen")),
    }


def saved(folder: Path, name: str):
    t = load_file(str(folder / f"{name}.safetensors"))
    return (t["embeddings"], t["mask"]) if "mask" in t else t["embeddings"]


def check_topk(out: Path, rs, k: int) -> None:
    """Each topk.jsonl row = the float64 ranking of the saved embeddings (cosine or MaxSim) with its relevance."""
    q, d = saved(out, "queries"), saved(out, "corpus")
    scores = maxsim64(q, d) if isinstance(q, tuple) else q.double() @ d.double().T
    rows = [json.loads(line) for line in (out / "topk.jsonl").read_text().splitlines()]
    assert [r["query_index"] for r in rows] == list(range(len(rs.queries)))
    for qi, row in enumerate(rows):
        assert row["query"]["text"] == rs.queries[qi].text and row["num_relevant"] == len(rs.relevant[qi])
        listed = [r["corpus_index"] for r in row["results"]]
        assert [r["rank"] for r in row["results"]] == list(range(1, k + 1)) and len(set(listed)) == k
        got = torch.tensor([r["score"] for r in row["results"]], dtype=torch.float64)
        torch.testing.assert_close(got, scores[qi, listed], atol=1e-5, rtol=0)
        assert (got[:-1] >= got[1:] - 1e-6).all()
        rest = [j for j in range(len(rs.docs)) if j not in listed]
        assert not rest or scores[qi, rest].max() <= got[-1] + 1e-5
        assert [r["relevant"] for r in row["results"]] == [j in rs.relevant[qi] for j in listed]
        assert all(Item(r["text"], tuple(r["images"])) == rs.docs[j] for r, j in zip(row["results"], listed))


def check_evaluate(final: Path, val: str, fmt: str | None, after: dict, out: Path, *flags: str) -> dict:
    """evaluate.py on ``final``: metrics = the recipe's, files consistent. Returns metrics.json."""
    argv = ["--model", str(final), "--data", val, "--output", str(out), "--top-k", "3", "--batch-size", "5", *flags]
    got = evaluate.main(argv + (["--format", fmt] if fmt else []))
    assert got == pytest.approx({k: after[k] for k in got}, abs=1e-6), (got, after)
    result = json.loads((out / "metrics.json").read_text())
    assert result["after"] == got
    rs = retrieval_set(load_records(val, format=fmt))
    curve = result["recall_curve"]["after"]
    assert len(curve) == min(100, len(rs.docs))
    assert [curve[k - 1] for k in (1, 5, 10)] == pytest.approx([got[f"recall@{k}"] for k in (1, 5, 10)], abs=1e-9)
    assert result["counts"] == {"queries": len(rs.queries), "corpus": len(rs.docs), "queries_without_relevant": 0}
    check_topk(out, rs, 3)
    items = json.loads((out / "items.json").read_text())
    assert [Item(i["text"], tuple(i["images"])) for i in items["corpus"]] == rs.docs
    report = (out / "report.md").read_text()
    assert "| recall@1 |" in report and "recall_curve.png" in report
    return result


def test_evaluate_py_reproduces_every_family(toy, tmp_path):
    pets = ["--data", toy["pets_train"], "--val-data", toy["pets_val"]]  # text_t2t reads t2t; it has no --format
    shapes = ["--data", toy["shapes_train"], "--val-data", toy["shapes_val"], "--format", "t2i"]
    bert, qwen = ["--model", toy["bert"]], ["--model", toy["qwen"]]
    runs = {  # run: (family, recipe, flags, val file, format)
        "clip": ("dual", "clip_t2i", ["--demo-quick"], None, None),
        "text": ("text", "text_t2t", [*bert, *pets, "--query-prefix", "query "], toy["pets_val"], "t2t"),
        "qwen3": ("vlm", "qwen3_fsdp", [*qwen, *shapes], toy["shapes_val"], "t2i"),
        "colbert": ("colbert", "colbert", [*bert, *pets, "--format", "t2t", "--dim", "16"], toy["pets_val"], "t2t"),
        "colqwen": ("colbert", "colbert", [*qwen, *shapes, "--dim", "16"], toy["shapes_val"], "t2i"),
    }
    for name, (family, recipe, flags, val, fmt) in runs.items():
        run = tmp_path / name
        result = run_recipe(recipe, run, *flags)
        val = val or str(run / "demo" / "val.jsonl")
        check_evaluate(run / "final", val, fmt, result["after"], tmp_path / f"eval_{name}")
        assert json.loads((tmp_path / f"eval_{name}" / "args.json").read_text())["family"] == family

    # The text family's files are a distill teacher: TeacherStore finds every record's texts.
    records = list(load_records(toy["pets_train"], format="t2t"))
    store_q, store_d = TeacherStore(str(tmp_path / "eval_text"))(records)
    enc = load_encoder(str(tmp_path / "text" / "final"))
    docs = [r.positive.text for r in records] + [n.text for r in records for n in r.negatives]
    torch.testing.assert_close(store_q, enc.encode_text([r.query.text for r in records]), atol=1e-5, rtol=0)
    torch.testing.assert_close(store_d, enc.encode_text(docs, is_query=False), atol=1e-5, rtol=0)


def test_torchrun_evaluate_splits_the_work_and_matches_one_process(toy, tmp_path):
    run = tmp_path / "colbert"
    flags = ["--model", toy["bert"], "--data", toy["pets_train"], "--val-data", toy["pets_val"], "--format", "t2t"]
    result = run_recipe("colbert", run, *flags, "--dim", "16")
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--model", str(run / "final"), "--data", toy["pets_val"], "--format", "t2t", "--batch-size", "5"]
    evaluate.main([*common, "--output", str(one)])
    torchrun("evaluate", *common, "--output", str(two), timeout=120)
    a, b = (json.loads((p / "metrics.json").read_text()) for p in (one, two))
    assert b["after"] == pytest.approx(result["after"], abs=1e-6) and b["after"] == pytest.approx(a["after"], abs=1e-6)
    assert json.loads((two / "args.json").read_text())["world_size"] == 2
    for name in ("queries", "corpus"):
        (ta, ma), (tb, mb) = saved(one, name), saved(two, name)
        assert torch.equal(ma, mb)
        torch.testing.assert_close(ta, tb, atol=1e-5, rtol=0)
    assert (one / "topk.jsonl").read_text().count("\n") == (two / "topk.jsonl").read_text().count("\n") == 12


# ----------------------------------------------------------------------------- image-only towers


def products_dataset(root: Path) -> str:
    """i2i pairs with labels: 4 colours x 3 instances (shape, position); each instance's query is the next one."""
    colours = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 70, 230), "yellow": (230, 220, 40)}
    yy, xx = np.mgrid[:32, :32]
    rows = []
    for colour, rgb in colours.items():
        names = []
        for i, (cy, cx, r) in enumerate(((10, 10, 6), (20, 22, 8), (16, 8, 5))):
            img = np.full((32, 32, 3), 100, np.uint8)
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rgb
            names.append(f"{colour}_{i}.png")
            Image.fromarray(img).save(root / names[-1])
        rows += [{"query_image": names[i], "positive": names[(i + 1) % 3], "label": colour} for i in range(3)]
    return write_jsonl(root / "products.jsonl", rows)


def test_image_only_towers_train_load_and_evaluate(tmp_path):
    dino = tiny_dinov2(str(tmp_path / "dino"))
    # clip_t2i --vision-model X --format i2i, no --text-model: trains and exports an image-only encoder.
    (tmp_path / "products").mkdir()
    data = products_dataset(tmp_path / "products")
    flags = ["--vision-model", dino, "--proj-dim", "16", "--data", data, "--val-data", data]
    flags += ["--max-steps", "2", "--batch-size", "4", "--num-workers", "0", "--format", "i2i"]
    recipe = load_script("clip_t2i")
    result = recipe.main([*flags, "--output", str(tmp_path / "run"), "--lr", "1e-3"])
    with pytest.raises(SystemExit, match="pass --format i2i"):
        recipe.main([*flags[:-2], "--output", str(tmp_path / "refused")])
    final = tmp_path / "run" / "final"
    enc = load_encoder(str(final))
    assert enc.family == "dual" and not enc.backend.has_text and enc.backend.settings["image_only"]
    with pytest.raises(ValueError, match="no text tower"):
        enc.encode_text(["a red circle"])

    # The encoder's vectors = the exported vision tower + projection, normalised (the recipe's evaluation).
    records = list(load_records(data, format="i2i"))
    images = [str(tmp_path / "products" / f"{c}_{i}.png") for c in ("red", "green", "blue", "yellow") for i in range(3)]
    exported, exported_proc = load_dual_encoder(str(final))
    with torch.no_grad():
        pix = DualEncoderCollator(exported_proc).encode([Item(images=(p,)) for p in images], True)["pixel_values"]
        reference = F.normalize(exported.eval().get_image_features(pixel_values=pix), dim=-1)
    got = enc.encode_image(images)
    torch.testing.assert_close(got, reference, atol=1e-5, rtol=0)

    # evaluate.py: positives reproduce the recipe's final metrics; labels (every image against all the
    # others, self excluded) equal the float64 reference.
    check_evaluate(final, data, "i2i", result["after"], tmp_path / "eval_pos")
    labels_out = tmp_path / "eval_labels"
    argv = ["--model", str(final), "--data", data, "--format", "i2i", "--output", str(labels_out)]
    metrics = evaluate.main([*argv, "--relevance", "labels", "--queries-in-corpus", "--top-k", "11"])
    labels = [r.label for r in records]  # record i's query is image i: every image against the 11 others
    want = label_metrics64(got, got, labels, labels, list(range(12)))
    assert {k: metrics[k] for k in want} == pytest.approx(want, abs=1e-6)
    rows = [json.loads(line) for line in (labels_out / "topk.jsonl").read_text().splitlines()]
    for row in rows:  # every other image listed once, never the query itself
        listed = sorted(r["images"][0] for r in row["results"])
        assert listed == sorted(set(images) - {row["query"]["images"][0]}), row
        assert row["num_relevant"] == 2 and sum(r["relevant"] for r in row["results"]) == 2
