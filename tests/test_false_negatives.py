"""False-negative rules (duplicates, margin / ratio with weight, guide) on InfoNCE and SigLIP, one process.

Every path (dense, tiled, under GradCache, through Matryoshka) against the pair-by-pair float64
reference in ``fn_refs``: the loss, the input gradients and each rule's hit count. The multi-rank
paths (gathered, ring, ragged) are in tests/test_false_negatives_distributed.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from fn_refs import infonce_fn, siglip_fn

from vembed_blocks.false_negatives import FalseNegatives
from vembed_blocks.gradcache import GradCache
from vembed_blocks.losses import InfoNCE, SigLIP
from vembed_blocks.matryoshka import Matryoshka

B, D, K, G = 6, 4, 2, 3

RULES = {
    "duplicates": (FalseNegatives(), True, False),
    "margin": (FalseNegatives(margin=0.1), False, False),
    "ratio_down": (FalseNegatives(ratio=0.8, weight=0.3), False, False),
    "guide": (FalseNegatives(guide_margin=0.05), False, True),
    "all": (FalseNegatives(margin=0.2, ratio=0.9, weight=0.5, guide_ratio=0.9), True, True),
}


def planted(seed: int = 0, labels: bool = False) -> dict:
    """A batch with planted duplicates: positive 3 = positive 0, negative (1, 0) = positive 2, query 4 = query 1."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    b = {"q": r(B, D), "p": r(B, D), "neg": r(B, K, D), "nmask": torch.rand(B, K, generator=g) > 0.25}
    b["gq"], b["gp"], b["gn"] = r(B, G), r(B, G), r(B, K, G)
    b["qid"], b["pid"] = torch.arange(100, 100 + B), torch.arange(200, 200 + B)
    b["nid"] = torch.arange(300, 300 + B * K).view(B, K)
    b["p"][3], b["pid"][3], b["gp"][3] = b["p"][0], b["pid"][0], b["gp"][0]
    b["neg"][1, 0], b["nid"][1, 0], b["gn"][1, 0], b["nmask"][1, 0] = b["p"][2], b["pid"][2], b["gp"][2], True
    b["q"][4], b["qid"][4], b["gq"][4] = b["q"][1], b["qid"][1], b["gq"][1]
    b["nid"] = b["nid"].masked_fill(~b["nmask"], -1)
    b["labels"] = torch.tensor([0, 1, -1, 2, 1, -1]) if labels else None
    return b


def real_negatives(b: dict, neg: torch.Tensor) -> list:
    return [(neg[i, k], int(b["nid"][i, k]), b["gn"][i, k]) for i in range(B) for k in range(K) if b["nmask"][i, k]]


def inputs(b: dict, with_ids: bool, with_guide: bool, sym: bool = False) -> dict:
    kw = {}
    if with_ids:
        kw["content_ids"] = {"query": b["qid"], "positive": b["pid"], "negatives": b["nid"]}
        if not sym:
            del kw["content_ids"]["query"]
    if with_guide:
        kw["guide"] = {"query": b["gq"], "positive": b["gp"], "negatives": b["gn"]}
    return kw


def leaves(b: dict) -> tuple[torch.Tensor, ...]:
    return tuple(b[k].clone().requires_grad_() for k in ("q", "p", "neg"))


def check(got, want, counts, xs, ref_xs, masked) -> None:
    got.backward()
    want.backward()
    assert abs(got.item() - want.item()) < 1e-12, (got.item(), want.item())
    for x, rx in zip(xs, ref_xs):
        assert torch.allclose(x.grad, rx.grad, atol=1e-12, rtol=0), (x.grad - rx.grad).abs().max()
    assert {k: int(v) for k, v in masked.items()} == counts


@pytest.mark.parametrize("tile", [0, 2])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("name", list(RULES))
def test_infonce_rules_match_reference(name, sym, tile):
    rule, with_ids, with_guide = RULES[name]
    b = planted(labels=name == "all")
    loss = InfoNCE(temperature=0.1, symmetric=sym, tile_size=tile, false_negatives=rule)
    q, p, neg = xs = leaves(b)
    got = loss(q, p, neg, b["nmask"], labels=b["labels"], **inputs(b, with_ids, with_guide, sym))
    rq, rp, rn = ref_xs = leaves(b)
    want, counts = infonce_fn(
        rq, rp, real_negatives(b, rn), b["labels"], 10.0, sym, rule,
        b["qid"] if with_ids else None, b["pid"] if with_ids else None,
        b["gq"] if with_guide else None, b["gp"] if with_guide else None,
    )  # fmt: skip
    assert counts, f"{name}: the planted batch must make the rule hit"
    check(got, want, counts, xs, ref_xs, loss.masked)


@pytest.mark.parametrize("tile", [0, 2])
@pytest.mark.parametrize("name", list(RULES))
def test_siglip_rules_match_reference(name, tile):
    rule, with_ids, with_guide = RULES[name]
    b = planted(seed=1, labels=name == "all")
    loss = SigLIP(temperature=5.0, bias=-2.0, learn=False, tile_size=tile, false_negatives=rule).double()
    q, p, neg = xs = leaves(b)
    got = loss(q, p, b["labels"], neg, b["nmask"], **inputs(b, with_ids, with_guide))
    rq, rp, rn = ref_xs = leaves(b)
    want, counts = siglip_fn(
        rq, rp, real_negatives(b, rn), b["labels"], 5.0, -2.0, rule,
        b["pid"] if with_ids else None, b["gq"] if with_guide else None, b["gp"] if with_guide else None,
    )  # fmt: skip
    assert counts
    check(got, want, counts, xs, ref_xs, loss.masked)


def test_rules_under_gradcache_give_the_full_batch_gradient():
    """GradCache: embeddings cached chunk by chunk, the guide embedded once without gradient."""
    b = planted(seed=2)
    rule = FalseNegatives(margin=0.15, weight=0.5, guide_margin=0.1)
    torch.manual_seed(0)
    enc, guide = nn.Linear(D, D).double(), nn.Linear(D, G).double()
    kw = {"content_ids": {"positive": b["pid"], "negatives": b["nid"]}}
    with torch.no_grad():
        kw["guide"] = {"query": guide(b["q"]), "positive": guide(b["p"]), "negatives": guide(b["neg"])}
    loss = InfoNCE(temperature=0.1, false_negatives=rule)
    gc = GradCache(chunk_size=2)
    q, p = gc.encode(enc, b["q"]), gc.encode(enc, b["p"])
    neg = gc.encode(enc, b["neg"].reshape(-1, D)).view(B, K, D)
    got = loss(q, p, neg, b["nmask"], **kw)
    got.backward()
    grad = enc.weight.grad.clone()
    enc.zero_grad()
    negs = [(enc(b["neg"][i, k]), int(b["nid"][i, k]), kw["guide"]["negatives"][i, k])
            for i in range(B) for k in range(K) if b["nmask"][i, k]]  # fmt: skip
    want, counts = infonce_fn(
        enc(b["q"]), enc(b["p"]), negs, None, 10.0, False, rule, None, b["pid"],
        kw["guide"]["query"], kw["guide"]["positive"],
    )  # fmt: skip
    want.backward()
    assert abs(got.item() - want.item()) < 1e-12
    assert torch.allclose(grad, enc.weight.grad, atol=1e-12, rtol=0)
    assert {k: int(v) for k, v in loss.masked.items()} == counts and set(counts) == {"duplicates", "margin", "guide"}


def test_matryoshka_passes_ids_and_guide_through_untruncated():
    b = planted(seed=3)
    rule = FalseNegatives(margin=0.1, guide_margin=0.05)
    loss = Matryoshka(InfoNCE(temperature=0.1, false_negatives=rule), dims=[4, 2])
    kw = inputs(b, True, True)
    got = loss(b["q"], b["p"], negatives=b["neg"], negatives_mask=b["nmask"], **kw)
    want = 0
    for d in (4, 2):
        cut = {k: b[k][..., :d] for k in ("q", "p", "neg")}
        negs = [(v[:d], c, g) for v, c, g in real_negatives(b, b["neg"])]
        want = want + infonce_fn(cut["q"], cut["p"], negs, None, 10.0, False, rule, None, b["pid"], b["gq"], b["gp"])[0]
    assert abs(got.item() - want.item()) < 1e-12


def test_rule_errors_are_clear():
    b = planted()
    with pytest.raises(ValueError, match="weight must be in"):
        FalseNegatives(weight=1.0)
    with pytest.raises(ValueError, match="need guide embeddings"):
        InfoNCE(false_negatives=FalseNegatives(guide_margin=0.1))(b["q"], b["p"])
    with pytest.raises(ValueError, match=r"content_ids\['positive'\] must be \[6\]"):
        InfoNCE()(b["q"], b["p"], content_ids={"positive": b["pid"][:3]})
    with pytest.raises(ValueError, match="needs 'query'"):
        InfoNCE(symmetric=True)(b["q"], b["p"], content_ids={"positive": b["pid"]})
    with pytest.raises(ValueError, match="the loss got no negatives"):
        InfoNCE()(b["q"], b["p"], content_ids={"positive": b["pid"], "negatives": b["nid"]})
    with pytest.raises(ValueError, match="guide needs 'negatives'"):
        g = {"query": b["gq"], "positive": b["gp"]}
        InfoNCE(false_negatives=FalseNegatives(guide_margin=0.1))(b["q"], b["p"], b["neg"], b["nmask"], guide=g)


def test_no_rules_no_inputs_leaves_the_loss_bitwise_unchanged():
    b = planted(seed=4)
    plain = InfoNCE(temperature=0.1)(b["q"], b["p"], b["neg"], b["nmask"])
    ruled = InfoNCE(temperature=0.1, false_negatives=FalseNegatives())(b["q"], b["p"], b["neg"], b["nmask"])
    assert plain.item() == ruled.item()


@pytest.mark.parametrize("tile", [0, 2])
@pytest.mark.parametrize("name", list(RULES))
def test_colbert_rules_match_reference(name, tile):
    from fn_refs import colbert_fn

    from vembed_blocks.colbert import ColBERT

    rule, with_ids, with_guide = RULES[name]
    b = planted(seed=5)
    g = torch.Generator().manual_seed(7)
    qt, dt, nt = (torch.randn(*s, D, generator=g, dtype=torch.float64) for s in ((B, 3), (B, 4), (B, K, 2)))
    qm = torch.rand(B, 3, generator=g) > 0.3
    dm, nm = torch.rand(B, 4, generator=g) > 0.3, torch.rand(B, K, 2, generator=g) > 0.3
    qm[:, 0] = dm[:, 0] = True
    nm[..., 0] = b["nmask"]  # an absent negative has no real token
    nm[..., 1] &= b["nmask"]
    dt[3], dm[3] = dt[0], dm[0]  # document 3 = document 0 (ids planted alike)
    nt[1, 0], nm[1, 0] = dt[2, :2], dm[2, :2]
    b["nid"][1, 0] = -1  # not a content duplicate of document 2: it is a prefix of it
    loss = ColBERT(temperature=0.1, tile_size=tile, false_negatives=rule)
    xs = tuple(x.clone().requires_grad_() for x in (qt, dt, nt))
    got = loss(xs[0], qm, xs[1], dm, xs[2], nm, **inputs(b, with_ids, with_guide))
    ref_xs = tuple(x.clone().requires_grad_() for x in (qt, dt, nt))
    negs = [(ref_xs[2][i, k], nm[i, k], int(b["nid"][i, k]), b["gn"][i, k])
            for i in range(B) for k in range(K) if nm[i, k].any()]  # fmt: skip
    want, counts = colbert_fn(
        ref_xs[0], qm, ref_xs[1], dm, negs, 0.1, rule, b["pid"] if with_ids else None,
        b["gq"] if with_guide else None, b["gp"] if with_guide else None,
    )  # fmt: skip
    assert counts
    check(got, want, counts, xs, ref_xs, loss.masked)
