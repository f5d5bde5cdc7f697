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
    for name, chunk, explicit in [("c2", 2, False), ("c4", 4, False), ("c100", 100, False), ("closure", 4, True)]:
        model.zero_grad()
        counter[0] = 0
        gc = GradCache(chunk_size=chunk, sync_module=ddp if explicit else None)
        fn = (lambda **kw: ddp(**kw)) if explicit else ddp
        _gathered_info_nce(gc.encode(fn, **local(q_all)), gc.encode(fn, **local(d_all))).backward()
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
    for name, chunk, each in [("fsdp_c2", 2, False), ("fsdp_each", 2, True), ("fsdp_c100", 100, False)]:
        m = Tower()
        fully_shard(m.block, mesh=mesh)
        fully_shard(m, mesh=mesh)
        gc = GradCache(chunk_size=chunk, sync_each_chunk=each)
        _gathered_info_nce(gc.encode(m, **local(q_all)), gc.encode(m, **local(d_all))).backward()
        out[name] = _max_err([p.grad.full_tensor() for p in m.parameters()], want)
    return out


def test_ddp_and_fsdp2_two_ranks() -> None:
    """2 gloo ranks: gradients equal single-process full batch; DDP all-reduces exactly once per step."""
    for res in run_ranks(_dist_body, 2, timeout=180):
        plain_count, err = res.pop("plain")
        assert plain_count == 1 and err < 1e-5  # one bucket: one all-reduce per plain step
        for name, value in res.items():
            if name.startswith("fsdp"):
                assert value < 1e-5, (name, value)
            else:
                count, err = value
                assert count == 1 and err < 1e-5, (name, count, err)
