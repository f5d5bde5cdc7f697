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
