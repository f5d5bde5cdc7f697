"""False-negative rules across 2 and 3 real gloo ranks: gathered (dense and tiled) and ring, full and ragged.

Each rank encodes its own rows with a shared (DDP) encoder and calls the loss with every rule on
(content-id duplicates, a margin that down-weights, a guide margin); the mean of the ranks' losses,
every rank's parameter gradients and the sum of the ranks' hit counts must equal the float64
pair-by-pair reference (``fn_refs``) on the concatenated global batch. Ragged: rank 1 has no hard
negatives and no content ids (its ids count as none), rank 2 has negatives without a mask; a
duplicate positive is planted across ranks (rank 1's row 1 = rank 0's row 0) and within rank 0.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from _multiproc import run_ranks
from fn_refs import colbert_fn, infonce_fn, siglip_fn
from torch.nn.parallel import DistributedDataParallel as DDP

from vembed_blocks.colbert import ColBERT
from vembed_blocks.false_negatives import FalseNegatives
from vembed_blocks.losses import InfoNCE, SigLIP

ROWS, DIN, DIM, K, G = 3, 5, 4, 2, 3
RULE = FalseNegatives(margin=0.3, weight=0.5, guide_margin=0.1)
LOSSES = ["infonce", "infonce_sym", "siglip", "colbert"]
PATHS = {"dense": {"tile_size": 0}, "tiled": {"tile_size": 2}, "ring": {"tile_size": 2, "ring": True}}
CASES = [(loss, path, ragged) for loss in LOSSES for path in PATHS for ragged in (False, True)]


def global_batch(world: int, ragged: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(99)
    n = ROWS * world

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    b = {"q": r(n, DIN), "p": r(n, DIN), "neg": r(n, K, DIN), "nmask": torch.rand(n, K, generator=g) > 0.3}
    b["qt"], b["dt"], b["nt"] = r(n, 3, DIN), r(n, 4, DIN), r(n, K, 2, DIN)
    b["qt_mask"] = torch.arange(3)[None] < torch.randint(1, 4, (n,), generator=g)[:, None]
    b["dt_mask"] = torch.arange(4)[None] < torch.tensor([1 + i % 2 + i // ROWS for i in range(n)]).clamp(max=4)[:, None]
    b["nt_mask"] = (torch.rand(n, K, 2, generator=g) > 0.3) & b["nmask"][..., None]
    b["nt_mask"][..., 0] |= b["nmask"]
    b["gq"], b["gp"], b["gn"] = r(n, G), r(n, G), r(n, K, G)
    b["qid"], b["pid"] = torch.arange(100, 100 + n), torch.arange(200, 200 + n)
    b["nid"] = torch.arange(300, 300 + n * K).view(n, K)
    one = ROWS + 1  # rank 1's row 1 duplicates rank 0's row 0, across ranks
    for key in ("p", "dt", "dt_mask", "gp", "pid"):
        b[key][one], b[key][1] = b[key][0], b[key][0]  # and rank 0's row 1, within the rank
    b["q"][2], b["qt"][2], b["qt_mask"][2], b["gq"][2], b["qid"][2] = (
        b[k][one] for k in ("q", "qt", "qt_mask", "gq", "qid")
    )
    if ragged:  # what one process sees: rank 1 without negatives or ids, rank 2's negatives all real
        ones = slice(ROWS, 2 * ROWS)
        b["nmask"][ones], b["nt_mask"][ones] = False, False
        b["qid"][ones], b["pid"][ones] = -1, -1
        if world > 2:
            b["nmask"][2 * ROWS :] = True
            b["nt_mask"][2 * ROWS :, :, 0] = True
    b["nid"] = b["nid"].masked_fill(~b["nmask"], -1)
    return b


def local_inputs(b: dict, rank: int, ragged: bool) -> dict:
    loc = {k: v[rank * ROWS : (rank + 1) * ROWS] for k, v in b.items()}
    length = int(loc["dt_mask"].sum(1).max())  # each rank pads its documents to its own longest
    loc["dt"], loc["dt_mask"] = loc["dt"][:, :length], loc["dt_mask"][:, :length]
    if ragged and rank == 1:
        for key in ("neg", "nmask", "nt", "nt_mask", "gn", "nid", "qid", "pid"):
            del loc[key]
    if ragged and rank == 2:
        del loc["nmask"]
    return loc


class Combo(nn.Module):
    def __init__(self, loss: str, path: str):
        super().__init__()
        torch.manual_seed(0)
        self.kind, self.enc = loss, nn.Linear(DIN, DIM).double()
        opts = {**PATHS[path], "false_negatives": RULE}
        self.loss = {
            "infonce": lambda: InfoNCE(temperature=0.1, **opts),
            "infonce_sym": lambda: InfoNCE(temperature=0.1, symmetric=True, **opts),
            "siglip": lambda: SigLIP(temperature=5.0, bias=-2.0, learn=False, **opts),
            "colbert": lambda: ColBERT(temperature=0.1, **opts),
        }[loss]()

    def forward(self, b: dict) -> torch.Tensor:
        e, kind = self.enc, self.kind
        ids = {"query": b["qid"], "positive": b["pid"]} if "pid" in b else None
        if ids is not None and "nid" in b:
            ids["negatives"] = b["nid"]
        guide = {"query": b["gq"], "positive": b["gp"]}
        if "gn" in b:
            guide["negatives"] = b["gn"]
        if kind == "colbert":
            nt = e(b["nt"]) if "nt" in b else None
            args = (e(b["qt"]), b["qt_mask"], e(b["dt"]), b["dt_mask"], nt, b.get("nt_mask"))
            return self.loss(*args, content_ids=ids, guide=guide)
        neg = e(b["neg"]) if "neg" in b else None
        if kind == "siglip":
            return self.loss(e(b["q"]), e(b["p"]), None, neg, b.get("nmask"), content_ids=ids, guide=guide)
        return self.loss(e(b["q"]), e(b["p"]), neg, b.get("nmask"), content_ids=ids, guide=guide)

    def reference(self, b: dict) -> tuple[torch.Tensor, dict]:
        e, kind, n = self.enc, self.kind, len(b["q"])
        real = [(i, k) for i in range(n) for k in range(K) if b["nmask"][i, k]]
        negs = [(e(b["neg"][i, k]), int(b["nid"][i, k]), b["gn"][i, k]) for i, k in real]
        pid = torch.where(b["pid"] >= 0, b["pid"], -1)
        if kind == "colbert":
            tok = [(e(b["nt"][i, k]), b["nt_mask"][i, k], int(b["nid"][i, k]), b["gn"][i, k]) for i, k in real]
            qt, dt = e(b["qt"]), e(b["dt"])
            return colbert_fn(qt, b["qt_mask"], dt, b["dt_mask"], tok, 0.1, RULE, pid, b["gq"], b["gp"])
        if kind == "siglip":
            return siglip_fn(e(b["q"]), e(b["p"]), negs, None, 5.0, -2.0, RULE, pid, b["gq"], b["gp"])
        sym = kind == "infonce_sym"
        return infonce_fn(e(b["q"]), e(b["p"]), negs, None, 10.0, sym, RULE, b["qid"], pid, b["gq"], b["gp"])


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n.removeprefix("module."): p.grad.clone() for n, p in model.named_parameters()}


def _body(rank: int, world: int):
    out = {}
    for loss, path, ragged in CASES:
        model = DDP(Combo(loss, path))
        value = model(local_inputs(global_batch(world, ragged), rank, ragged))
        value.backward()
        masked = {k: int(v) for k, v in model.module.loss.masked.items()}
        out[loss, path, ragged] = (value.item(), grads(model), masked)
    return out


def check_world(world: int) -> None:
    results = run_ranks(_body, world, timeout=240)
    for case in CASES:
        loss, path, ragged = case
        model = Combo(loss, path)
        want, counts = model.reference(global_batch(world, ragged))
        want.backward()
        assert set(counts) == {"duplicates", "margin", "guide"}, (case, counts)
        got = [r[case][0] for r in results]
        assert abs(sum(got) / world - want.item()) < 1e-10, (case, got, want.item())
        total: dict[str, int] = {}
        for r in results:
            for rule, c in r[case][2].items():
                total[rule] = total.get(rule, 0) + c
        assert total == counts, (case, total, counts)
        for r in results:
            for name, g in grads(model).items():
                assert (r[case][1][name] - g).abs().max().item() < 1e-9, (case, name)


def test_rules_across_two_ranks():
    check_world(2)


def test_rules_across_three_ranks():
    check_world(3)
