"""How many collectives and host syncs a gathered loss runs, on real gloo ranks.

Every collective is a round trip across ranks and every host sync stalls an accelerator's
queue; a gathered loss call should need few of both. The counts are taken by wrapping
torch.distributed's collective functions and the Tensor methods that read a value back to
Python, for the duration of one forward call. Each checked call must also still equal a
plain float64 dense reference written below, so a count cannot be won by computing less.

A second launch checks ``group=``: on 3 ranks, ranks 0 and 1 compute the loss over a
subgroup (rank 2 takes no part) and must equal the dense loss over those two ranks' rows.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from _multiproc import run_ranks

from vembed_blocks import ColBERT, InfoNCE, SigLIP

B, D, K, LQ, LD, LN = 3, 4, 2, 3, 4, 4
T = 0.1
SIG_T, SIG_BIAS = 5.0, -2.0

COLLECTIVES = [
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_single",
    "all_gather_object",
    "all_reduce",
    "broadcast",
    "all_to_all",
    "all_to_all_single",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "reduce",
    "gather",
    "scatter",
    "barrier",
    "send",
    "recv",
    "isend",
    "irecv",
    "batch_isend_irecv",
]
SYNCS = ["item", "tolist", "__bool__", "__int__", "__float__", "__index__"]


@contextlib.contextmanager
def counting():
    """Count outermost torch.distributed collective calls and Tensor -> Python reads."""
    counts = {"collectives": 0, "syncs": 0}
    depth = [0]
    patched: list[tuple[object, str, object, bool]] = []

    def wrap(owner, name, key):
        original = getattr(owner, name)

        @functools.wraps(original)
        def counted(*args, **kwargs):
            if depth[0] == 0:  # a collective that calls another counts once; so does item() inside it
                counts[key] += 1
            depth[0] += 1
            try:
                return original(*args, **kwargs)
            finally:
                depth[0] -= 1

        patched.append((owner, name, original, name in vars(owner)))
        setattr(owner, name, counted)

    import torch.distributed.nn.functional as dist_nn

    for name in COLLECTIVES:
        if hasattr(dist, name):
            wrap(dist, name, "collectives")
    wrap(dist_nn, "all_gather", "collectives")
    for name in SYNCS:
        wrap(torch.Tensor, name, "syncs")
    try:
        yield counts
    finally:
        for owner, name, original, own in reversed(patched):
            if own:
                setattr(owner, name, original)
            else:
                delattr(owner, name)


# ----------------------------------------------------------------------------- references (float64, dense)


def ref_infonce(q, p, neg, nmask, labels, scale, symmetric=False):
    """Rows of q against all p (minus other rows sharing a label >= 0) plus every real negative;
    symmetric: averaged with each p against all q."""
    q, p, neg = F.normalize(q, dim=-1), F.normalize(p, dim=-1), F.normalize(neg, dim=-1)
    n = q.shape[0]
    negs = neg.reshape(-1, neg.shape[-1])[nmask.reshape(-1)]
    same = (labels[:, None] == labels[None, :]) & (labels[:, None] >= 0) & ~torch.eye(n, dtype=torch.bool)

    def direction(rows, cols, extra):
        logits = scale * torch.cat([rows @ cols.T, rows @ extra.T], dim=1)
        logits[:, :n] = logits[:, :n].masked_fill(same, float("-inf"))
        return (torch.logsumexp(logits, 1) - logits.diagonal()).mean()

    loss = direction(q, p, negs)
    return (loss + direction(p, q, negs[:0])) / 2 if symmetric else loss


def ref_siglip(a, b, labels, t, bias):
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    positive = (labels[:, None] == labels[None, :]) & (labels[:, None] >= 0) | torch.eye(len(a), dtype=torch.bool)
    sign = torch.where(positive, 1.0, -1.0)
    return -F.logsigmoid(sign * (t * a @ b.T + bias)).sum() / a.shape[0]


def ref_maxsim(q, qm, d, dm):
    sim = torch.einsum("qd,td->qt", q, d).masked_fill(~dm[None, :], float("-inf")).amax(1)
    return sim[qm].mean()


def ref_colbert(q, qm, d, dm, neg, nmask, temperature):
    q, d, neg = F.normalize(q, dim=-1), F.normalize(d, dim=-1), F.normalize(neg, dim=-1)
    cands = list(zip(d, dm)) + [(x, m) for x, m in zip(neg.flatten(0, 1), nmask.flatten(0, 1)) if m.any()]
    logits = torch.stack([torch.stack([ref_maxsim(qi, qmi, c, cm) for c, cm in cands]) for qi, qmi in zip(q, qm)])
    logits = logits / temperature
    return (torch.logsumexp(logits, 1) - logits.diagonal()).mean()


def global_batch(world: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    n = B * world

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    nmask = torch.rand(n, K, generator=g) > 0.3
    tok = torch.rand(n, K, LN, generator=g) > 0.4
    tok[1, 1] = False  # an absent negative (all padding)
    qt_mask, dt_mask = torch.rand(n, LQ, generator=g) > 0.3, torch.rand(n, LD, generator=g) > 0.3
    qt_mask[:, 0] = dt_mask[:, 0] = True
    return {
        "q": r(n, D),
        "p": r(n, D),
        "neg": r(n, K, D),
        "nmask": nmask,
        "labels": torch.tensor([i % 4 for i in range(n)]),  # shared across ranks
        "qt": r(n, LQ, D),
        "qt_mask": qt_mask,
        "dt": r(n, LD, D),
        "dt_mask": dt_mask,
        "nt": r(n, K, LN, D),
        "nt_mask": tok,
    }


def calls(group=None, ring=False):
    """(name, call(batch)) for the three gathered losses, with every optional input."""
    kw = {} if group is None else {"group": group, "ring": ring}
    infonce = InfoNCE(temperature=T, **kw).double()
    symmetric = InfoNCE(temperature=T, symmetric=True, **kw).double()
    siglip = SigLIP(temperature=SIG_T, bias=SIG_BIAS, learn=False, **kw).double()
    colbert = ColBERT(temperature=T, **kw).double()
    return [
        ("infonce", lambda b: infonce(b["q"], b["p"], b.get("neg"), b.get("nmask"), labels=b.get("labels"))),
        ("infonce_sym", lambda b: symmetric(b["q"], b["p"], b.get("neg"), b.get("nmask"), labels=b.get("labels"))),
        ("siglip", lambda b: siglip(b["q"], b["p"], labels=b.get("labels"))),
        ("colbert", lambda b: colbert(b["qt"], b["qt_mask"], b["dt"], b["dt_mask"], b.get("nt"), b.get("nt_mask"))),
    ]


def reference(name: str, b: dict[str, torch.Tensor]) -> torch.Tensor:
    if name.startswith("infonce"):
        return ref_infonce(b["q"], b["p"], b["neg"], b["nmask"], b["labels"], 1 / T, name == "infonce_sym")
    if name == "siglip":
        return ref_siglip(b["q"], b["p"], b["labels"], SIG_T, SIG_BIAS)
    return ref_colbert(b["qt"], b["qt_mask"], b["dt"], b["dt_mask"], b["nt"], b["nt_mask"], T)


FLOAT_KEYS = ["q", "p", "neg", "qt", "dt", "nt"]
NAMES = ["infonce", "infonce_sym", "siglip", "colbert"]


def local_slice(batch, rank, rows=B):
    local = {k: v[rank * rows : (rank + 1) * rows].clone() for k, v in batch.items()}
    for k in FLOAT_KEYS:
        local[k].requires_grad_()
    return local


def ragged(local, rank):
    """Rank 1: one row fewer, no labels, no negatives; docs one token shorter."""
    if rank != 1:
        return local
    local = {k: v[:-1] for k, v in local.items() if k not in ("neg", "nmask", "labels", "nt", "nt_mask")}
    local["dt"], local["dt_mask"] = local["dt"][:, :-1].detach().requires_grad_(), local["dt_mask"][:, :-1]
    return local


def ragged_global(batch):
    """What one process sees for `ragged` on 2 ranks: rank 1's last row gone, its rows unlabelled,
    without negatives, their docs' last token padding."""
    keep = [i for i in range(2 * B) if i != 2 * B - 1]
    batch = {k: v[keep].clone() for k, v in batch.items()}
    ones = slice(B, 2 * B - 1)
    batch["labels"][ones], batch["nmask"][ones], batch["nt_mask"][ones], batch["dt_mask"][ones, -1] = -1, 0, 0, 0
    return batch


def _count_body(rank: int, world: int):
    batch = global_batch(world)
    out = {}
    for data in ("uniform", "ragged"):
        for name, call in calls():
            local = local_slice(batch, rank)
            local = ragged(local, rank) if data == "ragged" else local
            with counting() as forward:
                loss = call(local)
            with counting() as backward:
                loss.backward()
            out[data, name] = (loss.item(), dict(forward), dict(backward))
    # Only rank 0's negatives are trainable and rank 1 has none: rank 1's backward must still
    # join the gradient's all-reduce (else rank 0 waits forever).
    local = {k: v.detach() for k, v in local_slice(batch, rank).items()}
    neg = local["neg"].requires_grad_() if rank == 0 else None
    loss = InfoNCE(temperature=T)(local["q"], local["p"], neg, local["nmask"] if rank == 0 else None, local["labels"])
    loss.backward()
    out["frozen"] = (loss.item(), None if neg is None else neg.grad)
    return out


def test_gathered_losses_run_few_collectives_and_host_syncs():
    results = run_ranks(_count_body, 2, timeout=120)
    batch = global_batch(2)
    frozen = {k: v.clone() for k, v in batch.items()}
    frozen["nmask"][B:] = False  # rank 1 passed no negatives
    neg = frozen["neg"].requires_grad_()
    want = ref_infonce(frozen["q"], frozen["p"], neg, frozen["nmask"], frozen["labels"], 1 / T)
    want.backward()
    assert abs((results[0]["frozen"][0] + results[1]["frozen"][0]) / 2 - want.item()) < 1e-10
    # Rank 0's gradient is d(sum of both ranks' losses)/d(its negatives): twice d(mean)/d(them).
    assert torch.allclose(results[0]["frozen"][1] / 2, neg.grad[:B], atol=1e-12)
    for name in NAMES:
        for data in ("uniform", "ragged"):
            print(name, data, "forward", results[0][data, name][1], "backward", results[0][data, name][2])
        want = reference(name, batch).item()
        got = sum(r["uniform", name][0] for r in results) / 2  # equal local batches: the mean is the global loss
        assert abs(got - want) < 1e-10, (name, got, want)
        # Ragged: each rank's loss is the mean over its own rows, so weigh by rows (3 and 2).
        want = reference(name, ragged_global(batch)).item()
        got = (B * results[0]["ragged", name][0] + (B - 1) * results[1]["ragged", name][0]) / (2 * B - 1)
        assert abs(got - want) < 1e-10, (name, "ragged", got, want)
        for r in results:
            for data in ("uniform", "ragged"):
                forward = r[data, name][1]
                assert forward["collectives"] <= 3, (name, data, forward)
                assert forward["syncs"] <= 1, (name, data, forward)


# ----------------------------------------------------------------------------- group=


def _group_body(rank: int, world: int):
    pair = dist.new_group([0, 1])  # every rank creates it; only ranks 0 and 1 use it
    if rank == 2:  # takes no part: a collective on the world group would leave ranks 0 and 1 waiting
        return None
    batch = global_batch(world)
    out = {}
    for variant in ("gathered", "ring"):
        for name, call in calls(pair, ring=variant == "ring"):
            local = local_slice(batch, rank)
            loss = call(local)
            loss.backward()
            grads = {k: local[k].grad for k in FLOAT_KEYS if local[k].grad is not None}
            out[variant, name] = (loss.item(), grads)
    return out


def test_group_argument_gathers_over_that_group_only():
    """Ranks 0 and 1 of 3, over a subgroup: value and input gradients of the dense loss of their 6 rows."""
    results = run_ranks(_group_body, 3, timeout=90)[:2]
    rows = {k: v[: 2 * B].clone() for k, v in global_batch(3).items()}
    for name in NAMES:
        for k in FLOAT_KEYS:
            rows[k].requires_grad_()
        want = reference(name, rows)
        want.backward()
        for variant in ("gathered", "ring"):
            got = sum(r[variant, name][0] for r in results) / 2
            assert abs(got - want.item()) < 1e-10, (variant, name, got, want.item())
            # Each rank's gradient is d(sum of both ranks' losses)/d(its rows): twice its rows of d(mean)/d(rows).
            for k in results[0][variant, name][1]:
                got_grad = torch.cat([r[variant, name][1][k] for r in results]) / 2
                assert torch.allclose(got_grad, rows[k].grad, atol=1e-10), (variant, name, k)
        for k in FLOAT_KEYS:
            rows[k].grad = None
