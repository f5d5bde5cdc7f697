"""Retrieval metrics at each Matryoshka width: `evaluate_retrieval_by(widths=)` against a brute-force reference
(full score matrix of the re-normalised prefixes, textbook recall / MRR / nDCG), its width errors, and the
report's "By Matryoshka width" tables (plain and task-prefixed keys) with `_eval_columns` skipping width keys."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace as NS

import pytest
import torch

from vembed_blocks.data.records import Item
from vembed_blocks.embed import evaluate_retrieval_by
from vembed_blocks.report import _eval_columns, write_report
from vembed_blocks.run_log import write_metrics

NUM_Q, NUM_D, DIM, WIDTHS = 40, 200, 32, (8, 16, 32)


def _corpus(seed: int = 0, signal: float = 1.0):
    """Records of 40 queries with 1..3 positives each and 121 distractors (hard negatives): 200 documents.

    Returns ``(records, vectors, relevant)``: unit float64 vectors by item name (a positive is its query plus
    noise, scaled by ``signal``; a distractor is noise), and each query's relevant document names."""
    g = torch.Generator().manual_seed(seed)
    vectors: dict[str, torch.Tensor] = {}
    relevant: dict[str, set[str]] = {}
    pairs = []
    for i in range(NUM_Q):
        q = f"q{i}"
        vectors[q] = torch.randn(DIM, generator=g, dtype=torch.float64)
        relevant[q] = {f"p{i}_{j}" for j in range(1 + i % 3)}
        for p in sorted(relevant[q]):
            vectors[p] = signal * vectors[q] + 1.5 * torch.randn(DIM, generator=g, dtype=torch.float64)
            pairs.append((q, p))
    distractors = [f"n{k}" for k in range(NUM_D - len(pairs))]
    for n in distractors:
        vectors[n] = torch.randn(DIM, generator=g, dtype=torch.float64)
    vectors = {k: v / v.norm() for k, v in vectors.items()}
    negatives = {i: distractors[i :: len(pairs)] for i in range(len(pairs))}
    records = [
        NS(query=Item(text=q), positive=Item(images=(p,)), negatives=[Item(images=(n,)) for n in negatives[i]])
        for i, (q, p) in enumerate(pairs)
    ]
    assert len(vectors) == NUM_Q + NUM_D
    return records, vectors, relevant


def _encoder(vectors: dict[str, torch.Tensor]):
    def encode(items, is_query):
        return torch.stack([vectors[i.text if is_query else i.images[0]] for i in items])

    return encode


def _reference(vectors: dict[str, torch.Tensor], relevant: dict[str, set[str]], width: int) -> dict[str, float]:
    """recall@1/5/10, mrr@10, ndcg@10 by brute force: every score of the re-normalised ``width``-prefixes, each query's
    documents sorted by it, the textbook formulas. Starts from the float32 values `embed_items` hands on."""
    queries = sorted(relevant)
    docs = sorted(k for k in vectors if k not in relevant)
    prefix = lambda names: torch.nn.functional.normalize(
        torch.stack([vectors[n].float().double()[:width] for n in names]), dim=1
    )
    scores = prefix(queries) @ prefix(docs).T  # [Q, N], float64
    totals = {"recall@1": 0.0, "recall@5": 0.0, "recall@10": 0.0, "mrr@10": 0.0, "ndcg@10": 0.0}
    for qi, q in enumerate(queries):
        row = scores[qi].tolist()
        order = sorted(range(len(docs)), key=lambda j: -row[j])
        top = [row[j] for j in order[:11]]
        assert min(a - b for a, b in zip(top, top[1:])) > 1e-5, "a near-tie: the ranking would depend on rounding"
        rel = {docs.index(name) for name in relevant[q]}
        hits = [j in rel for j in order]
        for k in (1, 5, 10):
            totals[f"recall@{k}"] += sum(hits[:k]) / len(rel)
        first = next((r for r, h in enumerate(hits[:10], 1) if h), None)
        totals["mrr@10"] += 1 / first if first else 0.0
        dcg = sum(1 / math.log2(r + 1) for r, h in enumerate(hits[:10], 1) if h)
        totals["ndcg@10"] += dcg / sum(1 / math.log2(r + 1) for r in range(1, min(10, len(rel)) + 1))
    return {k: v / len(queries) for k, v in totals.items()}


def test_metrics_at_each_width_equal_a_brute_force_reference():
    records, vectors, relevant = _corpus()
    encode = _encoder(vectors)
    got = evaluate_retrieval_by(records, encode, "positives", 16, curve_k=20, widths=WIDTHS)
    refs = {w: _reference(vectors, relevant, w) for w in WIDTHS}
    for w, ref in refs.items():
        for name, value in ref.items():
            assert got[f"dim{w}/{name}"] == pytest.approx(value, abs=1e-12), (w, name)
    for name, value in refs[DIM].items():  # the plain keys are the full width
        assert got[name] == pytest.approx(value, abs=1e-12), name
    plain = {k: v for k, v in got.items() if "/" not in k and k != "recall_curve"}
    assert len(plain) == 15 and {k: got[f"dim{DIM}/{k}"] for k in plain} == pytest.approx(plain, abs=1e-12)
    assert set(got) == {*plain, "recall_curve", *(f"dim{w}/{k}" for w in WIDTHS for k in plain)}  # no width curve
    assert len(got["recall_curve"]) == 20 and got["recall_curve"][0] == got["recall@1"]
    assert len({refs[w]["ndcg@10"] for w in WIDTHS}) == 3  # the widths differ: the test tells them apart
    # a scorer of the caller's (here dot products again) gets the same re-normalised prefixes
    scored = evaluate_retrieval_by(records, encode, "positives", 64, lambda q, d: q @ d.T, widths=(8, 16))
    assert {k: scored[k] for k in scored} == pytest.approx({k: got[k] for k in scored if k in got}, abs=1e-12)
    assert evaluate_retrieval_by(records, encode, widths=()) == pytest.approx(plain)  # no widths: as before


def test_width_errors_name_the_width():
    records, vectors, _ = _corpus()
    calls: list = []
    encode = _encoder(vectors)
    counted = lambda items, is_query: calls.append(is_query) or encode(items, is_query)
    with pytest.raises(ValueError, match="widths must be >= 1, got 0"):
        evaluate_retrieval_by(records, counted, widths=(8, 0))
    assert calls == []  # refused before anything was embedded
    with pytest.raises(ValueError, match=r"width 64 is larger than the embedding \(32\)"):
        evaluate_retrieval_by(records, counted, widths=(8, 64))
    assert False not in calls  # refused before the corpus was embedded
    tokens = lambda items, is_query: (encode(items, is_query)[:, None], torch.ones(len(items), 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="widths need single-vector embeddings; encode returned a tuple"):
        evaluate_retrieval_by(records, tokens, widths=(8,))


def test_report_tables_by_width_from_evaluated_metrics(tmp_path):
    records, vectors, _ = _corpus()
    weak = _corpus(seed=0, signal=0.3)[1]  # the same items, positives further from their queries: "before"
    before = evaluate_retrieval_by(records, _encoder(weak), widths=WIDTHS)
    after = evaluate_retrieval_by(records, _encoder(vectors), widths=WIDTHS)
    write_metrics(str(tmp_path), before, after)
    text = Path(write_report(str(tmp_path))).read_text()
    assert "## By Matryoshka width" in text and "###" not in text
    assert "| metric | full | 32 | 16 | 8 |\n|---|---|---|---|---|\n" in text
    for name in ("recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10"):
        keys = [name, *(f"dim{w}/{name}" for w in (32, 16, 8))]
        assert "| " + name + " | " + " | ".join(f"{before[k]:.4f} -> {after[k]:.4f}" for k in keys) + " |" in text
    assert f"| recall@1 | {before['recall@1']:.4f} | {after['recall@1']:.4f} |" in text  # the flat table stays
    assert "| hit@1 |" in text and "dim8/" not in text  # ... without the width keys, which have their own table
    assert text.index("## Metrics") < text.index("## By Matryoshka width") < text.index("## Training loss")


def test_report_tables_by_width_per_task_prefix(tmp_path):
    after = {
        "retrieval/recall@1": 0.75, "retrieval/mrr@10": 0.8125, "retrieval/dim64/recall@1": 0.625,
        "retrieval/dim128/recall@1": 0.6875, "retrieval/dim64/mrr@10": 0.71875, "retrieval/dim64/hit@1": 0.5,
        "sts/loss": 0.25, "dim16/recall@1": 0.5, "dim16/ndcg@10": 0.5625, "recall@1": 0.625,
    }  # fmt: skip
    before = {"retrieval/recall@1": 0.25, "retrieval/dim64/recall@1": 0.125, "dim16/recall@1": 0.0625}
    (tmp_path / "metrics.json").write_text(json.dumps({"before": before, "after": after}))
    text = Path(write_report(str(tmp_path))).read_text()
    section = text[text.index("## By Matryoshka width") :]
    assert (
        "| metric | full | 16 |\n|---|---|---|\n"
        "| recall@1 | 0.6250 | 0.0625 -> 0.5000 |\n"  # no "before" of the full width: the after alone
        "| ndcg@10 | - | 0.5625 |\n"
        "\n### retrieval\n\n"
        "| metric | full | 128 | 64 |\n|---|---|---|---|\n"
        "| recall@1 | 0.2500 -> 0.7500 | 0.6875 | 0.1250 -> 0.6250 |\n"
        "| mrr@10 | 0.8125 | - | 0.7188 |\n"
    ) in section
    assert "hit@1" not in section and "| sts/loss | - | 0.2500 | - |" in text
    flat = text[text.index("## Metrics") : text.index("## By Matryoshka width")]
    assert "dim64" not in flat and "| retrieval/recall@1 | 0.2500 | 0.7500 | +0.5000 |" in flat


def test_eval_columns_skip_width_keys():
    rows = [
        {"step": 10, "recall@1": 0.5, "dim64/recall@1": 0.4, "retrieval/dim64/mrr@10": 0.3, "loss": 1.0},
        {"step": 20, "recall@1": 0.6, "retrieval/recall@1": 0.7, "dim8/ndcg@10": 0.2, "mrr@10": 0.5},
    ]
    assert _eval_columns(rows) == (["recall@1", "retrieval/recall@1", "mrr@10"], ["loss"])
