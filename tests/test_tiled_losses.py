"""The tiled (memory-bounded) path of InfoNCE, SigLIP and ColBERT equals the dense path.

Single process: value and every input/parameter gradient, float32 at rtol 1e-5, for tile
sizes that do and do not divide the batch, over every option combination. Distributed: on
2 and 3 real gloo ranks, with the candidates gathered or passed around a ring, each rank's
loss and gradients obey the gradient contract against the dense loss of the global batch.
Structural: no tensor of the size of the score matrix is ever created on the tiled path.
"""

from __future__ import annotations

import itertools

import loss_refs as ref
import pytest
import torch
from _multiproc import run_ranks
from torch.utils._python_dispatch import TorchDispatchMode

from vembed_blocks import _loss_utils, tiled
from vembed_blocks.colbert import ColBERT
from vembed_blocks.distributed import pad_dim
from vembed_blocks.losses import InfoNCE, SigLIP

DEVIATIONS: dict[str, float] = {}
B, D, K, M = 10, 6, 3, 7
TILES = [4, 5, 3]  # 5 divides B; 3 and 4 do not


def randn(*shape, seed, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def grads_of(loss_fn, module, inputs):
    """(value, [d/d input...] + [d/d parameter...]) of ``loss_fn(*inputs)``."""
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    params = list(module.parameters())
    value = loss_fn(*inputs)
    return value.detach(), torch.autograd.grad(value, inputs + params)


def assert_same(name, dense, tiled_out, rtol=1e-5):
    """Tiled equals dense: value and each gradient within rtol of the gradient's own scale."""
    (v0, g0), (v1, g1) = dense, tiled_out
    dev = (v0 - v1).abs().item() / max(1.0, v0.abs().item())
    assert dev <= rtol, f"{name}: value {v1.item()} vs dense {v0.item()}"
    for i, (a, b) in enumerate(zip(g0, g1)):
        scale = max(a.abs().max().item(), 1e-6)
        d = (a - b).abs().max().item() / scale
        assert d <= rtol, f"{name}: gradient {i} deviates by {d:.2e} (relative to its max)"
        dev = max(dev, d)
    DEVIATIONS[name] = max(DEVIATIONS.get(name, 0.0), dev)


INFONCE_OPTIONS = list(
    itertools.product([False, True], ["none", "per_row_masked", "pool"], [False, True], [False, True])
)


@pytest.mark.parametrize("symmetric,negatives,labels,learn", INFONCE_OPTIONS)
def test_infonce_tiled_equals_dense(symmetric, negatives, labels, learn):
    q, p = randn(B, D, seed=1), randn(B, D, seed=2)
    neg = {"none": None, "per_row_masked": randn(B, K, D, seed=3), "pool": randn(M, D, seed=4)}[negatives]
    nmask = (randn(B, K, seed=5) > 0).logical_or_(torch.arange(K) == 0) if negatives == "per_row_masked" else None
    lab = torch.tensor([0, 1, 0, 2, 1, 3, 0, 4, 2, 5]) if labels else None
    inputs = [q, p] + ([] if neg is None else [neg])

    def run(tile):
        loss = InfoNCE(temperature=0.07, learn_temperature=learn, symmetric=symmetric, tile_size=tile)
        return grads_of(lambda q, p, n=None: loss(q, p, n, nmask, labels=lab), loss, inputs)

    dense = run(0)
    for tile in TILES:
        assert_same(f"InfoNCE[sym={symmetric},neg={negatives},labels={labels},learn={learn}]", dense, run(tile))


@pytest.mark.parametrize("labels,learn", list(itertools.product([False, True], [False, True])))
def test_siglip_tiled_equals_dense(labels, learn):
    a, b = randn(B, D, seed=6), randn(B, D, seed=7)
    lab = torch.tensor([0, 1, 0, 2, 1, 3, 0, 4, 2, 5]) if labels else None

    def run(tile):
        loss = SigLIP(temperature=5.0, bias=-3.0, learn=learn, tile_size=tile)
        return grads_of(lambda a, b: loss(a, b, labels=lab), loss, [a, b])

    dense = run(0)
    for tile in TILES:
        assert_same(f"SigLIP[labels={labels},learn={learn}]", dense, run(tile))


def colbert_batch(seed=8):
    q, d = randn(B, 4, D, seed=seed), randn(B, 6, D, seed=seed + 1)
    neg, pool = randn(B, 2, 5, D, seed=seed + 2), randn(M, 3, D, seed=seed + 3)
    g = torch.Generator().manual_seed(seed)
    qm, dm = torch.rand(B, 4, generator=g) > 0.3, torch.rand(B, 6, generator=g) > 0.4
    qm[:, 1] = dm[:, 2] = True  # every row keeps a real token; padding elsewhere is ragged
    nm, pm = torch.rand(B, 2, 5, generator=g) > 0.5, torch.rand(M, 3, generator=g) > 0.3
    nm[3] = False  # row 3 has no negatives at all
    pm[:, 0] = True
    return q, qm, d, dm, neg, nm, pool, pm


@pytest.mark.parametrize("negatives", ["none", "per_row", "pool"])
def test_colbert_tiled_equals_dense(negatives):
    q, qm, d, dm, neg, nm, pool, pm = colbert_batch()
    extra = {"none": [], "per_row": [neg], "pool": [pool]}[negatives]
    extra_mask = {"none": None, "per_row": nm, "pool": pm}[negatives]

    def run(tile):
        loss = ColBERT(temperature=0.1, tile_size=tile)
        return grads_of(lambda q, d, n=None: loss(q, qm, d, dm, n, extra_mask), loss, [q, d, *extra])

    dense = run(0)
    for tile in TILES:
        assert_same(f"ColBERT[neg={negatives}]", dense, run(tile))


def test_tiled_matches_float64_reference():
    """The tiled path against the plain loop references too (not only against the dense path)."""
    q, p, n = (
        randn(B, D, seed=11, dtype=torch.float64),
        randn(B, D, seed=12, dtype=torch.float64),
        randn(B, K, D, seed=13, dtype=torch.float64),
    )
    nmask = randn(B, K, seed=14) > 0
    lab = torch.tensor([0, 1, 0, 2, 1, 3, 0, 4, 2, 5])
    got = InfoNCE(temperature=0.1, symmetric=True, tile_size=3)(q, p, n, nmask, labels=lab)
    want = ref.infonce(q, p, n, nmask, lab, scale=10.0, symmetric=True)
    siglip = SigLIP(temperature=5.0, bias=-3.0, tile_size=3).double()
    sig = siglip(q, p, labels=lab)
    sig_want = ref.siglip(q, p, siglip.log_scale.detach().exp(), siglip.bias.detach(), lab)
    cq, cqm, cd, cdm, cn, cnm, _, _ = (x.double() if x.is_floating_point() else x for x in colbert_batch())
    col = ColBERT(temperature=0.1, tile_size=3)(cq, cqm, cd, cdm, cn, cnm)
    col_want = ref.colbert(cq, cqm, cd, cdm, cn, cnm, 0.1)
    dev = max(abs(got.item() - want.item()), abs(sig.item() - sig_want.item()), abs(col.item() - col_want.item()))
    DEVIATIONS["tiled vs float64 references"] = dev
    assert dev < 1e-10


class MaxAlloc(TorchDispatchMode):
    """Records the largest tensor (in elements) any op creates."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_tiled_never_materialises_the_score_matrix():
    n, dim, tile = 96, 8, 48  # few tiles: every op under the dispatch mode costs ~1 ms
    q, p, neg = randn(n, dim, seed=15), randn(n, dim, seed=16), randn(n, 2, dim, seed=17)
    q.requires_grad_(), p.requires_grad_(), neg.requires_grad_()
    loss = InfoNCE(symmetric=True, learn_temperature=True, tile_size=tile)
    with MaxAlloc() as seen:
        loss(q, p, neg, labels=torch.arange(n) % 7).backward()
    assert seen.largest <= max(3 * n * dim, tile * tile), seen.largest  # inputs-sized or one tile
    qt, dt = randn(16, 4, dim, seed=18).requires_grad_(), randn(16, 5, dim, seed=19).requires_grad_()
    ones_q, ones_d = torch.ones(16, 4, dtype=torch.bool), torch.ones(16, 5, dtype=torch.bool)
    with MaxAlloc() as seen:
        ColBERT(tile_size=8)(qt, ones_q, dt, ones_d).backward()
    assert seen.largest <= max(16 * 5 * dim, 8 * 8 * 4 * 5 * 2), seen.largest  # never 16 x 16 x 4 x 5


def test_automatic_tiling_above_threshold(monkeypatch):
    q, p = randn(B, D, seed=20), randn(B, D, seed=21)
    dense = grads_of(lambda q, p: InfoNCE(tile_size=0)(q, p), torch.nn.Module(), [q, p])
    calls = []
    original = tiled._TiledLSE.apply
    monkeypatch.setattr(tiled._TiledLSE, "apply", lambda *a: calls.append(a[1]) or original(*a))
    grads_of(lambda q, p: InfoNCE()(q, p), torch.nn.Module(), [q, p])
    assert calls == []  # 100 scores: far below the threshold, dense
    monkeypatch.setattr(_loss_utils, "AUTO_TILE_ELEMENTS", 50)  # where the dense-or-tiled decision reads them
    monkeypatch.setattr(_loss_utils, "AUTO_TILE_SIZE", 4)
    auto = grads_of(lambda q, p: InfoNCE()(q, p), torch.nn.Module(), [q, p])
    assert calls == [4]
    assert_same("InfoNCE[auto]", dense, auto)
    assert _loss_utils.resolve_tile(None, 10, 10, per_pair=16) == 1  # ColBERT: tiles shrink with Lq x Ld
    with pytest.raises(ValueError, match="tile_size"):
        InfoNCE(tile_size=-1)


# ----------------------------------------------------------------------------- distributed

ROWS = 4  # per rank
DIST_CASES = ["infonce", "infonce_all", "siglip", "colbert"]


def dist_batch(world: int) -> dict[str, torch.Tensor]:
    n = ROWS * world
    g = torch.Generator().manual_seed(99)
    d_len = torch.tensor([1 + (i % ROWS) + (i // ROWS) for i in range(n)])  # ranks' padded lengths differ
    nm = torch.rand(n, K, generator=g) > 0.4
    nm[0] = False  # a row without negatives
    tok = torch.rand(n, 2, 3, generator=g) > 0.5
    tok[:, 0, 0] = True
    return {
        "q": torch.randn(n, D, generator=g),
        "p": torch.randn(n, D, generator=g),
        "neg": torch.randn(n, K, D, generator=g),
        "nmask": nm,
        "labels": torch.arange(n) % 3,
        "qt": torch.randn(n, 3, D, generator=g),
        "qt_mask": torch.rand(n, 3, generator=g) > 0.3,
        "dt": torch.randn(n, int(d_len.max()), D, generator=g),
        "dt_mask": torch.arange(int(d_len.max()))[None] < d_len[:, None],
        "nt": torch.randn(n, 2, 3, D, generator=g),
        "nt_mask": tok,
    }


def dist_loss(case: str, tile: int, ring: bool, gather: bool = True):
    torch.manual_seed(0)
    return {
        "infonce": lambda: InfoNCE(0.1, learn_temperature=True, gather=gather, tile_size=tile, ring=ring),
        "infonce_all": lambda: InfoNCE(
            0.1, learn_temperature=True, symmetric=True, gather=gather, tile_size=tile, ring=ring
        ),
        "siglip": lambda: SigLIP(5.0, -2.0, gather=gather, tile_size=tile, ring=ring),
        "colbert": lambda: ColBERT(0.1, gather=gather, tile_size=tile, ring=ring),
    }[case]()


def dist_call(case: str, loss, b: dict[str, torch.Tensor]):
    """(loss value, gradients w.r.t. the float inputs (by key) and the loss's parameters)."""
    keys = {
        "infonce": ["q", "p"],
        "infonce_all": ["q", "p", "neg"],
        "siglip": ["q", "p"],
        "colbert": ["qt", "dt", "nt"],
    }[case]
    x = {k: b[k].clone().requires_grad_() for k in keys}
    qt_mask = b["qt_mask"].clone()
    qt_mask[:, 0] = True
    if case == "infonce":
        value = loss(x["q"], x["p"])
    elif case == "infonce_all":
        value = loss(x["q"], x["p"], x["neg"], b["nmask"], labels=b["labels"])
    elif case == "siglip":
        value = loss(x["q"], x["p"], labels=b["labels"])
    else:
        value = loss(x["qt"], qt_mask, x["dt"], b["dt_mask"], x["nt"], b["nt_mask"])
    value.backward()
    return value.item(), {k: v.grad for k, v in x.items()}, [p.grad.clone() for p in loss.parameters()]


def _dist_body(rank: int, world: int):
    batch = dist_batch(world)
    local = {k: v[rank * ROWS : (rank + 1) * ROWS] for k, v in batch.items()}
    length = int(local["dt_mask"].sum(1).max())  # each rank trims its docs to its own longest
    local["dt"], local["dt_mask"] = local["dt"][:, :length], local["dt_mask"][:, :length]
    out = {}
    for case in DIST_CASES:
        for ring, tile in ((False, 3), (True, 3), (True, 0)):  # 0: automatic tile (rings always tile)
            out[case, ring, tile] = dist_call(case, dist_loss(case, tile, ring), local)
    return out


def check_contract(world: int) -> None:
    results = run_ranks(_dist_body, world, timeout=180)
    batch = dist_batch(world)
    for case in DIST_CASES:
        want_value, want_x, want_params = dist_call(case, dist_loss(case, 0, False, gather=False), batch)
        for key in results[0]:
            if key[0] != case:
                continue
            name = f"W={world} {case} ring={key[1]} tile={key[2]}"
            value = sum(r[key][0] for r in results) / world  # the global loss is the mean of the ranks'
            dev = abs(value - want_value)
            # Each rank's input gradients: W x its rows of the global gradient (DDP then averages
            # parameter gradients over W, which the parameters of the loss show directly).
            got_x = {
                k: torch.cat([pad_dim(r[key][1][k], 1, g.shape[1]) for r in results]) / world for k, g in want_x.items()
            }
            for k, g in want_x.items():
                dev = max(dev, (got_x[k] - g).abs().max().item() / max(g.abs().max().item(), 1e-6))
            for i, g in enumerate(want_params):
                got = sum(r[key][2][i] for r in results) / world
                dev = max(dev, ((got - g).abs() / g.abs().clamp_min(1e-6)).item())
            DEVIATIONS[name] = dev
            assert dev < 2e-5, f"{name}: deviation {dev:.2e}"


def test_distributed_two_ranks_gather_and_ring():
    check_contract(2)


def test_distributed_three_ranks_gather_and_ring():
    check_contract(3)


@pytest.fixture(autouse=True, scope="module")
def _report_deviations():
    """Print the largest deviation per check (``pytest -s``): how close tiled is to dense."""
    yield
    for name, dev in sorted(DEVIATIONS.items()):
        print(f"max deviation {name}: {dev:.2e}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_losses_return_the_same_dtype_dense_and_tiled(dtype):
    """bf16/fp16 embeddings: InfoNCE, SigLIP and ColBERT return the inputs' dtype on both paths, with close values."""
    q, p, n = (randn(*shape, seed=40 + i, dtype=dtype) for i, shape in enumerate([(B, D), (B, D), (B, K, D)]))
    tq, td = randn(B, 4, D, seed=43, dtype=dtype), randn(B, 5, D, seed=44, dtype=dtype)
    tm, dm = torch.ones(B, 4, dtype=torch.bool), torch.ones(B, 5, dtype=torch.bool)
    cases = []
    for learn, sym in itertools.product([False, True], [False, True]):
        cases.append(
            (
                f"InfoNCE[{learn},{sym}]",
                lambda t, a=learn, b=sym: InfoNCE(learn_temperature=a, symmetric=b, tile_size=t)(q, p, n),
            )
        )
        cases.append((f"SigLIP[{learn}]", lambda t, a=learn: SigLIP(learn=a, tile_size=t)(q, p)))
    cases.append(("ColBERT", lambda t: ColBERT(tile_size=t)(tq, tm, td, dm)))
    for name, loss in cases:
        dense, tiled_out = loss(0), loss(4)
        assert dense.dtype == tiled_out.dtype == dtype, (name, dense.dtype, tiled_out.dtype)
        torch.testing.assert_close(dense.float(), tiled_out.float(), rtol=2e-2, atol=2e-2)
