"""The gradient contract on real gloo processes (2 and 3 ranks).

Each rank holds 3 rows of a global batch, encodes them with a DDP-wrapped encoder and
computes the loss with ``gather=True``. After DDP's gradient averaging, every parameter
gradient (encoder and learnable temperature/bias) must equal the gradient of a plain
reference loss on the concatenated batch in one process, and the mean of the ranks'
losses must equal the global loss.

The ``*_ragged`` cases give the ranks different optional inputs: rank 0 has hard negatives
(with a mask) and labels, rank 1 neither, rank 2 negatives without a mask and labels. The
reference is one process on the global batch with rank 1's negatives masked out and its
rows unlabelled (-1).
"""

from __future__ import annotations

import loss_refs as ref
import torch
import torch.nn as nn
from _multiproc import run_ranks
from torch.nn.parallel import DistributedDataParallel as DDP

from vembed_blocks.colbert import ColBERT
from vembed_blocks.losses import InfoNCE, SigLIP

CASES = ["infonce", "infonce_neg", "infonce_sym", "siglip", "colbert"]
RAGGED = ["infonce_ragged", "infonce_sym_ragged", "siglip_ragged", "colbert_ragged"]
ROWS, DIN, DIM, K = 3, 5, 4, 2


def global_batch(world: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    n = ROWS * world

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    nmask = torch.rand(n, K, generator=g) > 0.3
    # Token lengths: rank r's docs are at most 3 + 2r tokens, so padded lengths differ by rank.
    q_len = torch.randint(1, 4, (n,), generator=g)
    d_len = torch.tensor([1 + (i % ROWS) + 2 * (i // ROWS) for i in range(n)])
    tok_mask = torch.rand(n, K, 4, generator=g) > 0.4
    tok_mask[0, 0, 0] = True  # at least one negative somewhere
    return {
        "q": r(n, DIN),
        "p": r(n, DIN),
        "neg": r(n, K, DIN),
        "nmask": nmask,
        "labels": torch.tensor([i % 4 for i in range(n)]),  # duplicate labels across ranks
        "qt": r(n, 3, DIN),
        "qt_mask": torch.arange(3)[None] < q_len[:, None],
        "dt": r(n, d_len.max().item(), DIN),
        "dt_mask": torch.arange(d_len.max().item())[None] < d_len[:, None],
        "nt": r(n, K, 4, DIN),
        "nt_mask": tok_mask,
    }


def ragged_global(batch: dict[str, torch.Tensor], world: int) -> dict[str, torch.Tensor]:
    """What one process sees for the ragged cases: rank 1's negatives masked, its rows unlabelled."""
    batch = dict(batch)
    ones = slice(ROWS, 2 * ROWS)
    batch["nmask"], batch["nt_mask"], batch["labels"] = (
        batch["nmask"].clone(),
        batch["nt_mask"].clone(),
        batch["labels"].clone(),
    )
    batch["nmask"][ones], batch["nt_mask"][ones], batch["labels"][ones] = False, False, -1
    if world > 2:
        batch["nmask"][2 * ROWS : 3 * ROWS] = True
    return batch


def ragged_local(local: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    local = dict(local)
    if rank == 1:
        for key in ("neg", "nmask", "labels", "nt", "nt_mask"):
            del local[key]
    elif rank == 2:
        del local["nmask"]
    return local


def rank_slice(batch: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    local = {k: v[rank * ROWS : (rank + 1) * ROWS] for k, v in batch.items()}
    length = int(local["dt_mask"].sum(1).max())  # trim doc padding to this rank's own longest doc
    local["dt"], local["dt_mask"] = local["dt"][:, :length], local["dt_mask"][:, :length]
    return local


class Combo(nn.Module):
    """Encoder + loss in one module, so DDP averages the loss's own parameters too."""

    def __init__(self, case: str):
        super().__init__()
        torch.manual_seed(0)
        self.case = case
        self.enc = nn.Linear(DIN, DIM).double()
        self.loss = {
            "infonce": lambda: InfoNCE(temperature=0.1, learn_temperature=True),
            "infonce_neg": lambda: InfoNCE(temperature=0.1),
            "infonce_sym": lambda: InfoNCE(temperature=0.1, learn_temperature=True, symmetric=True),
            "siglip": lambda: SigLIP(temperature=5.0, bias=-2.0),
            "colbert": lambda: ColBERT(temperature=0.1),
        }[case.removesuffix("_ragged")]().double()

    def forward(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        e, c = self.enc, self.case
        if c.endswith("_ragged"):  # optional inputs as this rank has them
            neg = e(b["neg"]) if "neg" in b else None
            if c == "colbert_ragged":
                nt = e(b["nt"]) if "nt" in b else None
                return self.loss(e(b["qt"]), b["qt_mask"], e(b["dt"]), b["dt_mask"], nt, b.get("nt_mask"))
            if c == "siglip_ragged":
                return self.loss(e(b["q"]), e(b["p"]), b.get("labels"), neg, b.get("nmask"))
            return self.loss(e(b["q"]), e(b["p"]), neg, b.get("nmask"), labels=b.get("labels"))
        if c == "infonce":
            return self.loss(e(b["q"]), e(b["p"]))
        if c in ("infonce_neg", "infonce_sym"):
            return self.loss(e(b["q"]), e(b["p"]), e(b["neg"]), b["nmask"], labels=b["labels"])
        if c == "siglip":
            return self.loss(e(b["q"]), e(b["p"]), labels=b["labels"])
        return self.loss(e(b["qt"]), b["qt_mask"], e(b["dt"]), b["dt_mask"], e(b["nt"]), b["nt_mask"])

    def reference(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        e, c, loss = self.enc, self.case, self.loss
        if c == "infonce":
            return ref.infonce(e(b["q"]), e(b["p"]), scale=loss.log_scale.exp())
        if c == "infonce_neg":
            return ref.infonce(e(b["q"]), e(b["p"]), e(b["neg"]), b["nmask"], b["labels"], scale=10.0)
        if c == "infonce_ragged":  # learnable temperature, as in "infonce"
            return ref.infonce(e(b["q"]), e(b["p"]), e(b["neg"]), b["nmask"], b["labels"], scale=loss.log_scale.exp())
        if c in ("infonce_sym", "infonce_sym_ragged"):
            return ref.infonce(e(b["q"]), e(b["p"]), e(b["neg"]), b["nmask"], b["labels"], loss.log_scale.exp(), True)
        if c == "siglip":
            return ref.siglip(e(b["q"]), e(b["p"]), loss.log_scale.exp(), loss.bias, b["labels"])
        if c == "siglip_ragged":
            return ref.siglip(
                e(b["q"]), e(b["p"]), loss.log_scale.exp(), loss.bias, b["labels"], e(b["neg"]), b["nmask"]
            )
        return ref.colbert(e(b["qt"]), b["qt_mask"], e(b["dt"]), b["dt_mask"], e(b["nt"]), b["nt_mask"], 0.1)


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n.removeprefix("module."): p.grad.clone() for n, p in model.named_parameters()}


def _body(rank: int, world: int):
    local = rank_slice(global_batch(world), rank)
    out = {}
    for case in CASES + RAGGED:
        model = DDP(Combo(case))
        loss = model(ragged_local(local, rank) if case in RAGGED else local)
        loss.backward()
        out[case] = (loss.item(), grads(model))
    return out


def check_world(world: int) -> None:
    results = run_ranks(_body, world, timeout=180)
    for case in CASES + RAGGED:
        batch = ragged_global(global_batch(world), world) if case in RAGGED else global_batch(world)
        model = Combo(case)
        want = model.reference(batch)
        want.backward()
        want_grads = grads(model)
        losses = [r[case][0] for r in results]
        assert abs(sum(losses) / world - want.item()) < 1e-10, (case, losses, want.item())
        for rank_result in results:
            got = rank_result[case][1]
            assert got.keys() == want_grads.keys()
            for name, g in want_grads.items():
                dev = (got[name] - g).abs().max().item()
                assert dev < 1e-6, f"{case} W={world} {name}: {dev}"
                assert got[name].abs().sum() > 0, f"{case}: {name} got no gradient"


def test_gradient_contract_two_ranks():
    check_world(2)


def test_gradient_contract_three_ranks():
    check_world(3)
