"""recipes/distill.py end to end: a tiny random BERT student learns a teacher's similarity structure.

- torchrun, 2 gloo ranks, precomputed row-aligned teacher embeddings (teacher.safetensors) with
  GradCache + Matryoshka + --eval-every: the whole-set distillation loss falls, a run split by
  --stop-at/--resume reproduces the uninterrupted losses, the export loads with from_pretrained;
- in-process: a live teacher of another width and tokenizer (MSE) teaches the student, and the
  evaluate.py file layout (looked up by text, hard negatives included) trains and names missing texts;
- torchrun, 2 ranks, ragged across ranks (live teacher, and the evaluate.py layout): at step 1 rank 0
  has hard negatives and string labels and rank 1 neither; the logged loss is one process's loss.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from _recipes import assert_ragged_step0, load_script, ragged_rows, torchrun, train_log
from _tiny_models import WORDS, tiny_bert, word_tokenizer
from safetensors.torch import save_file

from vembed_blocks import Distill
from vembed_blocks.text_encoder import embed_texts, load_text_encoder

distill = load_script("distill")

COLOURS = "red green blue yellow purple white".split()
SHAPES = "circle square triangle cross".split()
PLACES = "left right top bottom center".split()


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def teacher_vector(text: str, noise: torch.Generator) -> torch.Tensor:
    """The toy teacher: which colour, shape and place a text names (one-hot each), plus a little noise."""
    words = text.split()
    hot = [float(w in words) for w in COLOURS + SHAPES + PLACES]
    return torch.tensor(hot) + 0.05 * torch.randn(len(hot), generator=noise)


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("distill")
    rng, noise = random.Random(0), torch.Generator().manual_seed(0)
    combos = [(c, s, p) for c in COLOURS for s in SHAPES for p in PLACES]
    rng.shuffle(combos)
    rows = [
        {
            "query": f"{c} {s} {p}",
            "positive": f"there is a {c} {s} at the {p}",
            "negatives": [f"there is a {c} {rng.choice([x for x in SHAPES if x != s])} at the {p}"],
        }
        for c, s, p in combos
    ]
    train, val = rows[:96], rows[96:]
    aligned = root / "aligned"
    aligned.mkdir()
    save_file(
        {
            "query": torch.stack([teacher_vector(r["query"], noise) for r in train]),
            "doc": torch.stack([teacher_vector(r["positive"], noise) for r in train]),
        },
        str(aligned / "teacher.safetensors"),
    )
    # recipes/evaluate.py's layout: unique queries / corpus items, rows in first-appearance order
    by_text = root / "by_text"
    by_text.mkdir()
    queries, corpus = (
        [r["query"] for r in train],
        list(dict.fromkeys(d for r in train for d in [r["positive"], *r["negatives"]])),
    )
    save_file(
        {"embeddings": torch.stack([teacher_vector(t, noise) for t in queries])}, str(by_text / "queries.safetensors")
    )
    save_file(
        {"embeddings": torch.stack([teacher_vector(t, noise) for t in corpus])}, str(by_text / "corpus.safetensors")
    )
    items = {
        "queries": [{"text": t, "images": []} for t in queries],
        "corpus": [{"text": t, "images": []} for t in corpus],
    }
    (by_text / "items.json").write_text(json.dumps(items))
    return {
        "train": write_jsonl(root / "train.jsonl", train),
        "val": write_jsonl(root / "val.jsonl", val),
        "aligned": str(aligned),
        "by_text": str(by_text),
        "student": tiny_bert(str(root / "student")),
        "teacher": wide_bert(str(root / "teacher")),
        "root": str(root),
    }


def wide_bert(out: str) -> str:
    """A teacher unlike the student: width 48, 3 layers, its own tokenizer ([BOS]/[EOS], other ids), CLS pooling."""
    from transformers import BertConfig, BertModel

    from vembed_blocks.text_encoder import write_st_files

    tok = word_tokenizer(sorted(WORDS), ("[PAD]", "[UNK]", "[BOS]", "[EOS]"), "[BOS] $A [EOS]", model_max_length=32)
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=32,
        pad_token_id=0,
    )
    torch.manual_seed(1)
    BertModel(config).save_pretrained(out)
    tok.save_pretrained(out)
    write_st_files(out, dim=48, pooling="cls", normalize=True, max_length=32)
    return out


def whole_set_loss(
    model_dir: str, data: str, teacher_q: torch.Tensor, teacher_d: torch.Tensor, kind: str, temperature: float
) -> float:
    """Distill over all rows at once (queries vs. all positives): the objective without batch noise."""
    model, collator, cfg = load_text_encoder(model_dir)
    rows = [json.loads(line) for line in Path(data).read_text().splitlines()]
    q = embed_texts(model, collator, cfg, [r["query"] for r in rows], is_query=True)
    d = embed_texts(model, collator, cfg, [r["positive"] for r in rows], is_query=False)
    return Distill(temperature=temperature, kind=kind)(q, d, teacher_q, teacher_d).item()


def common(toy: dict[str, str], out: Path, *extra: str) -> list[str]:
    return [
        "--model",
        toy["student"],
        "--data",
        toy["train"],
        "--val-data",
        toy["val"],
        "--output",
        str(out),
        "--batch-size",
        "8",
        "--lr",
        "2e-3",
        "--num-workers",
        "0",
        "--log-every",
        "5",
        *extra,
    ]


def test_torchrun_precomputed_teacher_learns_resumes_and_exports(toy, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    run = [
        "--teacher-embeddings",
        toy["aligned"],
        "--max-steps",
        "12",
        "--chunk-size",
        "5",
        "--mrl-dims",
        "32,16",
        "--eval-every",
        "6",
        "--temperature",
        "0.1",
    ]
    torchrun("distill", *common(toy, straight, *run, "--save-every", "6"))
    torchrun("distill", *common(toy, split, *run, "--stop-at", "6"))
    assert not (split / "final").exists()
    torchrun("distill", *common(toy, split, *run, "--resume"))

    a, b = train_log(straight), train_log(split)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for step in range(7, 13):
        assert b[step] == pytest.approx(a[step], abs=1e-5), (step, a, b)
    first_eval = json.loads((straight / "eval_log.jsonl").read_text().splitlines()[0])
    assert first_eval["step"] == 6 and "loss" not in first_eval  # precomputed teacher: no validation rows
    assert set(json.loads((split / "metrics.json").read_text())) == {"before", "after", "recall_curve", "health"}

    from safetensors.torch import load_file
    from transformers import BertModel

    assert isinstance(BertModel.from_pretrained(split / "final"), BertModel)
    t = load_file(str(Path(toy["aligned"]) / "teacher.safetensors"))
    before, after = (
        whole_set_loss(m, toy["train"], t["query"], t["doc"], "kl", 0.1) for m in (toy["student"], str(split / "final"))
    )
    print(f"whole-set KL to the teacher before/after: {before:.4f} -> {after:.4f}")
    assert after < 0.7 * before, (before, after)


def test_live_teacher_with_other_width_and_tokenizer(toy, tmp_path):
    out = tmp_path / "live"
    result = distill.main(common(toy, out, "--teacher", toy["teacher"], "--kind", "mse", "--max-steps", "20"))
    assert len(result["losses"]) == 20
    teacher, t_collator, t_cfg = load_text_encoder(toy["teacher"])
    student_tokenizer = load_text_encoder(toy["student"])[1].tokenizer
    assert t_cfg.pooling == "cls" and t_collator.tokenizer.convert_tokens_to_ids(
        "red"
    ) != student_tokenizer.convert_tokens_to_ids("red")
    rows = [json.loads(line) for line in Path(toy["train"]).read_text().splitlines()]
    tq = embed_texts(teacher, t_collator, t_cfg, [r["query"] for r in rows], is_query=True)
    td = embed_texts(teacher, t_collator, t_cfg, [r["positive"] for r in rows], is_query=False)
    assert tq.shape[1] == 48
    before, after = (whole_set_loss(m, toy["train"], tq, td, "mse", 1.0) for m in (toy["student"], str(out / "final")))
    print(f"whole-set MSE to the live teacher before/after: {before:.4f} -> {after:.4f}")
    assert after < 0.7 * before, (before, after)


def test_evaluate_py_layout_uses_negatives_and_names_missing_texts(toy, tmp_path):
    result = distill.main(common(toy, tmp_path / "by_text", "--teacher-embeddings", toy["by_text"], "--max-steps", "4"))
    assert len(result["losses"]) == 4 and all(torch.isfinite(torch.tensor(result["losses"])))
    store = distill.TeacherStore(toy["by_text"])
    records = [distill.NumberedRecords(distill.load_records(toy["train"]))[i] for i in (0, 1)]
    q, d = store(records)
    assert q.shape == (2, 15) and d.shape == (4, 15)  # 2 positives, then their 2 hard negatives
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"query": "red cat", "positive": "there is a red cat"}])
    with pytest.raises(KeyError, match="red cat"):
        store(list(distill.load_records(bad)))


def one_process_loss(argv: list[str], records: list) -> float:
    """The recipe's loss on ``records`` (the global batch) in one process, before any update."""
    from vembed_blocks.text_encoder import text_features

    args = distill.parse_args(argv)
    parts = distill.build(args, torch.device("cpu"))
    student, collator, cfg, teacher, teacher_input = (
        parts.model,
        parts.collator,
        parts.cfg,
        parts.teacher,
        parts.teacher_input,
    )
    batch = distill.collate(collator, teacher_input, records)

    def embed(model, side: dict, pooling: str, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
        docs = [side["positive"]] + ([side["negatives"]] if "negatives" in side else [])  # the recipe's order
        features = [text_features(model, x, pooling, normalize) for x in [side["query"], *docs]]
        return features[0], torch.cat(features[1:])

    with torch.no_grad():
        sq, sd = embed(student, batch["student"], cfg.pooling, False)
        if teacher is None:
            tq, td = batch["teacher_emb"]
        else:
            tq, td = embed(teacher[0], batch["teacher"], teacher[1].pooling, teacher[1].normalize)
    criterion = distill.Distill(temperature=args.temperature, kind=args.kind)
    return sum(criterion(sq[:, :d], sd[:, :d], tq, td) for d in map(int, args.mrl_dims.split(","))).item()


def test_torchrun_ragged_negatives_and_labels(toy, tmp_path):
    """At step 1 only rank 0 has hard negatives (0-2 a row) and string labels (unused by Distill): with a
    live teacher (GradCache) and with the evaluate.py layout (no GradCache: rank 0 makes one more
    forward than rank 1), Matryoshka, the run finishes with finite losses, and step 1's loss equals one
    process on the global batch (every rank's docs as candidates)."""
    rows = [json.loads(line) for line in Path(toy["train"]).read_text().splitlines()]
    # Other rows' positives as negatives: texts the evaluate.py layout has embeddings for.
    negative, label = (lambda i, m: rows[(i + 4 + m) % len(rows)]["positive"]), (lambda i: rows[i]["query"].split()[0])
    ragged, step0 = ragged_rows(rows, 4, negative, label)  # label: the colour
    data = write_jsonl(tmp_path / "ragged.jsonl", ragged)
    records = distill.NumberedRecords(distill.load_records(data))
    assert_ragged_step0(records, step0)  # the sampler really gives rank 0 all of them and rank 1 none at step 0
    student = tiny_bert(str(tmp_path / "student"), dropout=0.0)  # no dropout: step 1 is reproducible in one process
    runs = {
        "live": ["--teacher", toy["teacher"], "--chunk-size", "3"],
        "by_text": ["--teacher-embeddings", toy["by_text"]],
    }
    for name, extra in runs.items():
        out = tmp_path / name
        argv = [
            "--model",
            student,
            "--data",
            data,
            "--output",
            str(out),
            *extra,
            "--batch-size",
            "4",
            "--mrl-dims",
            "32,16",
            "--temperature",
            "0.1",
            "--max-steps",
            "3",
            "--lr",
            "2e-3",
            "--num-workers",
            "0",
            "--log-every",
            "1",
        ]
        torchrun("distill", *argv, timeout=240)
        losses = train_log(out)
        assert sorted(losses) == [1, 2, 3] and all(map(math.isfinite, losses.values())), (name, losses)
        want = one_process_loss(argv, [records[i] for i in step0[0] + step0[1]])
        assert losses[1] == pytest.approx(want, rel=1e-3), (name, losses, want)  # the live loss is ~7e-4: relative
