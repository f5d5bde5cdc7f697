"""Every loss equals a plain float64 reference in value and in input gradients."""

from __future__ import annotations

import math

import loss_refs as ref
import pytest
import torch

from vembed_blocks.colbert import ColBERT
from vembed_blocks.losses import CoSENT, Distill, InfoNCE, Matryoshka, SigLIP, Triplet
from vembed_blocks.mining import mine_hard_negatives

DEVIATIONS: dict[str, float] = {}
B, D, K = 5, 8, 3


def gen(seed: int = 0):
    return torch.Generator().manual_seed(seed)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=gen(seed), dtype=torch.float64).requires_grad_()


def compare(name: str, fn_lib, fn_ref, inputs, atol=1e-10):
    """Value and d(loss)/d(input) of fn_lib(*inputs) vs fn_ref(*inputs); records the max deviation."""
    got = fn_lib(*inputs)
    g_got = torch.autograd.grad(got, inputs, allow_unused=True)
    want = fn_ref(*inputs)
    g_want = torch.autograd.grad(want, inputs, allow_unused=True)
    dev = abs(got.item() - want.item())
    for a, b in zip(g_got, g_want):
        assert (a is None) == (b is None), name
        if a is not None:
            dev = max(dev, (a - b).abs().max().item())
    DEVIATIONS[name] = dev
    print(f"max deviation {name}: {dev:.2e}")
    assert dev <= atol, f"{name}: deviation {dev}"


RAGGED_MASK = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)
DUP_LABELS = torch.tensor([0, 1, 0, 2, 1])


@pytest.mark.parametrize(
    "case",
    ["plain", "neg3d", "neg3d_ragged", "pool2d", "labels", "symmetric", "symmetric_all"],
)
def test_infonce_matches_reference(case):
    q, p = rand(B, D, seed=1), rand(B, D, seed=2)
    neg3, pool = rand(B, K, D, seed=3), rand(7, D, seed=4)
    kw = {
        "plain": {},
        "neg3d": {"negatives": neg3},
        "neg3d_ragged": {"negatives": neg3, "negatives_mask": RAGGED_MASK},
        "pool2d": {"negatives": pool},
        "labels": {"labels": DUP_LABELS},
        "symmetric": {},
        "symmetric_all": {"negatives": neg3, "negatives_mask": RAGGED_MASK, "labels": DUP_LABELS},
    }[case]
    sym = case.startswith("symmetric")
    loss = InfoNCE(temperature=0.07, symmetric=sym)
    neg = kw.get("negatives")
    inputs = (q, p) if neg is None else (q, p, neg)

    def lib(q, p, n=None):
        return loss(q, p, **{**kw, **({"negatives": n} if n is not None else {})})

    def want(q, p, n=None):
        return ref.infonce(q, p, n, kw.get("negatives_mask"), kw.get("labels"), scale=1 / 0.07, symmetric=sym)

    compare(f"InfoNCE[{case}]", lib, want, inputs)


def test_infonce_learnable_temperature_gets_exact_gradient():
    q, p = rand(B, D, seed=1), rand(B, D, seed=2)
    loss = InfoNCE(temperature=0.05, learn_temperature=True, symmetric=True).double()
    got = loss(q, p)
    got.backward()
    log_scale = loss.log_scale.detach().clone().requires_grad_()
    want = ref.infonce(q.detach(), p.detach(), scale=log_scale.exp(), symmetric=True)
    want.backward()
    assert loss.log_scale.grad is not None and loss.log_scale.grad.abs() > 0
    dev = max(abs(got.item() - want.item()), abs(loss.log_scale.grad.item() - log_scale.grad.item()))
    DEVIATIONS["InfoNCE[learnable temperature grad]"] = dev
    assert dev < 1e-10
    assert loss.temperature == pytest.approx(0.05)


@pytest.mark.parametrize("labels", [None, DUP_LABELS])
def test_siglip_matches_reference(labels):
    a, b = rand(B, D, seed=5), rand(B, D, seed=6)
    loss = SigLIP(temperature=10.0, bias=-10.0).double()
    compare(
        f"SigLIP[labels={labels is not None}]",
        lambda a, b: loss(a, b, labels=labels),
        lambda a, b: ref.siglip(a, b, loss.log_scale.detach().exp(), loss.bias.detach(), labels),
        (a, b),
    )


def test_siglip_learnable_scale_and_bias_gradients():
    a, b = rand(B, D, seed=5), rand(B, D, seed=6)
    loss = SigLIP(temperature=5.0, bias=-3.0).double()
    loss(a, b).backward()
    assert loss.log_scale.item() == pytest.approx(math.log(5.0)) and loss.bias.item() == -3.0
    t = loss.log_scale.detach().clone().requires_grad_()
    bias = loss.bias.detach().clone().requires_grad_()
    ref.siglip(a.detach(), b.detach(), t.exp(), bias).backward()
    dev = max(abs(loss.log_scale.grad.item() - t.grad.item()), abs(loss.bias.grad.item() - bias.grad.item()))
    DEVIATIONS["SigLIP[learnable t, bias grads]"] = dev
    assert dev < 1e-10


def _triplet_ref(a, p, negs_per_row, margin, dist, mining):
    """negs_per_row[i]: list of negative vectors for anchor i."""

    def d(x, y):
        return 1 - (x @ y) / (x.norm() * y.norm()) if dist == "cosine" else (x - y).norm()

    terms = []
    for i in range(a.shape[0]):
        dn = [d(a[i], n) for n in negs_per_row[i]]
        if mining == "hardest" and dn:  # an anchor without a negative is left out of the mean
            terms.append(torch.relu(d(a[i], p[i]) - torch.stack(dn).min() + margin))
        else:
            terms.extend(torch.relu(d(a[i], p[i]) - x + margin) for x in dn)
    return torch.stack(terms).mean()


@pytest.mark.parametrize("dist", ["cosine", "euclidean"])
@pytest.mark.parametrize("mining", ["hardest", "all"])
@pytest.mark.parametrize("negs", ["in_batch", "ragged3d"])
def test_triplet_matches_reference(dist, mining, negs):
    a, p, n = rand(B, D, seed=7), rand(B, D, seed=8), rand(B, K, D, seed=9)
    loss = Triplet(margin=0.5, distance=dist, mining=mining)
    if negs == "in_batch":
        compare(
            f"Triplet[{dist},{mining},{negs}]",
            lambda a, p: loss(a, p),
            lambda a, p: _triplet_ref(a, p, [[p[j] for j in range(B) if j != i] for i in range(B)], 0.5, dist, mining),
            (a, p),
        )
    else:
        mask = RAGGED_MASK.clone()
        mask[2, 0] = True  # every anchor needs one negative for "hardest"
        compare(
            f"Triplet[{dist},{mining},{negs}]",
            lambda a, p, n: loss(a, p, n, negatives_mask=mask),
            lambda a, p, n: _triplet_ref(
                a, p, [[n[i, k] for k in range(K) if mask[i, k]] for i in range(B)], 0.5, dist, mining
            ),
            (a, p, n),
        )


@pytest.mark.parametrize("mining", ["hardest", "all"])
def test_triplet_rows_without_negatives(mining):
    a, p, n = rand(B, D, seed=7), rand(B, D, seed=8), rand(B, K, D, seed=9)
    loss = Triplet(margin=0.5, mining=mining)
    compare(  # RAGGED_MASK: row 2 has no negative, so it is not in the mean
        f"Triplet[{mining},row without negatives]",
        lambda a, p, n: loss(a, p, n, negatives_mask=RAGGED_MASK),
        lambda a, p, n: _triplet_ref(
            a, p, [[n[i, k] for k in range(K) if RAGGED_MASK[i, k]] for i in range(B)], 0.5, "cosine", mining
        ),
        (a, p, n),
    )
    none = loss(a, p, n, negatives_mask=torch.zeros(B, K, dtype=torch.bool))
    assert none.item() == 0.0 and none.requires_grad
    none.backward()
    assert a.grad is not None and not a.grad.any()


def test_siglip_hard_negatives_and_unlabelled_rows():
    a, b, n = rand(B, D, seed=5), rand(B, D, seed=6), rand(B, K, D, seed=9)
    labels = torch.tensor([0, -1, 0, -1, 1])  # -1: no label (rows 1 and 3 are not alike)
    for tile in (0, 2):
        loss = SigLIP(temperature=10.0, bias=-10.0, tile_size=tile).double()
        compare(
            f"SigLIP[negatives, labels with -1, tile={tile}]",
            lambda a, b, n: loss(a, b, labels, n, RAGGED_MASK),
            lambda a, b, n: ref.siglip(a, b, loss.log_scale.detach().exp(), loss.bias.detach(), labels, n, RAGGED_MASK),
            (a, b, n),
        )


def test_infonce_unlabelled_rows_mask_nothing():
    q, p, n = rand(B, D, seed=1), rand(B, D, seed=2), rand(B, K, D, seed=3)
    labels = torch.tensor([-1, 1, -1, 2, 1])
    for tile in (0, 2):
        loss = InfoNCE(temperature=0.1, symmetric=True, tile_size=tile)
        compare(
            f"InfoNCE[labels with -1, tile={tile}]",
            lambda q, p, n: loss(q, p, n, RAGGED_MASK, labels=labels),
            lambda q, p, n: ref.infonce(q, p, n, RAGGED_MASK, labels, scale=10.0, symmetric=True),
            (q, p, n),
        )
    with pytest.raises(ValueError, match="labels must be integer ids"):
        InfoNCE()(q, p, labels=labels.double())


def test_matryoshka_cuts_only_the_named_arguments():
    sq, sd, tq, td = rand(B, D, seed=20), rand(6, D, seed=21), rand(B, D, seed=22), rand(6, D, seed=23)
    m = Matryoshka(Distill(temperature=0.5), [8, 4, 2], [1.0, 0.5, 0.25])

    def want(sq, sd):  # the teacher keeps its full width at every dim, even with the student's width
        return sum(
            w * Distill(temperature=0.5)(sq[:, :d], sd[:, :d], tq, td) for d, w in ((8, 1.0), (4, 0.5), (2, 0.25))
        )

    compare("Matryoshka(Distill, same-width teacher)", lambda sq, sd: m(sq, sd, tq, td), want, (sq, sd))
    qt, dt, nt = rand(2, 3, D, seed=24), rand(2, 4, D, seed=25), rand(2, 1, 4, D, seed=26)
    qm, dm, nm = (
        torch.ones(2, 3, dtype=torch.bool),
        torch.ones(2, 4, dtype=torch.bool),
        torch.ones(2, 1, 4, dtype=torch.bool),
    )
    col = Matryoshka(ColBERT(temperature=0.1), [D, 3])
    want_col = sum(ColBERT(temperature=0.1)(qt[..., :d], qm, dt[..., :d], dm, nt[..., :d], nm) for d in (D, 3))
    assert torch.allclose(col(qt, qm, dt, dm, nt, nm), want_col, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match=r"pass truncate= .* of CoSENT"):
        Matryoshka(CoSENT(), [4])
    with pytest.raises(ValueError, match=r"argument 'negatives' is to be truncated but is \(5, 3, 6\)"):
        Matryoshka(InfoNCE(), [4])(sq, sd[:B], negatives=rand(B, K, 6))
    custom = Matryoshka(lambda x, y: (x * y).sum(), [2], truncate=(0,))
    assert custom(sq, tq[:, :2]).item() == pytest.approx((sq[:, :2] * tq[:, :2]).sum().item())


def test_cosent_matches_reference():
    a, b = rand(B, D, seed=10), rand(B, D, seed=11)
    scores = torch.tensor([0.1, 0.9, 0.5, 0.5, 0.3], dtype=torch.float64)  # a tie: that pair is not ordered

    def want(a, b):
        cos = [(a[i] @ b[i]) / (a[i].norm() * b[i].norm()) for i in range(B)]
        terms = [torch.zeros((), dtype=torch.float64)]
        terms += [20.0 * (cos[j] - cos[i]) for i in range(B) for j in range(B) if scores[i] > scores[j]]
        return torch.logsumexp(torch.stack(terms), 0)

    compare("CoSENT", lambda a, b: CoSENT(20.0)(a, b, scores), want, (a, b))


@pytest.mark.parametrize("with_negatives", [False, True])
def test_colbert_matches_reference_with_padding(with_negatives):
    q, d, n = rand(B, 4, D, seed=12), rand(B, 6, D, seed=13), rand(B, 2, 5, D, seed=14)
    qm = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.bool)
    dm = torch.tensor(
        [[1] * 6, [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1] * 5 + [0], [0, 0, 1, 1, 1, 1]], dtype=torch.bool
    )
    nm = torch.zeros(B, 2, 5, dtype=torch.bool)
    nm[0, 0, :3] = nm[0, 1, :5] = nm[1, 0, :1] = nm[3, 1, 2:4] = True  # rows 2 and 4 have no negatives
    loss = ColBERT(temperature=0.1)
    if with_negatives:
        compare(
            "ColBERT[negatives]",
            lambda q, d, n: loss(q, qm, d, dm, n, nm),
            lambda q, d, n: ref.colbert(q, qm, d, dm, n, nm, 0.1),
            (q, d, n),
        )
    else:
        compare(
            "ColBERT", lambda q, d: loss(q, qm, d, dm), lambda q, d: ref.colbert(q, qm, d, dm, temperature=0.1), (q, d)
        )


def test_colbert_padding_never_scores():
    """Changing the embeddings at padded positions changes nothing."""
    q, d = rand(B, 4, D, seed=15), rand(B, 6, D, seed=16)
    qm, dm = torch.ones(B, 4, dtype=torch.bool), torch.ones(B, 6, dtype=torch.bool)
    qm[:, 3] = False
    dm[:, 4:] = False
    q2, d2 = q.detach().clone(), d.detach().clone()
    q2[:, 3] = 100.0
    d2[:, 4:] = 100.0
    loss = ColBERT(temperature=0.05, gather=False)
    assert loss(q, qm, d, dm).item() == pytest.approx(loss(q2, qm, d2, dm).item(), abs=1e-12)


def test_matryoshka_unsorted_dims_keep_weights_paired():
    q, p, n = rand(B, D, seed=17), rand(B, D, seed=18), rand(B, K, D, seed=19)
    dims, weights = [4, 8, 2], [0.5, 1.0, 2.0]
    m = Matryoshka(InfoNCE(temperature=0.1), dims, weights)
    assert m.dims == [8, 4, 2] and m.weights == [1.0, 0.5, 2.0]

    def want(q, p, n):
        return sum(
            w * ref.infonce(q[:, :d], p[:, :d], n[..., :d], RAGGED_MASK, scale=10.0) for d, w in zip(dims, weights)
        )

    compare("Matryoshka(InfoNCE)", lambda q, p, n: m(q, p, negatives=n, negatives_mask=RAGGED_MASK), want, (q, p, n))


@pytest.mark.parametrize("kind", ["kl", "mse"])
def test_distill_matches_reference(kind):
    sq, sd = rand(B, D, seed=20), rand(6, D, seed=21)
    tq, td = rand(B, 5, seed=22), rand(6, 5, seed=23)
    tau = 0.5

    def want(sq, sd):
        total = 0
        for i in range(B):
            s = torch.stack([(sq[i] @ sd[j]) / (sq[i].norm() * sd[j].norm()) for j in range(6)])
            t = torch.stack([(tq[i] @ td[j]) / (tq[i].norm() * td[j].norm()) for j in range(6)]).detach()
            if kind == "mse":
                total = total + ((s - t) ** 2).sum() / (B * 6)
            else:
                pt, ps = torch.softmax(t / tau, 0), torch.softmax(s / tau, 0)
                total = total + (pt * (pt.log() - ps.log())).sum() * tau**2 / B
        return total

    compare(f"Distill[{kind}]", lambda sq, sd: Distill(tau, kind)(sq, sd, tq, td), want, (sq, sd))


def test_mine_hard_negatives_filters_false_negatives():
    g = gen(24)
    q = torch.randn(6, D, generator=g, dtype=torch.float64)
    c = torch.randn(20, D, generator=g, dtype=torch.float64)
    pos = torch.tensor([0, 3, 5, 7, 11, 19])
    idx, scores = mine_hard_negatives(q, c, pos, k=4, margin=0.05, max_ratio=0.9, chunk_size=4)
    for i in range(6):
        s = [(q[i] @ c[j] / (q[i].norm() * c[j].norm())).item() for j in range(20)]
        ps = s[pos[i]]
        keep = [j for j in range(20) if j != pos[i] and not s[j] > ps - 0.05 and not s[j] > 0.9 * ps]
        keep = sorted(keep, key=lambda j: -s[j])[:4]
        want = keep + [-1] * (4 - len(keep))
        assert idx[i].tolist() == want
        assert scores[i][: len(keep)].tolist() == pytest.approx([s[j] for j in keep], abs=1e-6)


# ---------------------------------------------------------------- bad input


def _x(*shape):
    return torch.randn(*shape)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: InfoNCE()(_x(4, 8), _x(3, 8)), "4 rows but positive has 3"),
        (lambda: InfoNCE()(_x(4, 8), _x(4, 6)), "dim 8 but positive has dim 6"),
        (lambda: InfoNCE()(_x(0, 8), _x(0, 8)), "empty batch"),
        (
            lambda: InfoNCE()(_x(4, 8), _x(4, 8), _x(4, 2, 8), torch.ones(4, 3, dtype=torch.bool)),
            "negatives_mask must have shape (4, 2)",
        ),
        (lambda: InfoNCE()(_x(4, 8), _x(4, 8), _x(3, 2, 8)), "negatives has 3 rows"),
        (lambda: InfoNCE()(_x(4, 8), _x(4, 8), _x(4, 2, 7)), "negatives have dim 7"),
        (lambda: InfoNCE()(_x(4, 8), _x(4, 8), labels=torch.zeros(3)), "labels must have shape (4,)"),
        (lambda: InfoNCE(temperature=0.0), "temperature must be > 0"),
        (lambda: InfoNCE(temperature=-1.0), "temperature must be > 0"),
        (lambda: SigLIP(temperature=0.0), "temperature must be > 0"),
        (lambda: SigLIP()(_x(4, 8), _x(5, 8)), "4 rows but b has 5"),
        (lambda: ColBERT(temperature=-0.1), "temperature must be > 0"),
        (
            lambda: ColBERT()(_x(2, 3, 8), torch.ones(2, 4), _x(2, 5, 8), torch.ones(2, 5)),
            "query_mask must have shape (2, 3)",
        ),
        (
            lambda: ColBERT()(_x(2, 3, 8), torch.ones(2, 3), _x(2, 5, 8), torch.zeros(2, 5)),
            "doc_mask needs at least one real token",
        ),
        (lambda: CoSENT()(_x(4, 8), _x(4, 8), torch.zeros(5)), "scores must have shape (4,)"),
        (lambda: Triplet(distance="l3"), "distance must be"),
        (lambda: Matryoshka(InfoNCE(), [16, 4])(_x(4, 8), _x(4, 8)), "dim 16 is larger than the embedding dim 8"),
        (lambda: Matryoshka(InfoNCE(), [8, 4], [1.0]), "2 dims but 1 weights"),
        (lambda: Distill(kind="js"), "kind must be"),
        (lambda: Distill()(_x(4, 8), _x(5, 8), _x(3, 6), _x(5, 6)), "student_q has 4 rows but teacher_q has 3"),
        (lambda: mine_hard_negatives(_x(3, 8), _x(5, 8), torch.tensor([0, 1, 9]), 2), "positive_index out of range"),
        (lambda: mine_hard_negatives(_x(3, 8), _x(5, 8), torch.tensor([0, 1, 2]), 6), "k must be in 1..5"),
    ],
)
def test_bad_input_raises_clear_value_error(call, message):
    with pytest.raises(ValueError) as err:
        call()
    assert message in str(err.value)


def test_a_global_batch_of_one_row_without_negatives_warns_that_nothing_is_contrasted():
    import warnings

    q, p = torch.randn(1, 8), torch.randn(1, 8)
    with pytest.warns(RuntimeWarning, match="global batch of one row without hard negatives"):
        loss = InfoNCE()(q, p)
    assert loss.item() == 0.0  # the silent zero the warning is about: one candidate, the positive
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second row, or one hard negative, gives something to contrast
        InfoNCE()(torch.randn(2, 8), torch.randn(2, 8))
        InfoNCE()(q, p, negatives=torch.randn(1, 8))
