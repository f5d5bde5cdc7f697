"""Length-sorted, trimmed chunks (vembed_blocks.length_chunks): loss and gradients equal the untrimmed full
batch (float64, a real BERT through from_pretrained), every chunk is cut to its own longest row, the output
comes back in input order, dropout replays bit-identically under GradCache, left padding is sorted only."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _gradcache_refs import Tower
from _tiny_models import WORDS, tiny_bert

from vembed_blocks.gradcache import GradCache
from vembed_blocks.length_chunks import LengthSplit, encode_in_length_chunks, is_right_padded

LENGTHS_Q = [3, 1, 9, 4, 2, 12, 5, 1, 7, 3]  # words per text: ragged, unsorted, ties
LENGTHS_D = [14, 2, 6, 30, 9, 1, 17, 4, 25, 8]


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    from transformers import AutoTokenizer, BertModel

    folder = tiny_bert(str(tmp_path_factory.mktemp("bert")), dropout=0.0)
    return BertModel.from_pretrained(folder).double().eval(), AutoTokenizer.from_pretrained(folder)


def texts(lengths: list[int], seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=g)) for n in lengths]


def tokens(tok, lengths: list[int], seed: int) -> dict[str, torch.Tensor]:
    """The tokenizer's right-padded batch plus ``token_type_ids`` (alternating 0/1: they matter) and
    ``position_ids``, so that every [B, L] input must be cut alike."""
    enc = dict(tok(texts(lengths, seed), padding=True, return_tensors="pt"))
    positions = torch.arange(enc["input_ids"].shape[1]).expand_as(enc["input_ids"])
    return {**enc, "token_type_ids": positions % 2 * enc["attention_mask"], "position_ids": positions.contiguous()}


def mean_pooled(model, seen: list | None = None):
    def fn(**x: torch.Tensor) -> torch.Tensor:
        if seen is not None:
            seen.append({k: v.clone() for k, v in x.items()})
        h = model(**x).last_hidden_state
        m = x["attention_mask"].unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1)

    return fn


def dense_loss(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """InfoNCE written out: -log softmax of the diagonal of cos(q, d) / 0.05."""
    s = F.normalize(q, dim=-1) @ F.normalize(d, dim=-1).T / 0.05
    return (torch.logsumexp(s, 1) - s.diagonal()).mean()


def loss_and_grads(model, encode) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad()
    loss = dense_loss(encode("q"), encode("d"))
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def assert_relative(got: list[torch.Tensor], want: list[torch.Tensor], tol: float) -> None:
    """Each gradient within ``tol`` of the reference, relative to the largest one (the position embeddings of
    columns that are padding in every row get ~1e-20 untrimmed, exactly 0 trimmed: both are zero)."""
    assert len(got) == len(want)
    scale = max(b.norm() for b in want)
    for a, b in zip(got, want):
        assert (a - b).norm() <= tol * max(b.norm(), 1e-9 * scale), ((a - b).norm(), b.norm())


def test_is_right_padded() -> None:
    assert is_right_padded(torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]]))
    assert not is_right_padded(torch.tensor([[0, 1, 1], [1, 1, 1]]))  # left padding
    assert not is_right_padded(torch.tensor([[1, 0, 1]]))  # a hole
    assert not is_right_padded(torch.tensor([[2, 1, 0]]))  # not 0/1
    assert is_right_padded(torch.tensor([[True, False]]))


@pytest.mark.parametrize("path", ["plain", "gradcache", "gradcache_classic", "gradcache_max_tokens"])
def test_trimmed_chunks_equal_the_padded_batch_in_float64(bert, path: str) -> None:
    model, tok = bert
    inputs = {"q": tokens(tok, LENGTHS_Q, 1), "d": tokens(tok, LENGTHS_D, 2)}
    fn = mean_pooled(model)
    _, want = loss_and_grads(model, lambda side: fn(**inputs[side]))
    want_loss = dense_loss(fn(**inputs["q"]), fn(**inputs["d"])).detach()
    seen: list = []
    fn_seen = mean_pooled(model, seen)
    if path == "plain":
        encode = lambda side: encode_in_length_chunks(fn_seen, inputs[side], 3, min_tokens=0)
    else:
        options = {"memory_budget": 0} if path == "gradcache_classic" else {}
        size = {"max_tokens": 40} if path == "gradcache_max_tokens" else {"chunk_size": 3}
        gc = GradCache(**size, **options, splitter=LengthSplit)
        encode = lambda side: gc.encode(fn_seen, **inputs[side])
    loss, got = loss_and_grads(model, encode)
    assert abs(loss - want_loss) <= 1e-9 * abs(want_loss)
    assert_relative(got, want, 1e-9)
    # Every chunk fn saw (first passes and replays) was cut to its own longest row, rows longest first.
    assert min(c["input_ids"].shape[1] for c in seen) < inputs["d"]["input_ids"].shape[1]  # something was cut
    for c in seen:
        m = c["attention_mask"]
        assert m[:, -1].all() if len(m) == 1 else m[0, -1] == 1, "the chunk is wider than its longest row"
        assert torch.equal(m.sum(1), m.sum(1).sort(descending=True).values)
        assert c["token_type_ids"].shape == c["position_ids"].shape == m.shape


def test_chunk_widths_follow_the_sorted_lengths(bert) -> None:
    _, tok = bert
    inputs = tokens(tok, LENGTHS_D, 2)
    split = LengthSplit(((), inputs))
    real = inputs["attention_mask"].sum(1)
    want_rows = sorted(range(len(real)), key=lambda i: -int(real[i]))  # stable: ties keep input order
    assert split.order.tolist() == want_rows
    chunk = split[3:6][1]
    assert chunk["input_ids"].shape == (3, int(real[want_rows[3]]))
    assert torch.equal(chunk["input_ids"], inputs["input_ids"][want_rows[3:6], : int(real[want_rows[3]])])
    out = torch.arange(len(real), dtype=torch.float64)[:, None]  # "row i of the sorted batch"
    assert split.restore(out).squeeze(1).tolist() == [want_rows.index(i) for i in range(len(real))]


def test_rows_come_back_in_input_order(bert) -> None:
    model, tok = bert
    inputs = tokens(tok, LENGTHS_D, 3)
    fn = mean_pooled(model)
    with torch.no_grad():
        alone = torch.cat([fn(**{k: v[i : i + 1] for k, v in inputs.items()}) for i in range(len(LENGTHS_D))])
        got = encode_in_length_chunks(fn, inputs, 4, min_tokens=0)
        via_gc = GradCache(chunk_size=4, splitter=LengthSplit).encode(fn, **inputs)
    torch.testing.assert_close(got, alone, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(via_gc, alone, rtol=1e-12, atol=1e-12)


def test_dropout_replay_of_trimmed_chunks_is_exact() -> None:
    """GradCache over LengthSplit replays each trimmed chunk with its RNG: gradients equal the plain trimmed
    forward drawing the same random numbers (same chunks, same order), classic or with kept graphs."""
    from _gradcache_refs import batch

    tower = Tower(dropout=0.3)
    q_in, d_in = batch(9, 30, length=11), batch(9, 31, length=11)

    def run(encode, model) -> list[torch.Tensor]:
        model.zero_grad()
        torch.manual_seed(7)
        dense_loss(encode(model, q_in), encode(model, d_in)).backward()
        return [p.grad.clone() for p in model.parameters()]

    want = run(lambda m, x: encode_in_length_chunks(m, x, 4, min_tokens=0), copy.deepcopy(tower))
    for options in ({}, {"memory_budget": 0}):
        gc = GradCache(chunk_size=4, splitter=LengthSplit, **options)
        got = run(lambda m, x: gc.encode(m, **x), copy.deepcopy(tower))
        for a, b in zip(got, want):
            assert torch.equal(a, b) or (a - b).norm() <= 1e-6 * b.norm()


def test_gradcache_keeps_the_widest_chunk_graph(bert) -> None:
    """keep_graphs=1 keeps the costliest chunk's graph: with LengthSplit the cost is padded tokens, so the widest
    (first) chunk is run once and never replayed, the narrower ones twice."""
    model, tok = bert
    inputs = tokens(tok, LENGTHS_D, 2)
    seen: list = []
    gc = GradCache(chunk_size=4, splitter=LengthSplit)
    emb = gc.encode(mean_pooled(model, seen), **inputs)
    emb.pow(2).sum().backward()
    widths = [c["input_ids"].shape[1] for c in seen]
    real = sorted(inputs["attention_mask"].sum(1).tolist(), reverse=True)
    assert widths == [real[0], real[4], real[8], real[4], real[8]]  # first pass, then the replays
    split = LengthSplit(((), inputs))
    assert split.costs([(0, 4), (4, 8), (8, 10)]) == [4 * real[0], 4 * real[4], 2 * real[8]]


def test_left_padding_is_not_trimmed(bert) -> None:
    model, _ = bert
    g = torch.Generator().manual_seed(5)
    lengths = torch.tensor([2, 6, 1, 4])
    mask = (torch.arange(6)[None] >= 6 - lengths[:, None]).long()  # left-padded
    inputs = {"input_ids": torch.randint(1, 20, (4, 6), generator=g) * mask, "attention_mask": mask}
    split = LengthSplit(((), inputs))
    assert not split.trimmed and split[0:2][1]["input_ids"].shape == (2, 6)
    seen: list = []
    with torch.no_grad():
        got = encode_in_length_chunks(mean_pooled(model, seen), inputs, 2)
        want = mean_pooled(model)(**inputs)
    assert [c["input_ids"].shape for c in seen] == [(4, 6)]  # nothing to trim: one call, as given
    assert torch.equal(seen[0]["input_ids"], inputs["input_ids"])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    chunks = GradCache(chunk_size=2, splitter=LengthSplit)  # GradCache chunks sorted, full width
    with torch.no_grad():
        torch.testing.assert_close(chunks.encode(mean_pooled(model), **inputs), want, rtol=1e-12, atol=1e-12)


def test_chunks_only_where_they_cut_enough_padding(bert) -> None:
    """min_saving: lengths 12..14 in a batch padded to 14 would save under 20% of the padded tokens, so fn
    runs once on the batch as given; with min_saving=0 it runs on the sorted, trimmed chunks. min_tokens: a
    batch of fewer padded tokens runs once however much it would save."""
    model, tok = bert
    inputs = tokens(tok, [12, 11, 12, 10, 12, 11], 4)  # + [CLS]/[SEP]: 12..14 tokens
    split = LengthSplit(((), inputs))
    real = sorted(inputs["attention_mask"].sum(1).tolist(), reverse=True)
    assert split.padded_tokens(2) == (6 * 14, sum(2 * real[s] for s in (0, 2, 4)))
    spread = tokens(tok, LENGTHS_D, 2)  # 10 rows padded to 32: 320 tokens, chunks of 2 would cut over half
    for batch, options, calls in (
        (inputs, dict(min_saving=0.2, min_tokens=0), [6]),
        (inputs, dict(min_saving=0.0, min_tokens=0), [2, 2, 2]),
        (spread, dict(min_tokens=321), [10]),
        (spread, dict(min_tokens=320), [2] * 5),
    ):
        seen: list = []
        with torch.no_grad():
            encode_in_length_chunks(mean_pooled(model, seen), batch, 2, **options)
        assert [len(c["input_ids"]) for c in seen] == calls, options


def test_inputs_without_a_mask_pass_through() -> None:
    pixels = torch.randn(5, 3, 4, 4)
    split = LengthSplit(((), {"pixel_values": pixels}))
    assert split.order is None and not split.trimmed
    assert torch.equal(split[1:3][1]["pixel_values"], pixels[1:3])
    # A [B, C, H, W] tensor beside a mask whose length equals C is not cut (only [B, L] tensors are).
    mask = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]])
    chunk = LengthSplit(((), {"attention_mask": mask, "pixel_values": pixels}))[3:5][1]
    assert chunk["attention_mask"].shape == (2, 1) and chunk["pixel_values"].shape == (2, 3, 4, 4)
    with pytest.raises(ValueError, match="chunk_size"):
        encode_in_length_chunks(lambda **x: x["attention_mask"].float(), {"attention_mask": mask}, 0)
