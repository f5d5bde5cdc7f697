"""retrieval_set groups queries/docs by value; embed_items batches in order."""

from types import SimpleNamespace as NS

import pytest
import torch

from vembed_blocks.data.records import Item
from vembed_blocks.embed import embed_items, retrieval_set


def rec(q, p, negs=()):
    return NS(query=Item(text=q), positive=Item(images=(p,)), negatives=[Item(images=(n,)) for n in negs])


def test_retrieval_set_merges_repeated_queries_and_docs():
    records = [
        rec("cat", "c.png", ["d.png"]),
        rec("dog", "d.png"),
        rec("cat", "c2.png"),
        rec("bird", "b.png", ["x.png"]),
    ]
    rs = retrieval_set(records)
    assert [q.text for q in rs.queries] == ["cat", "dog", "bird"]
    assert [d.images[0] for d in rs.docs] == ["c.png", "d.png", "c2.png", "b.png", "x.png"]
    assert rs.relevant == [{0, 2}, {1}, {3}]
    assert len(retrieval_set(records, include_negatives=False).docs) == 4


def test_embed_items_keeps_order_across_batches():
    items = list(range(10))
    out = embed_items(items, lambda b: torch.tensor(b, dtype=torch.float32)[:, None] * 2, batch_size=3)
    assert out.flatten().tolist() == [2.0 * i for i in range(10)]
    with pytest.raises(ValueError, match="returned 1 rows for 3 items"):
        embed_items(items, lambda b: torch.zeros(1, 2), batch_size=3)


def _tokens(batch):
    """Token outputs whose length depends on the batch: item i has i % 4 + 1 real tokens of value i."""
    length = max(i % 4 + 1 for i in batch)
    mask = torch.tensor([[t < i % 4 + 1 for t in range(length)] for i in batch])
    return torch.tensor(batch, dtype=torch.float32)[:, None, None].expand(-1, length, 2) * mask[..., None], mask


def _expected_tokens(n):
    mask = torch.tensor([[t < i % 4 + 1 for t in range(4)] for i in range(n)])
    return torch.arange(n, dtype=torch.float32)[:, None, None].expand(-1, 4, 2) * mask[..., None], mask


def _all_ranks_body(rank, world):
    from vembed_blocks.embed import embed_on_all_ranks

    calls = []
    pooled = embed_on_all_ranks(list(range(11)), lambda b: calls.append(len(b)) or torch.tensor(b)[:, None] * 1.0, 2)
    tokens, mask = embed_on_all_ranks(list(range(11)), _tokens, 3)
    return pooled, tokens, mask, calls


def test_embed_on_all_ranks_splits_work_and_returns_every_row():
    from _multiproc import run_ranks

    want_tokens, want_mask = _expected_tokens(11)
    for world in (2, 3):
        results = run_ranks(_all_ranks_body, world, timeout=120)
        for pooled, tokens, mask, calls in results:
            assert pooled.flatten().tolist() == [float(i) for i in range(11)]
            assert torch.equal(tokens, want_tokens) and torch.equal(mask, want_mask)
        assert len({sum(r[3]) for r in results}) == 1 and sum(results[0][3]) == -(-11 // world)  # equal work
    tokens, mask = embed_items(list(range(11)), _tokens, 3)  # one process: the same, padded across batches
    assert torch.equal(tokens, want_tokens) and torch.equal(mask, want_mask)


def test_evaluate_retrieval_scores_unique_queries_against_the_corpus():
    from vembed_blocks.embed import evaluate_retrieval

    records = [rec("cat", "c.png", ["d.png"]), rec("dog", "d.png"), rec("bird", "b.png")]
    vec = {"cat": [1.0, 0.0], "dog": [0.0, 1.0], "bird": [0.6, 0.8], "c.png": [0.0, 1.0], "d.png": [1.0, 0.0]}
    vec["b.png"] = [0.6, 0.8]

    def encode(items, is_query):
        return torch.tensor([vec[i.text] if is_query else vec[i.images[0]] for i in items])

    # cat: c.png scores 0 (rank 3 of c, d, b = 0, 1, 0.6); dog: d.png ranks 3; bird: b.png ranks 1
    got = evaluate_retrieval(records, encode, batch_size=2)
    assert got["recall@1"] == pytest.approx(1 / 3) and got["mrr@10"] == pytest.approx((1 / 3 + 1 / 3 + 1) / 3)


def _bad_encoder(bad_item: str, value: float, seen: list):
    """The encoder of the test above, except that ``bad_item`` embeds to ``[value, 0]``; records each call's side."""
    vec = {"cat": [1.0, 0.0], "dog": [0.0, 1.0], "bird": [0.6, 0.8], "c.png": [0.0, 1.0], "d.png": [1.0, 0.0]}
    vec["b.png"] = [0.6, 0.8]
    vec[bad_item] = [value, 0.0]

    def encode(items, is_query):
        seen.append(is_query)
        return torch.tensor([vec[i.text] if is_query else vec[i.images[0]] for i in items])

    return encode


def test_evaluate_retrieval_refuses_nan_or_inf_embeddings():
    from vembed_blocks.embed import evaluate_retrieval

    records = [rec("cat", "c.png", ["d.png"]), rec("dog", "d.png"), rec("bird", "b.png")]  # corpus: c, d, b
    seen: list = []
    with pytest.raises(ValueError) as err:
        evaluate_retrieval(records, _bad_encoder("dog", float("nan"), seen), batch_size=2)
    assert str(err.value) == (
        "1 of 3 query embeddings are not finite (NaN/inf), first row 1: the model produced NaN; "
        "refusing to compute retrieval metrics"
    )
    assert False not in seen  # refused before the corpus was embedded
    with pytest.raises(ValueError) as err:
        evaluate_retrieval(records, _bad_encoder("b.png", float("inf"), []), batch_size=2)
    assert str(err.value) == (
        "1 of 3 document embeddings are not finite (NaN/inf), first row 2: the model produced inf; "
        "refusing to compute retrieval metrics"
    )
