"""GradCache gradients against plainly written full-batch training (float64, no mocks).

Every reference here is ordinary training: one forward of the whole batch (or, where
dropout is on, the same chunks forwarded with grad in the same RNG order), the same loss,
one backward. Multi-process checks run on real gloo ranks via `run_ranks`.
"""

from __future__ import annotations

import copy
import gc as pygc
import weakref

import pytest
import torch
import torch.nn.functional as F
from _gradcache_refs import Tower, assert_close, batch, grads, info_nce
from _multiproc import run_ranks
from _watchdog import run_watched
from torch import nn

from vembed_blocks.gradcache import GradCache


@pytest.fixture(autouse=True, scope="module")
def _float64():
    """Exact comparisons in float64, for this module only (other modules keep float32)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.mark.parametrize("chunk_size,keep_graphs", [(1, 1), (3, 1), (3, 0), (3, 2), (64, 1)])
def test_two_towers_match_full_batch(chunk_size: int, keep_graphs: int) -> None:
    """Separate query/doc towers, batch 10 (ragged last chunk at 3), learnable temperature."""
    qt, dt = Tower(seed=1), Tower(seed=2)
    temp = nn.Parameter(torch.tensor(0.2))
    q_in, d_in = batch(10, 0), batch(10, 1)
    rq, rd, rtemp = copy.deepcopy(qt), copy.deepcopy(dt), copy.deepcopy(temp)
    info_nce(rq(**q_in), rd(**d_in), rtemp).backward()

    gc = GradCache(chunk_size=chunk_size, keep_graphs=keep_graphs)
    q, p = gc.encode(qt, **q_in), gc.encode(dt, **d_in)
    assert q.shape == (10, 12) and q.requires_grad
    info_nce(q, p, temp).backward()
    assert_close(grads(qt, dt) + [temp.grad], grads(rq, rd) + [rtemp.grad])


def test_shared_tower_and_three_calls() -> None:
    """One module encodes queries, positives and a hard-negative set (three encode calls)."""
    tower = Tower()
    q_in, d_in, n_in = batch(9, 0), batch(9, 1), batch(9, 2)
    ref = copy.deepcopy(tower)
    q, d, n = ref(**q_in), ref(**d_in), ref(**n_in)
    info_nce(q, torch.cat([d, n])).backward()

    gc = GradCache(chunk_size=4)
    q, d, n = gc.encode(tower, **q_in), gc.encode(tower, **d_in), gc.encode(tower, **n_in)
    info_nce(q, torch.cat([d, n])).backward()
    assert_close(grads(tower), grads(ref))


def test_token_budget_chunks() -> None:
    """max_tokens packs rows by real tokens; gradients are unchanged."""
    tower = Tower()
    q_in, d_in = batch(12, 3, length=9), batch(12, 4, length=9)
    ref = copy.deepcopy(tower)
    info_nce(ref(**q_in), ref(**d_in)).backward()

    seen: list[int] = []

    def fn(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        seen.append(int(attention_mask.sum()))
        assert int(attention_mask.sum()) <= 12 or len(attention_mask) == 1
        return tower(input_ids, attention_mask)

    gc = GradCache(max_tokens=12)
    q, d = gc.encode(fn, input_ids=q_in["input_ids"], attention_mask=q_in["attention_mask"]), gc.encode(tower, **d_in)
    info_nce(q, d).backward()
    assert_close(grads(tower), grads(ref))
    assert len(seen) > 3  # really chunked (first pass plus replays)


def test_accumulation_and_loss_scaling() -> None:
    """Two micro-steps of (loss / 2), then a loss scaled like GradScaler does: grads add and scale."""
    tower = Tower()
    micro = [(batch(6, 10), batch(6, 11)), (batch(6, 12), batch(6, 13))]
    ref = copy.deepcopy(tower)
    for q_in, d_in in micro:
        (info_nce(ref(**q_in), ref(**d_in)) / 2).backward()
    want = grads(ref)

    gc = GradCache(chunk_size=4)
    for q_in, d_in in micro:
        (info_nce(gc.encode(tower, **q_in), gc.encode(tower, **d_in)) / 2).backward()
    assert_close(grads(tower), want)

    tower.zero_grad()
    q_in, d_in = micro[0]
    (1024.0 * info_nce(gc.encode(tower, **q_in), gc.encode(tower, **d_in))).backward()
    ref.zero_grad()
    info_nce(ref(**q_in), ref(**d_in)).backward()
    assert_close(grads(tower), [1024.0 * g for g in grads(ref)])


def test_dropout_replay_is_bit_identical() -> None:
    """Replayed chunks equal the first pass bit for bit; grads equal a reference drawing the same RNG."""
    tower = Tower(dropout=0.3)
    q_in, d_in = batch(7, 20), batch(7, 21)
    passes: list[torch.Tensor] = []

    def fn(**chunk: torch.Tensor) -> torch.Tensor:
        out = tower(**chunk)
        passes.append(out.detach().clone())
        return out

    ref = copy.deepcopy(tower)
    torch.manual_seed(123)  # reference: the same chunks, forwarded with grad in the same order
    q = torch.cat([ref(**{k: v[s : s + 3] for k, v in q_in.items()}) for s in (0, 3, 6)])
    d = torch.cat([ref(**{k: v[s : s + 3] for k, v in d_in.items()}) for s in (0, 3, 6)])
    info_nce(q, d).backward()
    after_ref = torch.rand(3)

    torch.manual_seed(123)
    gc = GradCache(chunk_size=3)
    q, d = gc.encode(fn, **q_in), gc.encode(fn, **d_in)
    first = list(passes)
    info_nce(q, d).backward()
    replays = passes[6:]
    # Rows 3/3/1: chunks 0 and 2 of each call are replayed (the graph of chunk 1, the last of the
    # largest, is kept): compare bit for bit.
    assert len(replays) == 4
    for got, want in zip(replays, [first[0], first[2], first[3], first[5]]):
        assert torch.equal(got, want)
    assert_close(grads(tower), grads(ref))
    assert torch.equal(torch.rand(3), after_ref)  # the replays did not disturb the RNG stream


def _budget_run(budget: str, seed: int = 123):
    """GradCache with memory_budget (in first-chunk footprints F: "0", "1", "some" = 2.5F, "all" = inf) on
    batch 10 / chunk 3 (rows 3/3/3/1), two encode calls, dropout 0.3. Returns (tower, plans, forward calls,
    the RNG draw after the step, first-pass vs replay mismatches)."""
    tower = Tower(dropout=0.3)
    q_in, d_in = batch(10, 20), batch(10, 21)
    probe = GradCache(chunk_size=3, memory_budget=float("inf"))
    probe.encode(tower, **q_in)
    f = probe.last_plan.chunk_bytes
    probe.reset()
    assert f > 0
    first: dict[int, torch.Tensor] = {}
    calls, mismatches = [0], []

    def fn(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = tower(input_ids, attention_mask)
        calls[0] += 1
        key = input_ids.data_ptr()  # each chunk is a view with its own offset; a replay reuses it
        if key in first:
            mismatches.append(not torch.equal(out.detach(), first[key]))
        else:
            first[key] = out.detach().clone()
        return out

    gc = GradCache(chunk_size=3, memory_budget={"0": 0, "1": f, "some": 2.5 * f, "all": float("inf")}[budget])
    torch.manual_seed(seed)
    q = gc.encode(fn, **q_in)
    plans = [gc.last_plan]
    p = gc.encode(fn, **d_in)
    plans.append(gc.last_plan)
    info_nce(q, p).backward()
    return tower, plans, calls[0], torch.rand(3), mismatches


@pytest.mark.parametrize("budget,kept", [("0", (0, 0)), ("1", (1, 0)), ("some", (3, 0)), ("all", (4, 4))])
def test_memory_budget_matches_full_batch_with_dropout(budget: str, kept: tuple[int, int]) -> None:
    """Budgets of 0, 1, 2.5 and all chunks: exact gradients, bit-identical replays, only the rest re-run.

    The budget is shared by the two encode calls (their graphs live together until backward): with
    2.5 chunks the query call keeps chunks 0, 1 and the 1-row chunk 3 (2.33 F) and the doc call gets none.
    """
    ref = Tower(dropout=0.3)
    q_in, d_in = batch(10, 20), batch(10, 21)
    torch.manual_seed(123)  # reference: the same chunks, forwarded with grad in the same order
    q = torch.cat([ref(**{k: v[s : s + 3] for k, v in q_in.items()}) for s in (0, 3, 6, 9)])
    d = torch.cat([ref(**{k: v[s : s + 3] for k, v in d_in.items()}) for s in (0, 3, 6, 9)])
    info_nce(q, d).backward()
    after_ref = torch.rand(3)

    tower, plans, calls, after, mismatches = _budget_run(budget)
    assert (plans[0].kept, plans[1].kept) == kept and all(p.chunks == 4 for p in plans)
    assert calls == 8 + (8 - sum(kept))  # first pass of every chunk, then a replay of each chunk not kept
    assert len(mismatches) == 8 - sum(kept) and not any(mismatches)  # replays equal the first pass, bit for bit
    assert_close(grads(tower), grads(ref))
    assert torch.equal(after, after_ref)  # the replays did not disturb the RNG stream


class _Token:
    pass


class _Mark(torch.autograd.Function):
    """Identity whose graph node holds a fresh token: the token lives exactly as long as the chunk's graph."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, tokens: list) -> torch.Tensor:
        ctx.token = _Token()
        tokens.append(weakref.ref(ctx.token))
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


@pytest.mark.parametrize("budget,alive", [(0.0, 0), (0.5, 0), (1.5, 1), (2.0, 2), (5.0, 5), (float("inf"), 8)])
def test_memory_budget_bounds_the_graphs_held(budget: float, alive: int) -> None:
    """Between encode and backward exactly the budgeted graphs are alive (two calls of 4 chunks share the
    budget), without waiting for the cyclic GC: the measured first chunk's graph and saved activations
    are freed at once when it does not fit; nothing is left after backward."""
    tower, tokens, saved = Tower(), [], []
    # The first Linear's output is saved by the GELU: its storage lives exactly as long as the chunk's graph.
    tower.block[0].register_forward_hook(lambda m, i, o: saved.append(weakref.ref(o.untyped_storage())))

    def fn(**kw: torch.Tensor) -> torch.Tensor:
        return _Mark.apply(tower(**kw), tokens)

    probe = GradCache(chunk_size=4, memory_budget=float("inf"))
    probe.encode(fn, **batch(16, 0))
    f = probe.last_plan.chunk_bytes
    probe.reset()
    pygc.collect()
    tokens.clear(), saved.clear()
    pygc.disable()
    try:
        gc = GradCache(chunk_size=4, memory_budget=budget * f)
        q, p = gc.encode(fn, **batch(16, 0)), gc.encode(fn, **batch(16, 1))  # 4 chunks of 4 rows each
        assert sum(r() is not None for r in tokens) == alive
        assert sum(r() is not None for r in saved) == alive
        info_nce(q, p).backward()
        del q, p
        assert all(r() is None for r in tokens) and all(r() is None for r in saved)
    finally:
        pygc.enable()


def test_memory_budget_arguments() -> None:
    with pytest.raises(ValueError, match="not both"):
        GradCache(chunk_size=2, memory_budget=1 << 20, keep_graphs=2)
    with pytest.raises(ValueError, match="memory_budget >= 0"):
        GradCache(chunk_size=2, memory_budget=-1)
    with pytest.raises(ValueError, match="memory_budget >= 0"):
        GradCache(chunk_size=2, memory_budget=float("nan"))
    tower = Tower().requires_grad_(False)  # frozen: measured, nothing kept, plain embeddings
    gc = GradCache(chunk_size=3, memory_budget=float("inf"))
    e = gc.encode(tower, **batch(7, 0))
    assert not e.requires_grad and gc.last_plan.kept == 0 and gc._pending == []


class LazyDevice:
    """A fake accelerator whose generator exists only once something uses it, like CUDA's: a device-RNG
    provider for `RandState.devices` (see `vembed_blocks.gradcache.CudaRNG`), testable on CPU."""

    def __init__(self, seed: int = 77) -> None:
        self.seed, self.gen = seed, None

    def dropout(self, h: torch.Tensor, p: float = 0.5) -> torch.Tensor:
        if self.gen is None:  # lazy initialisation on first use, seeded like CUDA's (initial seed, offset 0)
            self.gen = torch.Generator().manual_seed(self.seed)
        keep = torch.rand(h.shape, generator=self.gen) >= p
        return h * keep / (1 - p)

    def initialized(self) -> bool:
        return self.gen is not None

    def get_states(self) -> list[torch.Tensor]:
        return [self.gen.get_state()]

    def set_states(self, states: list[torch.Tensor]) -> None:
        self.gen.set_state(states[0])

    def fresh_states(self) -> list[torch.Tensor]:
        return [torch.Generator().manual_seed(self.seed).get_state()]


def test_rand_state_covers_a_device_initialised_inside_the_block(monkeypatch) -> None:
    """A snapshot taken before the device exists still replays the block's draws (`complete`, or lazily)."""
    from vembed_blocks.gradcache import RandState

    for complete in (True, False):
        dev = LazyDevice()
        monkeypatch.setattr(RandState, "devices", (dev,))
        state = RandState()
        assert not dev.initialized()
        first = dev.dropout(torch.ones(64))  # initialises the device, then draws
        if complete:
            state.complete()
        after = dev.dropout(torch.ones(64))
        with state.replay():
            assert torch.equal(dev.dropout(torch.ones(64)), first)
        assert not torch.equal(after, first)
        assert torch.equal(dev.dropout(torch.ones(64)), LazyDevice().dropout(torch.ones(192))[128:])  # stream intact


def test_gradcache_replays_a_lazily_initialised_device(monkeypatch) -> None:
    """The first chunk initialises the device's generator: replays still draw the first pass's masks."""
    from vembed_blocks.gradcache import RandState

    def run(dev: LazyDevice, model: Tower, gc: GradCache | None) -> list[torch.Tensor]:
        seen: list[torch.Tensor] = []

        def fn(input_ids, attention_mask):
            out = dev.dropout(model(input_ids, attention_mask))
            seen.append(out.detach().clone())
            return out

        q_in, d_in = batch(7, 50), batch(7, 51)
        if gc is None:  # reference: the same chunks, forwarded with grad in the same order
            q = torch.cat([fn(**{k: v[s : s + 3] for k, v in q_in.items()}) for s in (0, 3, 6)])
            d = torch.cat([fn(**{k: v[s : s + 3] for k, v in d_in.items()}) for s in (0, 3, 6)])
        else:
            q, d = gc.encode(fn, **q_in), gc.encode(fn, **d_in)
        info_nce(q, d).backward()
        return seen

    ref = Tower()
    want = run(LazyDevice(), ref, None)
    tower, dev = Tower(), LazyDevice()
    monkeypatch.setattr(RandState, "devices", (dev,))
    seen = run(dev, tower, GradCache(chunk_size=3, keep_graphs=0))  # every chunk replayed, chunk 0 first
    assert len(seen) == 12
    assert all(torch.equal(a, b) for a, b in zip(seen[:6], want))  # first pass: the reference's masks
    for got, first in zip(seen[6:], seen[:6]):
        assert torch.equal(got, first)  # without the fresh state of the lazy device, chunk 0 would differ
    assert_close(grads(tower), grads(ref))


def test_activation_checkpointing() -> None:
    """torch.utils.checkpoint inside our tower, and HF BertModel with gradient checkpointing on."""
    from transformers import BertConfig, BertModel

    tower, plain = Tower(dim=16, ckpt=True), Tower(dim=16, ckpt=False)
    cfg = BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(3)
    bert = BertModel(cfg, add_pooling_layer=False).to(torch.float64)
    rbert = copy.deepcopy(bert)
    bert.activation_checkpointing_enable({"use_reentrant": False})
    bert.train()

    def bert_fn(input_ids, attention_mask, model=bert):
        h = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1)

    q_in, d_in = batch(8, 30), batch(8, 31)
    info_nce(plain(**q_in), bert_fn(**d_in, model=rbert)).backward()
    gc = GradCache(chunk_size=3)
    info_nce(gc.encode(tower, **q_in), gc.encode(bert_fn, **d_in)).backward()
    assert_close(grads(tower, bert), grads(plain, rbert))


def test_autocast_state_is_replayed() -> None:
    """Encode under CPU bf16 autocast: replays run under bf16 too and reproduce the first pass."""
    lin = nn.Linear(6, 4).float()
    x = torch.randn(6, 6, dtype=torch.float32)
    passes: list[torch.Tensor] = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        out = lin(x)
        passes.append(out.detach().clone())
        return out

    gc = GradCache(chunk_size=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        e = gc.encode(fn, x)
    assert e.dtype == torch.bfloat16
    e.float().square().sum().backward()  # backward outside autocast, as usual
    assert all(p.dtype == torch.bfloat16 for p in passes)
    assert torch.equal(passes[3], passes[0]) and torch.equal(passes[4], passes[1])
    ref = copy.deepcopy(lin)
    ref.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # reference: same chunks with grad
        want = torch.cat([ref(x[s : s + 2]) for s in (0, 2, 4)])
    want.float().square().sum().backward()
    # The reference sums the chunks' weight grads in bf16 (one cached cast), GradCache in fp32.
    for a, b in zip(lin.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=2e-2, atol=1e-2)


class HalfTower(nn.Module):
    """`Tower` plus a projection head, float32 weights: under CPU fp16 autocast its embeddings are float16."""

    def __init__(self) -> None:
        super().__init__()
        self.tower, self.head = Tower().float(), nn.Linear(12, 12).float()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.tower(input_ids, attention_mask))


def _fp16_step(model: nn.Module, scaler, gc: GradCache | None, hook=None) -> torch.Tensor:
    """One autocast-fp16 step, ``scaler.scale(loss).backward()``; GradCache or the same chunks with grad."""
    q_in, d_in = batch(7, 60), batch(7, 61)
    with torch.autocast("cpu", dtype=torch.float16):
        if gc is None:
            q = torch.cat([model(**{k: v[s : s + 3] for k, v in q_in.items()}) for s in (0, 3, 6)])
            p = torch.cat([model(**{k: v[s : s + 3] for k, v in d_in.items()}) for s in (0, 3, 6)])
        else:
            q, p = gc.encode(model, **q_in), gc.encode(model, **d_in)
    assert q.dtype == torch.float16
    if hook is not None:
        q.register_hook(hook)
    loss = info_nce(q.float(), p.float())
    (loss if scaler is None else scaler.scale(loss)).backward()
    return loss


def test_grad_scaler_scales_the_cached_gradients() -> None:
    """fp16 + torch.amp.GradScaler on CPU: gradients carry the scale (cached gradients included), the step
    unscales them exactly, and equal a reference forwarding the same chunks with grad."""
    scale = 2.0**12
    model, ref, plain = HalfTower(), HalfTower(), HalfTower()
    _fp16_step(plain, None, GradCache(chunk_size=3))  # unscaled
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    _fp16_step(model, scaler, GradCache(chunk_size=3))
    _fp16_step(ref, torch.amp.GradScaler("cpu", init_scale=scale), None)
    for g, r, u in zip(grads(model), grads(ref), grads(plain)):
        tol = 1e-2 * float(r.abs().max())  # fp16 activations; the reference sums chunk grads in fp16 first
        torch.testing.assert_close(g, r, rtol=0, atol=tol)
        torch.testing.assert_close(g / scale, u, rtol=1e-3, atol=1e-3 * float(u.abs().max()))
    before = [p.detach().clone() for p in model.parameters()]
    scaled = grads(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler.step(opt)
    scaler.update()
    for p, b, g in zip(model.parameters(), before, scaled):
        torch.testing.assert_close(p.detach(), b - 0.1 * (g / scale), rtol=0, atol=1e-7)
    assert scaler.get_scale() == scale  # a finite step keeps the scale


@pytest.mark.parametrize(
    "inject,row,value", [("overflow", None, None), ("nan_in_replayed_chunk", 1, "nan"), ("inf_in_kept_chunk", 4, "inf")]
)
def test_grad_scaler_skips_non_finite_steps(inject: str, row: int | None, value: str | None) -> None:
    """An inf/NaN in the cached gradient reaches the parameter gradients, so GradScaler skips the step.

    "overflow" is the real fp16 failure: with scale 2**40 the gradient of the float16 embeddings overflows
    to inf. The injected ones put a NaN/inf into one row of a replayed chunk (rows 0-2) or of the kept chunk
    (rows 3-5: the last of the largest keeps its graph)."""
    model = HalfTower()
    before = [p.detach().clone() for p in model.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40 if inject == "overflow" else 2.0**10)
    hook = None if row is None else (lambda g: g.index_fill(0, torch.tensor([row]), float(value)))
    _fp16_step(model, scaler, GradCache(chunk_size=3), hook)
    assert not all(bool(p.grad.isfinite().all()) for p in model.parameters())  # it reached the parameters
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))  # step skipped
    assert scaler.get_scale() == (2.0**39 if inject == "overflow" else 2.0**9)  # and the scale backed off


def test_frozen_tower_returns_plain_embeddings() -> None:
    tower = Tower().requires_grad_(False)
    e = GradCache(chunk_size=3).encode(tower, **batch(7, 0))
    assert not e.requires_grad and e.shape == (7, 12)


def test_clear_errors() -> None:
    tower = Tower()
    q_in, d_in = batch(6, 0), batch(6, 1)
    gc = GradCache(chunk_size=4)
    q, _unused = gc.encode(tower, **q_in), gc.encode(tower, **d_in)
    with pytest.raises(RuntimeError, match="received no gradient"):
        info_nce(q, q.detach() + 0).backward()  # p unused

    with torch.no_grad(), pytest.raises(RuntimeError, match="no_grad"):
        gc.encode(tower, **q_in)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="training mode"):
        gc.encode(tower, **q_in)
    tower.eval()
    with torch.no_grad():  # evaluation: a plain chunked forward
        torch.testing.assert_close(gc.encode(tower, **q_in), tower(**q_in))
    tower.train()

    with pytest.raises(ValueError, match="chunk 1 output has shape"):
        gc.encode(lambda input_ids, attention_mask: tower(input_ids, attention_mask)[:, : len(input_ids)], **q_in)
    with pytest.raises(ValueError, match="inconsistent batch sizes"):
        gc.encode(tower, input_ids=q_in["input_ids"], attention_mask=q_in["attention_mask"][:5])
    with pytest.raises(ValueError, match="chunk_size"):
        GradCache()
    with pytest.raises(ValueError, match="attention_mask"):
        GradCache(max_tokens=4).encode(lambda x: x, torch.ones(3, 2))


def test_nothing_kept_after_backward() -> None:
    """Chunk inputs, activations and cached gradients are released once backward returns."""
    tower = Tower()
    acts: list[weakref.ref] = []
    hook = tower.block.register_forward_hook(lambda m, i, o: acts.append(weakref.ref(o)))
    q_in = batch(8, 0)
    ids, mask = q_in["input_ids"].clone(), q_in["attention_mask"].clone()
    inputs = [weakref.ref(ids), weakref.ref(mask)]
    gc = GradCache(chunk_size=3)
    q = gc.encode(tower, input_ids=ids, attention_mask=mask)
    p = gc.encode(tower, **batch(8, 1))
    del ids, mask
    loss = info_nce(q, p)
    loss.backward()
    del q, p  # the loss graph (and its nodes) may stay alive: it must not hold chunk data
    pygc.collect()
    hook.remove()
    assert acts and all(r() is None for r in acts)
    assert all(r() is None for r in inputs)
    assert gc._pending == []


# ---------------------------------------------------------------------------- distributed


def _gathered_info_nce(q: torch.Tensor, p: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """This rank's rows against every rank's positives (gathered with grad), mean over local rows."""
    from vembed_blocks.distributed import gather_with_offset

    q, p = F.normalize(q, dim=-1), F.normalize(p, dim=-1)
    all_p, offset = gather_with_offset(p)
    return F.cross_entropy(q @ all_p.T / temperature, torch.arange(len(q)) + offset)


def _counting_allreduce(counter: list[int], bucket):
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    counter[0] += 1
    return default_hooks.allreduce_hook(None, bucket)


def _max_err(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    return max(float(((a - b).abs() / (b.abs() + 1e-8)).max()) for a, b in zip(got, want))


def _dist_body(rank: int, world: int) -> dict:
    """One launch: DDP (all-reduce count + gradients) and FSDP2 (gradients), vs one process on the full batch."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_default_dtype(torch.float64)
    q_all, d_all = batch(6 * world, 40), batch(6 * world, 41)

    def local(b: dict) -> dict:
        return {k: v[rank * 6 : (rank + 1) * 6] for k, v in b.items()}

    ref = Tower()
    info_nce(ref(**q_all), ref(**d_all)).backward()
    want, out = grads(ref), {}

    model = Tower()
    ddp, counter = DDP(model), [0]
    ddp.register_comm_hook(counter, _counting_allreduce)
    _gathered_info_nce(ddp(**local(q_all)), ddp(**local(d_all))).backward()  # plain DDP step
    out["plain"] = (counter[0], _max_err(grads(model), want))
    kept: dict[str, list[int]] = {}  # graphs kept by the query and the doc encode call of each run
    probe = GradCache(chunk_size=2, memory_budget=float("inf"))
    probe.encode(ddp, **local(q_all))  # first chunk's footprint (forwards under no_sync, no backward)
    f = probe.last_plan.chunk_bytes
    probe.reset()
    runs = [("c2", 2, False, None), ("c4", 4, False, None), ("c100", 100, False, None), ("closure", 4, True, None)]
    runs += [("budget0", 2, False, 0), ("budget2", 2, False, 2 * f), ("budget_all", 2, True, float("inf"))]
    for name, chunk, explicit, budget in runs:
        model.zero_grad()
        counter[0] = 0
        gc = GradCache(chunk_size=chunk, sync_module=ddp if explicit else None, memory_budget=budget)
        fn = (lambda **kw: ddp(**kw)) if explicit else ddp
        q = gc.encode(fn, **local(q_all))
        kept[name] = [gc.last_plan.kept]
        p = gc.encode(fn, **local(d_all))
        kept[name].append(gc.last_plan.kept)
        _gathered_info_nce(q, p).backward()
        out[name] = (counter[0], _max_err(grads(model), want))

    # Separate query and doc towers, each its own DDP module: each all-reduces exactly once.
    qt, dt = Tower(seed=1), Tower(seed=2)
    rq, rd = copy.deepcopy(qt), copy.deepcopy(dt)
    info_nce(rq(**q_all), rd(**d_all)).backward()
    q_ddp, d_ddp, q_count, d_count = DDP(qt), DDP(dt), [0], [0]
    q_ddp.register_comm_hook(q_count, _counting_allreduce)
    d_ddp.register_comm_hook(d_count, _counting_allreduce)
    gc = GradCache(chunk_size=4)
    _gathered_info_nce(gc.encode(q_ddp, **local(q_all)), gc.encode(d_ddp, **local(d_all))).backward()
    out["two_ddp"] = (q_count[0] * d_count[0], _max_err(grads(qt, dt), grads(rq, rd)))

    mesh = init_device_mesh("cpu", (world,))
    fsdp_runs = [("fsdp_c2", 2, False, None), ("fsdp_each", 2, True, None), ("fsdp_c100", 100, False, None)]
    fsdp_runs += [("fsdp_budget2", 2, False, 2 * f), ("fsdp_budget_all", 2, False, float("inf"))]
    fsdp_runs += [("fsdp_each_budget2", 2, True, 2 * f)]
    for name, chunk, each, budget in fsdp_runs:
        m = Tower()
        fully_shard(m.block, mesh=mesh)
        fully_shard(m, mesh=mesh)
        gc = GradCache(chunk_size=chunk, sync_each_chunk=each, memory_budget=budget)
        q = gc.encode(m, **local(q_all))
        kept[name] = [gc.last_plan.kept]
        p = gc.encode(m, **local(d_all))
        kept[name].append(gc.last_plan.kept)
        _gathered_info_nce(q, p).backward()
        out[name] = _max_err([p.grad.full_tensor() for p in m.parameters()], want)
    out["kept"] = kept
    return out


def test_ddp_and_fsdp2_two_ranks() -> None:
    """2 gloo ranks: gradients equal single-process full batch; DDP all-reduces exactly once per step,
    with keep_graphs and with memory budgets of 0, 2 chunks and all chunks (no replay but the DDP-synced one)."""
    for res in run_ranks(_dist_body, 2, timeout=180):
        kept = res.pop("kept")  # 3 chunks of 2 rows per call; a budget of 2 chunks goes to the query call
        assert kept["budget0"] == [0, 0] and kept["budget2"] == [2, 0] and kept["budget_all"] == [3, 3]
        assert kept["fsdp_budget2"] == kept["fsdp_each_budget2"] == [2, 0] and kept["fsdp_budget_all"] == [3, 3]
        plain_count, err = res.pop("plain")
        assert plain_count == 1 and err < 1e-5  # one bucket: one all-reduce per plain step
        for name, value in res.items():
            if name.startswith("fsdp"):
                assert value < 1e-5, (name, value)
            else:
                count, err = value
                assert count == 1 and err < 1e-5, (name, count, err)


def _ragged_fsdp2_body(rank: int, world: int) -> dict:
    """FSDP2 with 6 rows on rank 0 and 3 on rank 1 (a bad row dropped on one rank): chunks of 2 are 3 against 2,
    and every FSDP2 forward is a collective. The loss is the global mean (each rank: its rows' sum x world / N)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from vembed_blocks.distributed import gather_with_offset

    torch.set_default_dtype(torch.float64)
    rows = [6, 3]
    n, start = sum(rows), sum(rows[:rank])
    q_all, d_all = batch(n, 40), batch(n, 41)
    mine = lambda b: {k: v[start : start + rows[rank]] for k, v in b.items()}  # noqa: E731
    ref = Tower()
    info_nce(ref(**q_all), ref(**d_all)).backward()
    want, out, mesh = grads(ref), {}, init_device_mesh("cpu", (world,))
    for name, keep, each in (("keep1", 1, False), ("keep0", 0, False), ("each", 1, True)):
        m = Tower()
        fully_shard(m.block, mesh=mesh)
        fully_shard(m, mesh=mesh)
        gc = GradCache(chunk_size=2, keep_graphs=keep, sync_each_chunk=each)
        q, p = F.normalize(gc.encode(m, **mine(q_all)), dim=-1), F.normalize(gc.encode(m, **mine(d_all)), dim=-1)
        all_p, offset = gather_with_offset(p)
        loss = F.cross_entropy(q @ all_p.T / 0.1, torch.arange(len(q)) + offset, reduction="sum") * world / n
        loss.backward()
        out[name] = _max_err([p.grad.full_tensor() for p in m.parameters()], want)
    m.eval()
    with torch.no_grad():  # an evaluation forward through GradCache: the same number of forwards too
        got = gc.encode(m, **mine(q_all))
    out["eval"] = float((got - ref(**mine(q_all))).abs().max())
    return out


def test_fsdp2_ranks_with_fewer_rows_run_spare_chunks() -> None:
    """2 gloo ranks, ragged rows under FSDP2: no hang, and gradients equal one process on all 9 rows."""
    for res in run_ranks(_ragged_fsdp2_body, 2, timeout=180):
        assert all(v < 1e-8 for v in res.values()), res


# ---------------------------------------------------------------------------- CUDA only
# Skipped without a CUDA device: these carry no claim on a CPU-only run. The CPU tests above cover the
# same logic through a fake lazily-initialised device (LazyDevice) and CPU autocast/GradScaler.

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (no claim on CPU)")

_LAZY_CUDA = """
import sys, torch
sys.path.insert(0, "tests")
from vembed_blocks.gradcache import GradCache
torch.manual_seed(0)
w = torch.randn(6, 8, requires_grad=True)  # on CPU: nothing has touched CUDA yet
x = torch.randn(7, 6)
seen = []
def fn(x):
    out = torch.nn.functional.dropout((x @ w).cuda(), 0.5, training=True).cpu()  # dropout on the CUDA generator
    seen.append(out.detach().clone())
    return out
assert not torch.cuda.is_initialized()
gc = GradCache(chunk_size=3, keep_graphs=0)
gc.encode(fn, x).square().sum().backward()  # chunk 0 initialises CUDA; every chunk is replayed
assert all(torch.equal(a, b) for a, b in zip(seen[3:], seen[:3])), "replay drew other dropout masks"
got = w.grad.clone()
w.grad = None
torch.manual_seed(0)  # the same fresh CUDA stream: the same chunks with grad
torch.cat([fn(x[s : s + 3]) for s in (0, 3, 6)]).square().sum().backward()
torch.testing.assert_close(got, w.grad)
print("LAZY-CUDA-OK")
"""


@cuda_only
def test_cuda_rng_initialised_inside_the_first_chunk() -> None:
    """Fresh process, CUDA not initialised at encode: chunk 0's dropout on CUDA is replayed exactly."""
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = run_watched([sys.executable, "-c", _LAZY_CUDA], cwd=root, capture_output=True, text=True)
    assert out.returncode == 0 and "LAZY-CUDA-OK" in out.stdout, out.stderr[-3000:]


@cuda_only
def test_cuda_fp16_grad_scaler_and_memory_budget() -> None:
    """CUDA fp16 autocast + GradScaler: scaled gradients equal the reference; an overflow is skipped.
    memory_budget on CUDA: the footprint comes from torch.cuda.memory_allocated; all kept = no replay,
    and a budget of 0 peaks lower than keeping every graph."""
    dev = torch.device("cuda")

    def make() -> nn.Module:
        return nn.Sequential(nn.Linear(64, 512), nn.GELU(), nn.Dropout(0.1), nn.Linear(512, 32)).float().to(dev)

    x, y = torch.randn(64, 64, device=dev, dtype=torch.float32), torch.randn(64, 64, device=dev)

    def step(model, gc, scaler):
        with torch.autocast("cuda", dtype=torch.float16):
            if gc is None:
                q = torch.cat([model(x[s : s + 8]) for s in range(0, 64, 8)])
                p = torch.cat([model(y[s : s + 8]) for s in range(0, 64, 8)])
            else:
                q, p = gc.encode(model, x), gc.encode(model, y)
        scaler.scale(info_nce(q.float(), p.float())).backward()

    torch.manual_seed(0)
    model = make()
    ref = copy.deepcopy(model)
    torch.manual_seed(1)
    step(model, GradCache(chunk_size=8), torch.amp.GradScaler("cuda", init_scale=2.0**12))
    torch.manual_seed(1)
    step(ref, None, torch.amp.GradScaler("cuda", init_scale=2.0**12))
    for g, r in zip(grads(model), grads(ref)):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-2 * float(r.abs().max()))
    model.zero_grad()
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**40)
    before = [p.detach().clone() for p in model.parameters()]
    step(model, GradCache(chunk_size=8), scaler)
    scaler.step(torch.optim.SGD(model.parameters(), lr=0.1))
    scaler.update()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before)) and scaler.get_scale() == 2.0**39

    peaks, plans = {}, {}
    for budget in (0, float("inf")):
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        gc = GradCache(chunk_size=8, memory_budget=budget)
        step(model, gc, torch.amp.GradScaler("cuda", init_scale=1.0))
        peaks[budget], plans[budget] = torch.cuda.max_memory_allocated() - base, gc.last_plan
    assert plans[float("inf")].kept == 8 and plans[float("inf")].chunk_bytes > 0 and plans[0].kept == 0
    assert peaks[0] < peaks[float("inf")], peaks
