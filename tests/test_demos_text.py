"""The text recipes' embedded demos (text_t2t, distill, colbert): run bare, they train and visibly improve.

- the demo data: every hard negative differs from its row in exactly one of colour / animal / place,
  labels name the row's combination, validation combinations are never seen in training, the ideal
  teacher's row-aligned embeddings are the one-hot attributes of each row's query and positive, and
  building the model leaves the global RNG alone;
- in-process, each recipe's ``--demo-quick`` (the tiny model is saved as a folder under <output>/demo and
  loaded back; text_t2t's is a sentence-transformers folder) raises recall@1 and MRR@10 by a wide margin,
  and ``--data`` without ``--model`` (distill: without a teacher) stops naming the missing flag;
- ``torchrun --nproc_per_node=2``: the same quick demos on 2 gloo ranks improve as much and export final/.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _recipes import load_script, torchrun, train_log
from safetensors.torch import load_file

from vembed_blocks.demo import text as demo_text
from vembed_blocks.text_encoder import read_text_encoder_config

RECIPES = ("text_t2t", "distill", "colbert")
COLOURS = "red green blue yellow purple white".split()
ANIMALS = "cat dog fox owl horse rabbit".split()
PLACES = "garden kitchen roof river street".split()
QUICK = ["--demo-quick", "--num-workers", "0", "--log-every", "10"]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def attributes(text: str) -> tuple[str, str, str]:
    """The (colour, animal, place) a demo text names: exactly one of each."""
    words = text.split()
    found = [[w for w in group if w in words] for group in (COLOURS, ANIMALS, PLACES)]
    assert all(len(f) == 1 for f in found), (text, found)
    return tuple(f[0] for f in found)


def assert_improved(metrics: dict, what: str) -> None:
    before, after = metrics["before"], metrics["after"]
    assert after["recall@1"] >= before["recall@1"] + 0.25, (what, before, after)
    assert after["mrr@10"] >= before["mrr@10"] + 0.2, (what, before, after)
    assert after["recall@5"] >= 0.9, (what, before, after)


def test_demo_pairs_have_one_attribute_negatives_labels_and_held_out_combinations(tmp_path):
    train, val = demo_text.write_text_pairs(str(tmp_path), per_combo=2, seed=3)
    rows, val_rows = read_jsonl(train), read_jsonl(val)
    assert len(rows) == 2 * 144 and len(val_rows) == 36  # 180 combinations, a fifth held out
    for r in rows + val_rows:
        combo = attributes(r["query"])
        assert attributes(r["positive"]) == combo and r["label"] == " ".join(combo)
        for neg in r["negatives"]:
            assert sum(a != b for a, b in zip(attributes(neg), combo)) == 1, (r, neg)
    assert {len(r["negatives"]) for r in rows} == {0, 1, 2} and {len(r["negatives"]) for r in val_rows} == {1}
    assert not {r["label"] for r in rows} & {r["label"] for r in val_rows}
    assert len({r["query"] for r in val_rows}) == len(val_rows)

    teacher = load_file(demo_text.write_ideal_teacher(train, str(tmp_path / "t")) + "/teacher.safetensors")
    for side, field in (("query", "query"), ("doc", "positive")):
        expected = torch.zeros(len(rows), 17)
        for i, r in enumerate(rows):
            c, a, p = attributes(r[field])
            expected[i, COLOURS.index(c)] = expected[i, 6 + ANIMALS.index(a)] = expected[i, 12 + PLACES.index(p)] = 1
        assert torch.equal(teacher[side], expected), side
    with pytest.raises(ValueError, match="per_combo"):
        demo_text.write_text_pairs(str(tmp_path / "bad"), per_combo=0, seed=0)


def test_building_the_demo_model_leaves_the_global_rng_alone(tmp_path):
    """Only rank 0 builds it: layers seeded after it (ColBERT's projection) must start equal on every rank."""
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    demo_text.build_tiny_bert(str(tmp_path / "m"), quick=True)
    assert torch.equal(torch.rand(3), expected)


def test_prepare_text_demo_writes_what_it_is_asked_for_on_rank_0(tmp_path):
    """The caller says what to build (no recipe names, no argparse): pairs always, the model and the ideal
    teacher on request; every rank gets the same paths, only rank 0 writes."""
    kw = dict(quick=True, seed=0, world=1)
    bare = demo_text.prepare_text_demo(str(tmp_path / "a"), rank=0, build_model=False, **kw)
    assert bare == {"train": str(tmp_path / "a" / "train.jsonl"), "val": str(tmp_path / "a" / "val.jsonl")}
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["train.jsonl", "val.jsonl"]
    full = demo_text.prepare_text_demo(
        str(tmp_path / "b"), rank=0, build_model=True, sentence_transformers=True, teacher=True, **kw
    )
    assert full == {
        "train": str(tmp_path / "b" / "train.jsonl"),
        "val": str(tmp_path / "b" / "val.jsonl"),
        "model": str(tmp_path / "b" / "model"),
        "teacher": str(tmp_path / "b" / "teacher"),
    }
    assert read_jsonl(full["train"]) == read_jsonl(bare["train"]) and len(read_jsonl(full["train"])) == 2 * 144
    assert read_text_encoder_config(full["model"]).is_sentence_transformers
    assert len(load_file(Path(full["teacher"]) / "teacher.safetensors")["query"]) == 2 * 144
    plain = demo_text.prepare_text_demo(str(tmp_path / "c"), rank=0, build_model=True, **kw)
    assert not read_text_encoder_config(plain["model"]).is_sentence_transformers
    other = demo_text.prepare_text_demo(str(tmp_path / "d"), rank=1, build_model=True, teacher=True, **kw)
    assert other["model"] == str(tmp_path / "d" / "model") and not (tmp_path / "d").exists()


@pytest.mark.parametrize("name", RECIPES)
def test_quick_demo_in_process_improves_retrieval(name, tmp_path):
    recipe = load_script(name)
    result = recipe.main([*QUICK, "--output", str(tmp_path)])
    assert_improved(result, name)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    expected = {k: result[k] for k in ("before", "after", "recall_curve", "health")}
    clean = {"skipped_steps": 0, "bad_rows": 0, "read_skipped": 0, "bad_shards": 0}
    assert saved == expected and result["health"] == clean
    assert len(result["losses"]) == 20 and (tmp_path / "final" / "model.safetensors").exists()
    demo_model = tmp_path / "demo" / "model"
    assert json.loads((demo_model / "config.json").read_text())["model_type"] == "bert"
    assert read_text_encoder_config(demo_model).is_sentence_transformers == (name == "text_t2t")


def test_data_without_model_or_teacher_names_the_missing_flag(tmp_path, capsys):
    data = Path(demo_text.write_text_pairs(str(tmp_path), per_combo=1, seed=0)[0])
    for name, argv in (
        ("text_t2t", ["--data", str(data)]),
        ("colbert", ["--data", str(data)]),
        ("distill", ["--data", str(data), "--teacher-embeddings", str(tmp_path)]),
    ):
        with pytest.raises(SystemExit):
            load_script(name).parse_args(argv)
        assert "--model is required with --data" in capsys.readouterr().err, name
    with pytest.raises(SystemExit):
        load_script("distill").parse_args(["--data", str(data), "--model", str(tmp_path)])
    assert "exactly one of --teacher and --teacher-embeddings" in capsys.readouterr().err
    # Without --data the demo's defaults apply, explicit flags still win.
    args = load_script("colbert").parse_args(["--demo-quick", "--lr", "0.01"])
    assert (args.lr, args.max_steps, args.dim, args.num_negatives, args.model) == (0.01, 20, 32, 1, None)


@pytest.mark.parametrize("name", RECIPES)
def test_quick_demo_on_two_ranks_improves_retrieval(name, tmp_path):
    torchrun(name, *QUICK, "--output", str(tmp_path), timeout=240)
    assert_improved(json.loads((tmp_path / "metrics.json").read_text()), name)
    assert sorted(train_log(tmp_path)) == list(range(1, 21))
    assert (tmp_path / "final" / "model.safetensors").exists()
