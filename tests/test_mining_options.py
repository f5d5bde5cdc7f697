"""mine_hard_negatives' options (rank range + seeded draw, several positives, a teacher) and write_mined_file's
JSONL / Parquet output, each against a plain float64 reference written here: the full score matrix, the filter
and the ranking rule (score desc, ties to the lower index) spelled out in Python."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from vembed_blocks.data.records import load_records
from vembed_blocks.mining import Mined, TeacherMined, mine_hard_negatives, write_mined_file

BLOCKS = [(1, 1024), (7, 4), (40, 3), (None, 1024)]  # (candidate_block, chunk_size)


def _cos(a, b):
    a, b = a.double(), b.double()
    return (a / a.norm(dim=1, keepdim=True)) @ (b / b.norm(dim=1, keepdim=True)).T


def _positives(pos):
    """[Q] or [Q, P] (-1 padding) -> a list of real positive lists."""
    pos = pos[:, None] if pos.dim() == 1 else pos
    return [[p for p in row if p >= 0] for row in pos.tolist()]


def _ranked(s, pos, margin=None, ratio=None):
    """Per query: the candidates passing the filter (vs the lowest positive score), best first, ties to lower."""
    out = []
    for i, ps in enumerate(_positives(pos)):
        low = min(s[i, p].item() for p in ps)
        keep = [
            j
            for j in range(s.shape[1])
            if j not in ps
            and not (margin is not None and s[i, j] > low - margin)
            and not (ratio is not None and s[i, j] > ratio * low)
        ]
        out.append(sorted(keep, key=lambda j: (-s[i, j].item(), j)))
    return out


def _rows(lists, width):
    return [r[:width] + [-1] * (width - len(r[:width])) for r in lists]


def _random(q=8, n=40, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(q, d, generator=g), torch.randn(n, d, generator=g), torch.randint(0, n, (q,), generator=g)


def _exact(q=6, n=30, d=8, seed=3):
    """Entries in {-1, 0, 1}, 4 non-zeros a row: every score is a multiple of 1/4, exact in float32 (real ties);
    candidates 4, 9, 20 duplicate candidate 1."""
    g = torch.Generator().manual_seed(seed)

    def rows(m):
        x = torch.zeros(m, d)
        for r in range(m):
            x[r, torch.randperm(d, generator=g)[:4]] = torch.randint(0, 2, (4,), generator=g).float() * 2 - 1
        return x

    qq, c = rows(q), rows(n)
    c[[4, 9, 20]] = c[1].clone()
    qq[0] = c[1]
    return qq, c, torch.randint(0, n, (q,), generator=g)


def _check(got, idx, s):
    """Indices exactly; scores as the float64 reference's, -inf where the index is -1."""
    assert got.indices.tolist() == idx
    want = torch.tensor([[s[i, j].item() if j >= 0 else float("-inf") for j in r] for i, r in enumerate(idx)])
    assert torch.equal(got.scores == float("-inf"), want == float("-inf"))
    fin = want != float("-inf")
    assert torch.allclose(got.scores[fin].double(), want[fin].double(), atol=1e-6)


@pytest.mark.parametrize("data", [_random, _exact])
def test_rank_range_without_draw_is_the_reference_slice(data):
    q, c, pos = data()
    s = _cos(q, c)
    ranked = _ranked(s, pos, margin=0.0)
    want = _rows([r[5:12] for r in ranked], 7)
    for block, chunk in BLOCKS:
        got = mine_hard_negatives(q, c, pos, 7, 0.0, None, chunk, block, rank_range=(5, 12))
        assert isinstance(got, Mined)
        _check(got, want, s)
    # k wider than the range: the extra slots are padding
    got = mine_hard_negatives(q, c, pos, 9, 0.0, rank_range=(5, 12))
    _check(got, [w + [-1, -1] for w in want], s)


@pytest.mark.parametrize("data", [_random, _exact])
def test_rank_range_draw_is_seeded_uniform_subset(data):
    q, c, pos = data()
    s = _cos(q, c)
    ranked = _ranked(s, pos, None, 0.95)
    lo, hi, k, seed = 3, 25, 6, 11
    keys = torch.rand(len(q), hi - lo, generator=torch.Generator().manual_seed(seed))  # the documented draw
    want = []
    for i, r in enumerate(ranked):
        window = r[lo:hi]
        cols = sorted(range(len(window)), key=lambda t: keys[i, t].item())[:k]
        want.append([window[t] for t in sorted(cols)] + [-1] * (k - min(k, len(window))))
    for block, chunk in BLOCKS:
        got = mine_hard_negatives(q, c, pos, k, None, 0.95, chunk, block, rank_range=(lo, hi), seed=seed)
        _check(got, want, s)
        for i, row in enumerate(got.indices.tolist()):  # a subset of the range, in rank order
            real = [j for j in row if j >= 0]
            assert set(real) <= set(ranked[i][lo:hi]) and real == sorted(real, key=ranked[i].index)
    other = mine_hard_negatives(q, c, pos, k, None, 0.95, rank_range=(lo, hi), seed=seed + 1)
    assert other.indices.tolist() != want


def test_draw_is_uniform_over_the_range():
    """Each rank of the range is drawn with probability k / (m - n): 400 seeds, one query, 10 ranks, k 3."""
    q, c, pos = _random(q=1, n=20)
    counts = torch.zeros(20)
    for seed in range(400):
        counts[mine_hard_negatives(q, c, pos, 3, rank_range=(2, 12), seed=seed).indices[0]] += 1
    ranked = _ranked(_cos(q, c), pos)[0]
    drawn = counts[ranked[2:12]]
    assert drawn.sum() == 1200 and counts.sum() == 1200
    assert (drawn - 120).abs().max() < 40  # binomial(400, 0.3): sd ~9.2, so 40 is > 4 sd


@pytest.mark.parametrize("margin, ratio", [(None, None), (0.0, None), (0.1, 0.9), (0.25, None)])
def test_several_positives_with_padding(margin, ratio):
    q, c, _ = _exact()
    pos = torch.tensor([[1, 4, -1], [-1, 7, 2], [3, -1, -1], [5, 6, 8], [-1, -1, 0], [9, 20, 1]])
    s = _cos(q, c)
    want = _rows(_ranked(s, pos, margin, ratio), 8)
    for block, chunk in BLOCKS:
        _check(mine_hard_negatives(q, c, pos, 8, margin, ratio, chunk, block), want, s)
    # every positive is skipped; query 0 is candidate 1: its other duplicates 9, 20 come first, in index order
    got = mine_hard_negatives(q, c, pos, 4).indices
    assert got[0, :2].tolist() == [9, 20]
    assert not any(j in p for j, p in zip(got.tolist(), _positives(pos)) for j in j)


def _teacher_for(tq, tc, calls):
    def teacher(rows, cols):
        calls.append((rows.clone(), cols.clone()))
        return _cos(tq, tc)[rows[:, None], cols]  # float64: the miner takes it as float32

    return teacher


@pytest.mark.parametrize("rank_range, pos_2d", [(None, False), ((2, 10), True)])
def test_teacher_drops_false_negatives_and_returns_its_scores(rank_range, pos_2d):
    q, c, pos = _random(q=8, n=40)
    if pos_2d:
        pos = torch.stack([pos, (pos + 3) % 40, torch.full_like(pos, -1)], 1)
    g = torch.Generator().manual_seed(5)
    tq, tc = q + 0.7 * torch.randn(q.shape, generator=g), c + 0.7 * torch.randn(c.shape, generator=g)
    s, t = _cos(q, c), _cos(tq, tc)
    lo, hi = rank_range or (0, 5)
    k, depth, tm, tr = hi - lo, 14, 0.05, 0.9  # k = m - n: no draw
    want, dropped = [], 0
    for i, r in enumerate(_ranked(s, pos, margin=0.3)):
        low = min(t[i, p].item() for p in _positives(pos)[i])
        kept = [j for j in r[:depth] if not t[i, j] > low - tm and not t[i, j] > tr * low]
        dropped += len(r[:depth]) - len(kept)
        want.append(kept[lo:hi])
    assert dropped > 0  # the teacher has something to drop
    want = _rows(want, k)
    for block, chunk in BLOCKS:
        calls = []
        got = mine_hard_negatives(
            q, c, pos, k, 0.3, None, chunk, block, rank_range=rank_range, teacher=_teacher_for(tq, tc, calls),
            teacher_depth=depth, teacher_margin=tm, teacher_ratio=tr,
        )  # fmt: skip
        assert isinstance(got, TeacherMined)
        _check(got, want, s)
        wt = torch.tensor(
            [[t[i, j].item() if j >= 0 else float("-inf") for j in r] for i, r in enumerate(want)], dtype=torch.float64
        )
        assert torch.equal(got.teacher_scores == float("-inf"), wt == float("-inf"))
        fin = wt != float("-inf")
        assert torch.allclose(got.teacher_scores[fin].double(), wt[fin], atol=1e-6)
        p2 = pos if pos.dim() == 2 else pos[:, None]
        wp = torch.tensor(
            [[t[i, p].item() if p >= 0 else float("-inf") for p in row] for i, row in enumerate(p2.tolist())],
            dtype=torch.float64,
        )
        assert torch.allclose(got.teacher_positive_scores.double(), wp, atol=1e-6)
        assert sum(len(r) for r, _ in calls) == len(q) and calls[0][1].shape[1] == depth + p2.shape[1]
        assert (torch.cat([x for _, x in calls]) >= 0).all()  # padding never reaches the teacher as -1


def _teacher_pair(q, c):
    tq, tc = q.double(), c.double()
    return lambda rows, cols: _cos(tq, tc)[rows[:, None], cols]


def test_teacher_without_filter_keeps_the_student_top():
    q, c, pos = _random()
    plain = mine_hard_negatives(q, c, pos, 4, 0.1)
    got = mine_hard_negatives(q, c, pos, 4, 0.1, teacher=_teacher_pair(q, c))
    assert got.indices.tolist() == plain.indices.tolist() and torch.equal(got.scores, plain.scores)
    assert torch.allclose(got.teacher_scores, got.scores, atol=1e-6)  # the same model as teacher


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(positive_index=torch.tensor([[0, -1]] * 5 + [[-1, -1]])), "positive_index row 5 has no positive"),
        (dict(positive_index=torch.tensor([0, 1, 2, 3, -1, 5])), "positive_index out of range 0..39"),
        (dict(positive_index=torch.tensor([[0, -2]] * 6)), "out of range 0..39 (or -1: padding)"),
        (dict(positive_index=torch.zeros(5, dtype=torch.long)), "positive_index must have shape (6,) or (6, P)"),
        (dict(rank_range=(5, 5)), "rank_range must be (n, m) with 0 <= n < m <= 40"),
        (dict(rank_range=(0, 41)), "rank_range must be (n, m)"),
        (dict(rank_range=(0, 10), teacher=lambda r, c: c.float(), teacher_depth=8), "teacher_depth must be in 10..40"),
        (dict(teacher=lambda r, c: torch.zeros(len(r), 2)), "teacher returned shape"),
    ],
)
def test_bad_options_raise_clear_errors(kwargs, message):
    q, c, pos = _random(q=6, n=40)
    args = dict(positive_index=pos, k=3) | kwargs
    with pytest.raises(ValueError) as err:
        mine_hard_negatives(q, c, **args)
    assert message in str(err.value)


# ---------------------------------------------------------------- write_mined_file: JSONL / Parquet round trip

WORDS = "cat dog bird fish tree rock sun moon red blue".split()


def _bag(items, dim=12, seed=0):
    """A fixed random vector per word, summed: similar texts score alike."""
    vec = torch.randn(len(WORDS), dim, generator=torch.Generator().manual_seed(seed))
    return torch.stack([sum(vec[WORDS.index(w)] for w in it.text.split()) for it in items])


def _records(tmp_path):
    g = torch.Generator().manual_seed(2)
    rows = []
    for i in range(12):
        pick = lambda: " ".join(WORDS[j] for j in torch.randperm(10, generator=g)[:3].tolist())  # noqa: E731
        row = {"query": f"{WORDS[i % 10]} {WORDS[(i + 3) % 10]}", "positive": pick(), "source_id": i}
        if i % 4 == 0:
            row["negatives"] = [pick()]
        if i % 3 == 0:
            row["label"] = f"L{i % 2}"
        rows.append(row)
    rows.append({**rows[1], "positive": "sun moon red", "source_id": 12})  # query 1 again: two positives
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_records(str(path), format="t2t")


def test_write_mined_file_jsonl_and_parquet_round_trip(tmp_path):
    pytest.importorskip("pyarrow")
    records = _records(tmp_path)
    encode = lambda items, is_query: _bag(items)  # noqa: E731

    def teacher(queries, docs):  # a bigger embedder: another bag, float64 cosine
        a = _bag([type(records[0].query)(text=t) for t in queries], 20, 1)
        b = _bag([type(records[0].query)(text=t) for row in docs for t in row], 20, 1).reshape(len(docs), -1, 20)
        return torch.nn.functional.cosine_similarity(a.double()[:, None], b.double(), dim=-1)

    outs = {}
    for ext in ("jsonl", "parquet"):
        out = str(tmp_path / f"mined.{ext}")
        assert write_mined_file(records, encode, out, 3, 0.05, None, 4, teacher=teacher, teacher_margin=0.0) == 13
        outs[ext] = load_records(out, format="t2t")
    # the reference: every unique text embedded, float64 cosine, the query's positives skipped
    queries = list(dict.fromkeys(r.query.text for r in records))
    docs = list(dict.fromkeys(t for r in records for t in [r.positive.text] + [n.text for n in r.negatives]))
    item = type(records[0].query)
    s = _cos(_bag([item(text=t) for t in queries]), _bag([item(text=t) for t in docs]))
    t = _cos(_bag([item(text=t) for t in queries], 20, 1), _bag([item(text=t) for t in docs], 20, 1))
    positives = {qt: sorted({docs.index(r.positive.text) for r in records if r.query.text == qt}) for qt in queries}
    for i, (r, a, b) in enumerate(zip(records, outs["jsonl"], outs["parquet"])):
        qi, ps = queries.index(r.query.text), positives[r.query.text]
        tlow = min(t[qi, p].item() for p in ps)
        ranked = _ranked(s[qi : qi + 1], torch.tensor([ps]), margin=0.05)[0][: min(12, len(docs))]
        mined = [j for j in ranked if not t[qi, j] > tlow][:3]
        negs = list(dict.fromkeys([docs.index(n.text) for n in r.negatives] + mined))
        for got in (a, b):
            assert (got.query.text, got.positive.text, got.label) == (r.query.text, r.positive.text, r.label)
            assert [n.text for n in got.negatives] == [docs[j] for j in negs]
            assert got.extra["source_id"] == i
            assert got.extra["negative_scores"] == pytest.approx([s[qi, j].item() for j in negs], abs=1e-6)
            assert got.extra["teacher_negative_scores"] == pytest.approx([t[qi, j].item() for j in negs], abs=1e-6)
            assert got.extra["positive_score"] == pytest.approx(s[qi, docs.index(r.positive.text)].item(), abs=1e-6)
            want_tp = t[qi, docs.index(r.positive.text)].item()
            assert got.extra["teacher_positive_score"] == pytest.approx(want_tp, abs=1e-6)
            assert not any(j in ps for j in mined)  # none of the query's positives
    assert sum(len(r.negatives) for r in outs["jsonl"]) > sum(len(r.negatives) for r in records)


def test_parquet_output_needs_the_extra(tmp_path, monkeypatch):
    records = _records(tmp_path)
    for name in [m for m in sys.modules if m == "pyarrow" or m.startswith("pyarrow.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match=r"pip install vembed-blocks\[parquet\]"):
        write_mined_file(records, lambda items, is_query: _bag(items), str(tmp_path / "x.parquet"), 2)
    assert not (tmp_path / "x.parquet").exists()
