"""defer_gradient_sync + one explicit average_gradients on real gloo ranks: plain, FSDP2 and GradCache steps
of 2 micro-batches give the gradients of one process on the global micro-batches (plain and GradCache ragged:
hard negatives on rank 0 only; FSDP2, whose forwards are collectives, on every rank), and
clip_gradients treats 0 as off."""

from __future__ import annotations

import math

import loss_refs as ref
import pytest
import torch
import torch.nn as nn
from _multiproc import run_ranks

from vembed_blocks.distributed import average_gradients
from vembed_blocks.grad_sync import clip_gradients, defer_gradient_sync
from vembed_blocks.gradcache import GradCache
from vembed_blocks.losses import InfoNCE
from vembed_blocks.parallel import shard_model

ROWS, DIN, DIM, MICRO = 3, 5, 4, 2


def micro_batches(world: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [
        {"q": torch.randn(ROWS * world, DIN, generator=g), "p": torch.randn(ROWS * world, DIN, generator=g),
         "neg": torch.randn(ROWS * world, DIN, generator=g)}
        for _ in range(MICRO)
    ]  # fmt: skip


class Tower(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.Linear(DIN, 8), nn.Linear(8, DIM)])

    def forward(self, x):
        return self.layers[1](torch.tanh(self.layers[0](x)))


def _body(rank, world):
    out = {}
    for how in ("plain", "fsdp", "gradcache"):
        tower, loss_fn = Tower(), InfoNCE(temperature=0.1, learn_temperature=True)
        if how == "fsdp":
            tower = shard_model(tower, layer_classes=[nn.Linear])
        state = nn.ModuleDict({"tower": tower, "loss": loss_fn})
        gc = GradCache(chunk_size=2) if how == "gradcache" else None
        enc = (lambda x: gc.encode(tower, x=x)) if gc else tower
        batches = micro_batches(world)
        for batch in defer_gradient_sync(state, batches):
            q, p = enc(batch["q"][rank * ROWS : (rank + 1) * ROWS]), enc(batch["p"][rank * ROWS : (rank + 1) * ROWS])
            mine = slice(rank * ROWS, (rank + 1) * ROWS)
            neg = enc(batch["neg"][mine]) if rank == 0 or how == "fsdp" else None
            (loss_fn(q, p, negatives=neg) / len(batches)).backward()
        average_gradients(p for p in state.parameters() if p.requires_grad)  # the step's one sync
        grads = {}
        for name, param in state.named_parameters():
            g = param.grad
            grads[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).clone()
        out[how] = grads
    return out


def reference(world: int, negatives_of: int) -> dict[str, torch.Tensor]:
    """One process, float64: the mean over micro-batches of the loss with the first ``negatives_of``
    ranks' negatives."""
    tower, loss_fn = Tower().double(), InfoNCE(temperature=0.1, learn_temperature=True).double()
    state = nn.ModuleDict({"tower": tower, "loss": loss_fn})
    for batch in micro_batches(world):
        b = {k: v.double() for k, v in batch.items()}
        neg = tower(b["neg"][: negatives_of * ROWS])
        (ref.infonce(tower(b["q"]), tower(b["p"]), neg, scale=loss_fn.log_scale.exp()) / MICRO).backward()
    return {n: p.grad for n, p in state.named_parameters()}


def test_accumulated_steps_equal_one_process_on_two_and_three_ranks():
    for world in (2, 3):
        ragged, full = reference(world, 1), reference(world, world)
        for rank_result in run_ranks(_body, world, timeout=180):
            for how, grads in rank_result.items():
                want = full if how == "fsdp" else ragged
                assert grads.keys() == want.keys()
                for name, g in want.items():
                    dev = (grads[name].double() - g).abs().max().item()
                    assert dev < 1e-5, f"W={world} {how} {name}: {dev}"


def test_clip_gradients_zero_is_off_and_positive_clips_like_torch():
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)]
    norm = math.sqrt(sum(float((x * x).sum()) for x in grads))

    def params():
        out = [nn.Parameter(torch.zeros_like(x)) for x in grads]
        for p, x in zip(out, grads):
            p.grad = x.clone()
        return out + [nn.Parameter(torch.zeros(2))]  # one without a gradient: skipped

    off = params()
    assert clip_gradients(off, 0) == pytest.approx(norm, rel=1e-12)
    assert all(torch.equal(p.grad, x) for p, x in zip(off, grads))  # 0 = off: untouched (not zeroed)
    for max_norm in (0.5 * norm, 2 * norm):
        ours, theirs = params(), params()
        clip_gradients(ours, max_norm)
        torch.nn.utils.clip_grad_norm_(theirs[:2], max_norm)
        want = [x * min(1.0, max_norm / (norm + 1e-6)) for x in grads]
        for a, b, w in zip(ours, theirs, want):
            assert torch.allclose(a.grad, w, rtol=1e-12, atol=0) and torch.allclose(b.grad, w, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="max_norm must be >= 0"):
        clip_gradients(params(), -1.0)
