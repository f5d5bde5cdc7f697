"""retrieval_metrics against hand-computed rankings and a brute-force reference; search vs dense sort."""

import math

import pytest
import torch

from vembed_blocks.metrics import retrieval_metrics, search


def log2(x):
    return math.log(x, 2)


def test_hand_made_rankings_with_ties_multiple_relevant_and_no_relevant():
    scores = torch.tensor(
        [
            [0.9, 0.5, 0.5, 0.1, 0.7],  # ranking 0,4,1,2,3 (tie 1/2 -> lower index first); relevant {2,3} at ranks 4,5
            [0.2, 0.8, 0.8, 0.8, 0.0],  # ranking 1,2,3,0,4; relevant {3} at rank 3
            [0.1, 0.2, 0.3, 0.4, 0.5],  # no relevant doc: left out of the averages
        ]
    )
    m = retrieval_metrics(scores, [{2, 3}, {3}, set()], ks=(1, 3, 5))
    expect = {
        "recall@1": 0.0,
        "hit@1": 0.0,
        "mrr@1": 0.0,
        "ndcg@1": 0.0,
        "map@1": 0.0,
        "recall@3": (0 + 1) / 2,
        "hit@3": 0.5,
        "mrr@3": (0 + 1 / 3) / 2,
        "ndcg@3": (0 + (1 / log2(4)) / 1) / 2,
        "map@3": (0 + 1 / 3) / 2,
        "recall@5": 1.0,
        "hit@5": 1.0,
        "mrr@5": (1 / 4 + 1 / 3) / 2,
        "ndcg@5": ((1 / log2(5) + 1 / log2(6)) / (1 + 1 / log2(3)) + 0.5) / 2,
        "map@5": ((1 / 4 + 2 / 5) / 2 + 1 / 3) / 2,
    }
    assert m.keys() == expect.keys()
    for name, v in expect.items():
        assert m[name] == pytest.approx(v, abs=1e-12), name


def brute_force(scores, relevant, k):
    """Plain per-query reference straight from the trec_eval definitions."""
    out = {f"{n}@{k}": [] for n in ("recall", "hit", "mrr", "ndcg", "map")}
    for i, rel in enumerate(relevant):
        if not rel:
            continue
        ranked = sorted(range(scores.shape[1]), key=lambda d: (-scores[i, d].item(), d))[:k]
        ranks = [r + 1 for r, d in enumerate(ranked) if d in rel]
        out[f"recall@{k}"].append(len(ranks) / len(rel))
        out[f"hit@{k}"].append(1.0 if ranks else 0.0)
        out[f"mrr@{k}"].append(1 / ranks[0] if ranks else 0.0)
        idcg = sum(1 / log2(r + 1) for r in range(1, min(k, len(rel)) + 1))
        out[f"ndcg@{k}"].append(sum(1 / log2(r + 1) for r in ranks) / idcg)
        out[f"map@{k}"].append(sum((n + 1) / r for n, r in enumerate(ranks)) / len(rel))
    return {name: sum(v) / len(v) for name, v in out.items()}


def test_random_scores_match_brute_force_with_five_relevant_per_query():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (40, 60), generator=g).float()  # many ties
    relevant = [set(torch.randperm(60, generator=g)[: 1 + i % 5].tolist()) for i in range(40)]
    got = retrieval_metrics(scores, relevant, ks=(1, 5, 10), chunk_size=7)
    for k in (1, 5, 10):
        for name, v in brute_force(scores, relevant, k).items():
            assert got[name] == pytest.approx(v, abs=1e-12), name


def test_label_relevance_excluding_the_query_itself():
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    emb = torch.nn.functional.normalize(torch.randn(6, 4, generator=torch.Generator().manual_seed(1)), dim=-1)
    scores = emb @ emb.T
    got = retrieval_metrics(scores, (labels, labels), ks=(1, 3), exclude_self=True)
    # Reference: drop doc i from query i; label 2 has no other member, so query 5 is left out.
    relevant = []
    for i in range(6):
        rel = {j for j in range(6) if labels[j] == labels[i] and j != i}
        relevant.append(rel)
    masked = scores.clone()
    masked.fill_diagonal_(float("-inf"))
    for k in (1, 3):
        for name, v in brute_force(masked, relevant, k).items():
            assert got[name] == pytest.approx(v, abs=1e-12), name


def test_bad_inputs():
    with pytest.raises(ValueError, match="no query has a relevant document"):
        retrieval_metrics(torch.zeros(2, 3), [set(), set()])
    with pytest.raises(ValueError, match="2 relevance sets for 3 queries"):
        retrieval_metrics(torch.zeros(3, 3), [{0}, {1}])
    with pytest.raises(ValueError, match="outside 0..2"):
        retrieval_metrics(torch.zeros(1, 3), [{5}])
    with pytest.raises(ValueError, match="exclude_self needs Q == N"):
        retrieval_metrics(torch.zeros(2, 3), [{0}, {1}], exclude_self=True)


# Two queries, three documents. Query 0 ranks 1,2,0 and its relevant {0, 2} sit at ranks 3 and 2;
# query 1 ranks 1,2,0 and its relevant {1, 2} sit at ranks 1 and 2.
TWO_QUERY_SCORES = torch.tensor([[0.2, 0.9, 0.5], [0.1, 0.8, 0.3]])
TWO_QUERY_EXPECT = {
    "recall@1": (0 + 1 / 2) / 2,
    "hit@1": (0 + 1) / 2,
    "mrr@1": (0 + 1) / 2,
    "ndcg@1": (0 + 1) / 2,
    "map@1": (0 + (1 / 1) / 2) / 2,
    "recall@2": (1 / 2 + 1) / 2,
    "hit@2": 1.0,
    "mrr@2": (1 / 2 + 1) / 2,
    "ndcg@2": ((1 / log2(3)) / (1 + 1 / log2(3)) + 1) / 2,
    "map@2": ((1 / 2) / 2 + (1 / 1 + 2 / 2) / 2) / 2,
}


@pytest.mark.parametrize("container", [tuple, list])
def test_two_relevant_sets_for_two_queries_are_sets_not_a_label_pair(container):
    # A 2-tuple of sets with Q == 2 used to be read as (query_labels, doc_labels), giving 1.0 everywhere.
    m = retrieval_metrics(TWO_QUERY_SCORES, container([{0, 2}, {1, 2}]), ks=(1, 2))
    assert m.keys() == TWO_QUERY_EXPECT.keys()
    for name, v in TWO_QUERY_EXPECT.items():
        assert m[name] == pytest.approx(v, abs=1e-12), name


def test_label_pair_read_only_with_lengths_q_and_n():
    # query labels [Q=3], doc labels [N=4]; "cow" has no document, so query 2 is left out.
    scores = torch.tensor([[0.1, 0.9, 0.8, 0.0], [0.9, 0.1, 0.2, 0.3], [0.5, 0.4, 0.3, 0.2]])
    m = retrieval_metrics(scores, (["cat", "dog", "cow"], ["dog", "cat", "cat", "bird"]), ks=(1, 2))
    # query 0 (cat -> docs {1, 2}) ranks 1,2,...: both in the top 2; query 1 (dog -> doc {0}) ranks it first.
    assert m["recall@1"] == pytest.approx((1 / 2 + 1) / 2) and m["recall@2"] == pytest.approx(1.0)
    assert m["map@1"] == pytest.approx((1 / 2 + 1) / 2) and m["ndcg@2"] == pytest.approx(1.0)
    # Tensor labels with Q == N == 2 are still labels (ordered vectors, not sets): doc 1 for query 0, doc 0 for query 1.
    labels = (torch.tensor([7, 8]), torch.tensor([8, 7]))
    m = retrieval_metrics(torch.tensor([[0.9, 0.1], [0.9, 0.1]]), labels, ks=(1,))
    assert m["recall@1"] == pytest.approx((0 + 1) / 2)


def test_relevant_of_the_wrong_shape_raises_saying_what_was_expected():
    expected = (
        r"expected 3 relevance sets \(document indices, one per query\) "
        r"or a pair \(query_labels\[3\], doc_labels\[4\]\); got a tuple of 2 with element lengths "
    )
    # doc labels one too long: used to be read as labels and fail as "document(s) [4] outside 0..3".
    with pytest.raises(ValueError, match=expected + r"\[3, 5\]"):
        retrieval_metrics(torch.zeros(3, 4), ([0, 1, 2], [0, 1, 2, 1, 0]))
    with pytest.raises(ValueError, match=expected + r"\[2, 4\]"):
        retrieval_metrics(torch.zeros(3, 4), ([0, 1], [0, 1, 2, 1]))  # query labels one short
    # Q == N == 2 but three doc labels: used to be silently read as labels; strings are not doc indices.
    with pytest.raises(ValueError, match=r"doc_labels\[2\]\); got a tuple of 2 with element lengths \[2, 3\]"):
        retrieval_metrics(torch.zeros(2, 2), (["a", "b"], ["a", "b", "c"]))
    with pytest.raises(ValueError, match=r"3 relevance sets for 2 queries; expected 2 relevance sets"):
        retrieval_metrics(torch.zeros(2, 2), ({0}, {1}, {0}))
    with pytest.raises(ValueError, match=r"lengths \[1, 1\] \('float' object cannot be interpreted as an integer\)"):
        retrieval_metrics(torch.zeros(2, 2), [{0.5}, {1}])  # a float is not a document index


@pytest.mark.parametrize("chunk_size", [1, 7, 50, 1000])
def test_search_equals_dense_sort(chunk_size):
    g = torch.Generator().manual_seed(2)
    q, d = torch.randn(9, 16, generator=g), torch.randn(50, 16, generator=g)
    q[0] = 0  # an all-tie row: order must be by index
    s, i = search(q, d, k=10, chunk_size=chunk_size)
    full = q @ d.T
    want = torch.sort(full, dim=1, descending=True, stable=True)
    assert torch.equal(i, want.indices[:, :10])
    assert torch.allclose(s, want.values[:, :10])
    assert i[0].tolist() == list(range(10))


def test_format_table_columns():
    from vembed_blocks.metrics import format_table

    before = {"recall@1": 0.1, "mrr@10": 0.25}
    assert (
        format_table(before, names=("recall@1", "mrr@10"))
        == "metric       before\nrecall@1     0.1000\nmrr@10       0.2500"
    )
    assert format_table(before, {"recall@1": 0.5, "mrr@10": 1.0}, names=("mrr@10",)).splitlines() == [
        "metric       before    after",
        "mrr@10       0.2500   1.0000",
    ]


def test_non_finite_embeddings_are_refused_naming_the_count_and_first_row():
    from vembed_blocks.metrics import check_finite

    q = torch.ones(120, 4)
    q[7, 2], q[50, 0], q[90] = float("nan"), float("inf"), float("-inf")
    with pytest.raises(ValueError) as err:
        check_finite(q, "query embeddings")
    assert str(err.value) == (
        "3 of 120 query embeddings are not finite (NaN/inf), first row 7: the model produced NaN; "
        "refusing to compute retrieval metrics"
    )
    check_finite(torch.ones(3, 4), "query embeddings")  # finite: nothing happens
    # Multi-vector output (tokens, mask): padding is never scored, so only real tokens count.
    tokens, mask = torch.ones(2, 3, 4), torch.tensor([[True, True, False], [True, False, False]])
    tokens[0, 2] = float("nan")
    check_finite((tokens, mask), "query embeddings")
    tokens[1, 0, 3] = float("-inf")
    with pytest.raises(ValueError, match=r"^1 of 2 query embeddings .* first row 1: the model produced inf;"):
        check_finite((tokens, mask), "query embeddings")


def test_search_refuses_nan_embeddings_on_either_side():
    q, d = torch.ones(3, 4), torch.ones(5, 4)
    d[4, 0] = float("nan")
    with pytest.raises(ValueError) as err:
        search(q, d, k=2)
    assert str(err.value) == (
        "1 of 5 document embeddings are not finite (NaN/inf), first row 4: the model produced NaN; refusing to search"
    )
    q[1], q[2] = float("inf"), float("nan")
    with pytest.raises(ValueError, match=r"^2 of 3 query embeddings are not finite \(NaN/inf\), first row 1: "):
        search(q, d, k=2)


def test_scores_with_nan_or_plus_inf_are_refused_minus_inf_ranks_last():
    from vembed_blocks.metrics import recall_curve

    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.1]])
    scores[0, 0] = float("-inf")  # allowed: document 0 ranks last for query 0 (ranking 2, 1, 0)
    assert retrieval_metrics(scores, [{2}, {1}], ks=(1,))["recall@1"] == 1.0
    assert recall_curve(scores, [{0}, {1}], max_k=3) == [0.5, 0.5, 1.0]
    scores[1, 2] = float("nan")  # NaN sorts first: without the check query 1 would rank document 2 on top
    with pytest.raises(ValueError) as err:
        retrieval_metrics(scores, [{2}, {1}], ks=(1,))
    assert str(err.value) == (
        "retrieval_metrics: 1 of 2 rows of scores hold NaN or +inf, first row 1 (NaN); "
        "refusing to compute retrieval metrics (-inf is allowed: it ranks a document last)"
    )
    scores[1, 2] = float("inf")
    with pytest.raises(ValueError) as err:
        recall_curve(scores, [{2}, {1}], max_k=3)
    assert str(err.value).startswith("recall_curve: 1 of 2 rows of scores hold NaN or +inf, first row 1 (+inf); ")
