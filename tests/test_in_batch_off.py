"""`InfoNCE(in_batch_negatives=False)`: each query against its own positive and its own hard negatives only.

Every number is checked against `reference`, a plain float64 loop over rows written from the definition
(``-log(exp(s_pos) / sum_c exp(s_c))`` over the row's own positive and its real negatives), never against
the library: value and input gradients to 1e-10, one process; on 2 and 3 gloo ranks with ragged local
batches (and a rank without any negatives), the mean of the ranks' losses equals the reference over all
rows to 1e-10 and DDP-averaged gradients equal the one-process gradients to 1e-9.
"""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn as nn
from _multiproc import run_ranks
from torch.nn.parallel import DistributedDataParallel as DDP

from vembed_blocks.false_negatives import FalseNegatives
from vembed_blocks.losses import InfoNCE, Matryoshka

B, K, D = 6, 3, 5


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def reference(q, p, neg=None, mask=None, scale=10.0, rule=None, content=None, guide=None, counts=None):
    """Mean over rows of ``logsumexp(logits) - logits[0]``, logits = scale * cos of the row's own positive,
    then of each of its own real negatives (``neg[B,K,D]`` + ``mask[B,K]``, or every real entry of a pool
    ``neg[M,D]`` + ``mask[M]``). ``rule`` (`FalseNegatives`): a negative scoring above ``cos_p - margin`` or
    ``ratio * cos_p`` is dropped (weight 0) or counts ``weight`` times; ``content`` ids (dict of
    ``positive[B]``, ``negatives``): a negative with its positive's id is dropped; ``guide`` embeddings
    (``query``, ``positive``, ``negatives``): one the guide scores above ``g_p - guide_margin`` is dropped.
    ``counts``: a dict that receives each rule's hits."""
    terms = []
    for i in range(q.shape[0]):
        qi = unit(q[i])
        cos_p = qi @ unit(p[i])
        logits = [scale * cos_p]
        if neg is None:
            own = []
        elif neg.dim() == 3:
            own = [(i, k) for k in range(neg.shape[1]) if mask is None or mask[i, k]]
        else:
            own = [(m,) for m in range(neg.shape[0]) if mask is None or mask[m]]
        for at in own:
            cos_n, logw, hit = qi @ unit(neg[at]), 0.0, set()
            if rule is not None and (rule.margin is not None or rule.ratio is not None):
                bound = min(
                    cos_p.item() - (rule.margin if rule.margin is not None else -math.inf),
                    rule.ratio * cos_p.item() if rule.ratio is not None else math.inf,
                )
                if cos_n.item() > bound:
                    hit.add("margin")
                    logw = math.log(rule.weight) if rule.weight > 0 else -math.inf
            if content is not None and content["negatives"][at] >= 0:
                if content["negatives"][at] == content["positive"][i]:
                    hit.add("duplicates")
            if guide is not None:
                gq = unit(guide["query"][i])
                if gq @ unit(guide["negatives"][at]) > gq @ unit(guide["positive"][i]) - rule.guide_margin:
                    hit.add("guide")
            for name in hit if counts is not None else ():
                counts[name] = counts.get(name, 0) + 1
            if logw > -math.inf and not hit & {"duplicates", "guide"}:
                logits.append(scale * cos_n + logw)
        z = torch.stack(logits)
        terms.append(torch.logsumexp(z, 0) - z[0])
    return torch.stack(terms).mean()


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def leaves(seed=0, k=K):
    return [rand(B, D, seed=seed).requires_grad_(), rand(B, D, seed=seed + 1).requires_grad_()] + [
        rand(B, k, D, seed=seed + 2).requires_grad_()
    ]


def ragged_mask() -> torch.Tensor:
    """Rows with 0, 1 and K real negatives (and two mixed)."""
    return torch.tensor([[0, 0, 0], [1, 0, 0], [1, 1, 1], [0, 1, 1], [0, 0, 0], [1, 0, 1]], dtype=torch.bool)


def assert_close(got, want, inputs, tol=1e-10):
    """Value and gradients of two scalars wrt ``inputs`` agree to ``tol``; returns the max deviation."""
    g_got = torch.autograd.grad(got, inputs, allow_unused=True)
    g_want = torch.autograd.grad(want, inputs, allow_unused=True)
    dev = abs(got.item() - want.item())
    for a, b in zip(g_got, g_want):
        a, b = (torch.zeros_like(b if a is None else a) if x is None else x for x in (a, b))
        dev = max(dev, (a - b).abs().max().item())
    assert dev <= tol, dev
    return dev


def test_matches_reference_with_learnt_temperature():
    q, p, n = leaves()
    loss = InfoNCE(temperature=0.1, learn_temperature=True, in_batch_negatives=False).double()
    log_scale = loss.log_scale.detach().clone().requires_grad_()  # log(10), rounded to float32 as the parameter is
    got = loss(q, p, n, ragged_mask())
    want = reference(q, p, n, ragged_mask(), scale=log_scale.exp())
    g_got = torch.autograd.grad(got, [q, p, n, loss.log_scale])
    g_want = torch.autograd.grad(want, [q, p, n, log_scale])
    assert abs(got.item() - want.item()) < 1e-10
    for a, b in zip(g_got, g_want):
        assert (a - b).abs().max().item() < 1e-10
    assert g_got[3].abs() > 0
    assert got.dtype == torch.float64
    # The default (in-batch) loss is another one: every other row's positive is a candidate there.
    assert abs(InfoNCE(temperature=0.1)(q, p, n, ragged_mask()).item() - want.item()) > 1e-3


def test_row_without_negatives_is_zero_and_counts_in_the_mean():
    q, p, n = leaves(seed=3)
    none = torch.zeros(B, K, dtype=torch.bool)
    loss = InfoNCE(temperature=0.1, in_batch_negatives=False)
    got = loss(q, p, n, none)
    assert got.item() == 0.0
    assert all(torch.equal(g, torch.zeros_like(g)) for g in torch.autograd.grad(got, [q, p, n]))
    assert loss(q, p).item() == 0.0  # no negatives at all: one candidate per row
    # Mixed: rows 0 and 4 have none; they add 0 to the sum and 1 each to the count.
    mask, some = ragged_mask(), [1, 2, 3, 5]
    alone = loss(q[some], p[some], n[some], mask[some])
    assert abs(loss(q, p, n, mask).item() * B - alone.item() * len(some)) < 1e-12
    assert_close(loss(q, p, n, mask), reference(q, p, n, mask), [q, p, n])


def test_other_rows_positives_have_no_effect():
    q, p, n = leaves(seed=5)
    mask, loss = ragged_mask(), InfoNCE(temperature=0.1, in_batch_negatives=False)
    base = torch.autograd.grad(loss(q, p, n, mask), [q, p, n])
    j = 2
    p2 = p.detach().clone()
    p2[j] = rand(D, seed=99)
    p2.requires_grad_()
    moved = torch.autograd.grad(loss(q, p2, n, mask), [q, p2, n])
    for a, b in zip(base, moved):
        others = [i for i in range(B) if i != j]
        assert torch.equal(a[others], b[others])  # row i's gradients do not depend on positive[j]
    # Rows of one class share their positive (a class name): no row is the other's negative.
    shared = p.detach().clone()
    shared[1:4] = shared[1]
    shared.requires_grad_()
    assert_close(loss(q, shared, n, mask), reference(q, shared, n, mask), [q, shared, n])


def test_labels_change_nothing_and_an_own_positive_among_negatives_stays():
    q, p, n = leaves(seed=7)
    n = n.detach().clone()
    n[2, 0] = p[2].detach() * 3.0  # row 2's own positive, given again as a hard negative
    n.requires_grad_()
    mask, loss = ragged_mask(), InfoNCE(temperature=0.1, in_batch_negatives=False)
    want = reference(q, p, n, mask)
    same = torch.zeros(B, dtype=torch.long)
    assert loss(q, p, n, mask, labels=same).item() == loss(q, p, n, mask).item()
    assert_close(loss(q, p, n, mask, labels=same), want, [q, p, n])


def test_pool_of_negatives_is_every_row_s():
    q, p, _ = leaves(seed=11)
    pool = rand(4, D, seed=12).requires_grad_()
    pool_mask = torch.tensor([True, False, True, True])
    loss = InfoNCE(temperature=0.1, in_batch_negatives=False)
    assert_close(loss(q, p, pool, pool_mask), reference(q, p, pool, pool_mask), [q, p, pool])
    assert_close(loss(q, p, pool), reference(q, p, pool), [q, p, pool])


@pytest.mark.parametrize(
    "rule",
    [FalseNegatives(margin=0.1), FalseNegatives(margin=0.2, weight=0.5), FalseNegatives(ratio=0.9)],
    ids=["margin-drop", "margin-weight", "ratio"],
)
def test_margin_rule_on_own_negatives(rule):
    q, p, n = leaves(seed=13, k=4)
    # Negatives near the positive so that the rule hits some and not others.
    n = (n.detach() * 0.3 + p.detach()[:, None, :]).requires_grad_()
    mask = torch.rand(B, 4, generator=torch.Generator().manual_seed(1)) > 0.25
    loss = InfoNCE(temperature=0.1, false_negatives=rule, in_batch_negatives=False)
    counts: dict[str, int] = {}
    want = reference(q, p, n, mask, rule=rule, counts=counts)
    assert_close(loss(q, p, n, mask), want, [q, p, n])
    assert 0 < counts["margin"] < int(mask.sum())
    assert {k: int(v) for k, v in loss.masked.items()} == counts


def test_duplicate_and_guide_rules_on_own_negatives():
    q, p, n = leaves(seed=17)
    mask = ragged_mask() | torch.eye(B, K, dtype=torch.bool)
    content = {"positive": torch.arange(B) * 10, "negatives": torch.randint(0, 3, (B, K)) * 10}
    content["negatives"][2, 1] = 20  # row 2's negative 1 is its positive's content
    content["negatives"][4, 0] = -1  # no id: never a duplicate
    rule = FalseNegatives(guide_margin=0.05)
    guide = {"query": rand(B, 3, seed=20), "positive": rand(B, 3, seed=21)}
    guide["negatives"] = 0.3 * rand(B, K, 3, seed=22) - guide["query"][:, None]  # unlike the query: kept ...
    guide["negatives"][[1, 3, 5], [0, 2, 2]] = guide["positive"][[1, 3, 5]]  # ... but these three: dropped
    loss = InfoNCE(temperature=0.1, false_negatives=rule, in_batch_negatives=False)
    counts: dict[str, int] = {}
    want = reference(q, p, n, mask, rule=rule, content=content, guide=guide, counts=counts)
    assert_close(loss(q, p, n, mask, content_ids=content, guide=guide), want, [q, p, n])
    assert (
        counts["duplicates"] >= 1 and counts["guide"] >= 3 and counts["guide"] + counts["duplicates"] < int(mask.sum())
    )
    assert {k: int(v) for k, v in loss.masked.items()} == counts
    # Without negatives the rules still report (0), as on every rank of a run.
    loss(q, p, content_ids={"positive": content["positive"]}, guide={k: guide[k] for k in ("query", "positive")})
    assert {k: int(v) for k, v in loss.masked.items()} == {"duplicates": 0, "guide": 0}


def test_matryoshka_two_dims():
    q, p, n = leaves(seed=23)
    mask = ragged_mask()
    mat = Matryoshka(InfoNCE(temperature=0.1, in_batch_negatives=False), dims=[3, D], weights=[0.5, 1.0])
    want = reference(q, p, n, mask) + 0.5 * reference(q[:, :3], p[:, :3], n[..., :3], mask)
    assert_close(mat(q, p, negatives=n, negatives_mask=mask), want, [q, p, n])


def test_refused_and_ignored_options():
    with pytest.raises(ValueError, match="symmetric"):
        InfoNCE(symmetric=True, in_batch_negatives=False)
    with pytest.raises(ValueError, match="ring"):
        InfoNCE(ring=True, in_batch_negatives=False)
    q, p, n = leaves(seed=29)
    want = reference(q, p, n, ragged_mask())
    for options in ({"tile_size": 1}, {"tile_size": 0}, {"gather": False}):  # tiles ignored; no group: local
        got = InfoNCE(temperature=0.1, in_batch_negatives=False, **options)(q, p, n, ragged_mask())
        assert abs(got.item() - want.item()) < 1e-12, options
    f32 = InfoNCE(in_batch_negatives=False)(q.float(), p.float(), n.float(), ragged_mask())
    assert f32.dtype == torch.float32 and abs(f32.item() - reference(q, p, n, ragged_mask(), scale=20.0)) < 1e-4


# ----------------------------------------------------------------------------- 2 and 3 gloo ranks

DIN, DIM = 6, 4
ROWS = {2: [4, 2], 3: [4, 2, 3]}  # ragged local batches; with 3 ranks, rank 2 passes no negatives
NONE_RANK = 2
MARGIN = FalseNegatives(margin=0.3, weight=0.5)


def global_batch(world: int) -> dict[str, torch.Tensor]:
    n = sum(ROWS[world])
    g = torch.Generator().manual_seed(4321)
    mask = torch.rand(n, K, generator=g) > 0.4
    mask[0], mask[1], mask[2, 0] = False, True, True  # rank 0: a row with 0, one with K, one with 1
    if world == 3:
        mask[sum(ROWS[world][:NONE_RANK]) :] = False  # what one process sees of the rank without negatives
    q, p, noise = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((n, DIN), (n, DIN), (n, K, DIN)))
    return {"q": q, "p": p, "neg": q[:, None] + 0.4 * noise, "nmask": mask}  # negatives near the query: hits


class Combo(nn.Module):
    """A tiny linear encoder and the loss in one module, so DDP averages the temperature's gradient too."""

    CASES = ("plain", "matryoshka_margin", "local")

    def __init__(self, case: str):
        super().__init__()
        torch.manual_seed(0)
        self.case, self.enc = case, nn.Linear(DIN, DIM).double()
        rule = MARGIN if case == "matryoshka_margin" else None
        gather = case != "local"
        inner = InfoNCE(0.1, learn_temperature=True, gather=gather, false_negatives=rule, in_batch_negatives=False)
        self.loss = (Matryoshka(inner, dims=[DIM, 2]) if case == "matryoshka_margin" else inner).double()

    @property
    def log_scale(self) -> torch.Tensor:
        return self.loss.loss.log_scale if isinstance(self.loss, Matryoshka) else self.loss.log_scale

    def forward(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        neg = self.enc(b["neg"]) if "neg" in b else None
        return self.loss(self.enc(b["q"]), self.enc(b["p"]), negatives=neg, negatives_mask=b.get("nmask"))

    def reference(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        q, p, n, scale = self.enc(b["q"]), self.enc(b["p"]), self.enc(b["neg"]), self.log_scale.exp()
        if self.case != "matryoshka_margin":
            return reference(q, p, n, b["nmask"], scale=scale)
        return sum(reference(q[:, :d], p[:, :d], n[..., :d], b["nmask"], scale, MARGIN) for d in (DIM, 2))


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n.removeprefix("module."): p.grad.clone() for n, p in model.named_parameters()}


def local_batch(world: int, rank: int) -> dict[str, torch.Tensor]:
    start = sum(ROWS[world][:rank])
    local = {k: v[start : start + ROWS[world][rank]] for k, v in global_batch(world).items()}
    if world == 3 and rank == NONE_RANK:
        del local["neg"], local["nmask"]
    return local


def _body(rank: int, world: int):
    local, out = local_batch(world, rank), {}
    for case in Combo.CASES:
        model = DDP(Combo(case))
        loss = model(local)
        loss.backward()
        inner = getattr(model.module.loss, "loss", model.module.loss)
        out[case] = (loss.item(), grads(model), sorted(inner.masked))
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_ragged_ranks_give_the_global_mean(world):
    start = time.perf_counter()
    results = run_ranks(_body, world, timeout=120)
    print(f"{world} ranks: launch and run {time.perf_counter() - start:.1f} s")
    batch = global_batch(world)
    for case in Combo.CASES:
        if case == "local":  # gather=False: each rank's own mean, nothing exchanged
            for rank, r in enumerate(results):
                b = local_batch(world, rank)
                model = Combo(case)
                neg = model.enc(b["neg"]) if "neg" in b else None
                want = reference(model.enc(b["q"]), model.enc(b["p"]), neg, b.get("nmask"), model.log_scale.exp())
                assert abs(r[case][0] - want.item()) < 1e-10, (case, rank)
            continue
        model = Combo(case)
        want = model.reference(batch)
        want.backward()
        want_grads = grads(model)
        losses = [r[case][0] for r in results]
        assert abs(sum(losses) / world - want.item()) < 1e-10, (case, losses, want.item())
        for rank, r in enumerate(results):
            assert r[case][1].keys() == want_grads.keys()
            for name, g in want_grads.items():
                dev = (r[case][1][name] - g).abs().max().item()
                assert dev < 1e-9, f"{case} W={world} rank {rank} {name}: {dev}"
                assert g.abs().sum() > 0, (case, name)
            assert r[case][2] == (["margin"] if case == "matryoshka_margin" else []), r[case][2]
