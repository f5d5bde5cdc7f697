"""mine_hard_negatives with tiled candidates: the same result for every block size and chunk size as a
plain float64 dense reference (full score matrix, the positive and the false-negative filter masked,
ties to the lower candidate index). Then evaluation through the same tiled top-k (embed.top_scores): the
metrics of the full score matrix, bit for bit."""

from __future__ import annotations

import pytest
import torch

from vembed_blocks import mining
from vembed_blocks.mining import mine_hard_negatives


def _reference(q, c, pos, k, margin=None, max_ratio=None):
    """Dense float64: (indices[Q,k], scores[Q,k]), best first, ties to the lower index, -1/-inf padding."""
    qn = q.double() / q.double().norm(dim=1, keepdim=True)
    cn = c.double() / c.double().norm(dim=1, keepdim=True)
    s = (qn[:, None, :] * cn[None, :, :]).sum(-1)  # per pair: duplicate rows score exactly alike
    idx, val = [], []
    for i in range(len(q)):
        ps = s[i, pos[i]]
        keep = [
            j
            for j in range(len(c))
            if j != pos[i]
            and not (margin is not None and s[i, j] > ps - margin)
            and not (max_ratio is not None and s[i, j] > max_ratio * ps)
        ]
        keep = sorted(keep, key=lambda j: (-s[i, j].item(), j))[:k]
        idx.append(keep + [-1] * (k - len(keep)))
        val.append([s[i, j].item() for j in keep] + [float("-inf")] * (k - len(keep)))
    return torch.tensor(idx, dtype=torch.long), torch.tensor(val, dtype=torch.float64)


def _check(got, want):
    (gi, gv), (wi, wv) = got, want
    assert gi.tolist() == wi.tolist()
    assert gv.dtype == torch.float32
    assert torch.equal(gv == float("-inf"), wv == float("-inf"))
    fin = wv != float("-inf")
    assert torch.allclose(gv[fin].double(), wv[fin], atol=1e-6)


def _random(q=9, n=40, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(q, d, generator=g), torch.randn(n, d, generator=g), torch.randint(0, n, (q,), generator=g)


def _exact(q=9, n=40, d=12, seed=1):
    """Entries in {-1, 0, 1} with exactly 4 non-zeros: normalised entries are +-0.5 and every score is a
    multiple of 0.25 computed exactly in float32, so ties are real ties whatever the matmul's shape.
    Rows 5, 17, 31 and 38 duplicate row 2; query 0 is row 2 and its positive row 17."""
    g = torch.Generator().manual_seed(seed)

    def rows(m):
        x = torch.zeros(m, d)
        for r in range(m):
            cols = torch.randperm(d, generator=g)[:4]
            x[r, cols] = torch.randint(0, 2, (4,), generator=g).float() * 2 - 1
        return x

    qq, c = rows(q), rows(n)
    c[[5, 17, 31, 38]] = c[2].clone()
    qq[0] = c[2]
    pos = torch.randint(0, n, (q,), generator=g)
    pos[0] = 17
    return qq, c, pos


FILTERS = [(None, None), (0.05, None), (None, 0.9), (0.1, 0.8)]
# (candidate_block, chunk_size): 8 divides N=40; 40 = N (no tiling); 1000 > N; None = auto
BLOCKS = [(1, 1024), (7, 4), (8, 1024), (40, 4), (1000, 1024), (None, 4), (None, 1024)]


@pytest.mark.parametrize("margin, max_ratio", FILTERS)
def test_random_matches_reference_for_every_block(margin, max_ratio):
    q, c, pos = _random()
    want = _reference(q, c, pos, 6, margin, max_ratio)
    for block, chunk in BLOCKS:
        _check(mine_hard_negatives(q, c, pos, 6, margin, max_ratio, chunk, candidate_block=block), want)


@pytest.mark.parametrize("margin, max_ratio", [(None, None), (0.0, None), (0.25, None), (None, 1.0), (None, 0.5)])
def test_ties_go_to_the_lower_index(margin, max_ratio):
    """Many exact ties (duplicates and equal scores) at the top-k cut, at block edges and at the filter bound
    (``score == pos - margin`` and ``score == max_ratio * pos`` are kept: the filter is strict)."""
    q, c, pos = _exact()
    want = _reference(q, c, pos, 9, margin, max_ratio)
    for block, chunk in BLOCKS:
        _check(mine_hard_negatives(q, c, pos, 9, margin, max_ratio, chunk, candidate_block=block), want)
    # the tie rule, spelled out: query 0's positive (row 17) is skipped, its duplicates 2, 5, 31, 38 come in order
    idx = mine_hard_negatives(q, c, pos, 4, candidate_block=3)[0][0].tolist()
    assert idx == [2, 5, 31, 38]


def test_k_beyond_what_the_filter_leaves_pads_with_minus_one():
    q, c, pos = _random(n=30)
    want = _reference(q, c, pos, 30, 0.3, None)  # k = N: at least the positive is always missing
    assert (want[0][:, -1] == -1).all() and (want[0] == -1).sum() > len(q)
    for block in (1, 7, 30, None):
        _check(mine_hard_negatives(q, c, pos, 30, 0.3, None, 4, candidate_block=block), want)
    # nothing passes the filter at all: every slot is padding
    idx, val = mine_hard_negatives(q, c, pos, 3, margin=5.0, candidate_block=4)
    assert (idx == -1).all() and (val == float("-inf")).all()


def test_fewer_candidates_than_k_is_an_error():
    q, c, pos = _random(n=5)
    with pytest.raises(ValueError, match="k must be in 1..5"):
        mine_hard_negatives(q, c, pos, 6, candidate_block=2)
    with pytest.raises(ValueError, match="candidate_block must be >= 1"):
        mine_hard_negatives(q, c, pos, 2, candidate_block=0)


def test_auto_block_tiles_within_the_budget(monkeypatch):
    """The default block keeps a [chunk, block] float32 tile within TILE_BYTES: shrink it to tile small inputs."""
    q, c, pos = _exact()
    want = _reference(q, c, pos, 5, 0.25, None)
    monkeypatch.setattr(mining, "TILE_BYTES", 4 * 4 * 6)  # chunk 4 -> blocks of 6 candidates
    _check(mine_hard_negatives(q, c, pos, 5, 0.25, None, chunk_size=4), want)


def test_float64_inputs_and_no_queries():
    q, c, pos = _random()
    _check(mine_hard_negatives(q.double(), c.double(), pos, 4, 0.1, candidate_block=7), _reference(q, c, pos, 4, 0.1))
    idx, val = mine_hard_negatives(q[:0], c, pos[:0], 4, margin=0.1, candidate_block=7)
    assert idx.shape == (0, 4) and val.shape == (0, 4)


# ---------------------------------------------------------------- evaluation: the same tiled top-k (embed.top_scores)


def _eval_case(q=14, n=30, d=6, seed=4):
    """Entries in {-1, 0, 1}: dot products are small integers, exact in float32, with many real ties."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 2, (q, d), generator=g).float(), torch.randint(-1, 2, (n, d), generator=g).float()


def _label_set(n=30, q=14, classes=4, seed=5):
    """A LabelRetrievalSet whose queries are corpus rows 0..q-1 (own row excluded), labels i % classes."""
    from vembed_blocks.embed import LabelRetrievalSet

    labels = [i % classes for i in range(n)]
    rel = [{j for j in range(n) if labels[j] == labels[i]} - {i} for i in range(q)]
    return LabelRetrievalSet(list(range(q)), list(range(n)), rel, labels[:q], labels, list(range(q)))


@pytest.mark.parametrize("labels", [False, True])
@pytest.mark.parametrize("ks, curve_k", [((1, 3, 5), 7), ((1, 10), 0), ((1, 40), 45)])
def test_evaluation_top_scores_rank_as_the_full_matrix(monkeypatch, labels, ks, curve_k):
    """retrieval_metrics and recall_curve on top_scores equal those on the full self-excluded [Q, N] matrix,
    bit for bit, with tiles over queries and documents (TILE_BYTES shrunk): cut-offs below N, at N and beyond."""
    from vembed_blocks.embed import RetrievalSet, self_excluded_scores, top_scores
    from vembed_blocks.metrics import recall_curve, retrieval_metrics

    q, d = _eval_case()
    if labels:
        rs = _label_set()
        q[:5] = d[:5]  # queries that are their own corpus rows: the best score, excluded
    else:
        g = torch.Generator().manual_seed(6)
        rs = RetrievalSet(
            list(range(14)),
            list(range(30)),
            [set(torch.randperm(30, generator=g)[: 1 + i % 3].tolist()) for i in range(14)],
        )
    full = self_excluded_scores(rs, q @ d.T)
    want = retrieval_metrics(full, rs.relevant, ks=ks)
    monkeypatch.setattr(mining, "TILE_BYTES", 4 * 4 * 7)  # chunk 4 -> blocks of 7 documents
    scores, relevant = top_scores(rs, q, d, max([*ks, curve_k]), chunk_size=4)
    assert scores.shape[1] < 30 or max(ks) >= 30  # bounded where the cut-offs allow it
    assert retrieval_metrics(scores, relevant, ks=ks) == want
    if curve_k:
        assert recall_curve(scores, relevant, max_k=curve_k) == recall_curve(full, rs.relevant, max_k=curve_k)


def test_evaluate_retrieval_by_never_builds_the_full_matrix(monkeypatch):
    """Dot-product evaluation goes through top_scores: the [Q, N] product is never taken."""
    from vembed_blocks import embed
    from vembed_blocks.data.records import Item, Record

    records = [Record(Item(text=f"q{i}"), Item(text=f"d{i}"), [Item(text=f"n{i}")]) for i in range(12)]
    items = [it for r in records for it in (r.query, r.positive, *r.negatives)]
    vec = dict(zip(items, torch.randn(len(items), 8, generator=torch.Generator().manual_seed(7))))
    encode = lambda items, is_query: torch.stack([vec[it] for it in items])  # noqa: E731
    want = embed.evaluate_retrieval_by(records, encode, ks=(1, 3), curve_k=4, score=lambda a, b: a @ b.T)
    calls = []
    real = embed.top_scores
    monkeypatch.setattr(embed, "top_scores", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    got = embed.evaluate_retrieval_by(records, encode, ks=(1, 3), curve_k=4)
    assert got == want and calls == [4]
