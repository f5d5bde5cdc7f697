"""gather_with_grad on real gloo ranks: values, ragged row counts, and the backward sum."""

import torch
from _multiproc import run_ranks

from vembed_blocks.distributed import average_gradients, gather_with_grad, gather_with_offset, get_rank, get_world_size


def _rows(rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(rank + 2, 3, generator=g, dtype=torch.float64)  # ragged: 2, 3, 4 rows


def _body(rank, world_size):
    x = _rows(rank).requires_grad_()
    full, offset = gather_with_offset(x)
    expected = torch.cat([_rows(r) for r in range(world_size)])
    assert torch.equal(full.detach(), expected)
    assert offset == sum(r + 2 for r in range(rank))
    # Loss on rank r: sum(full * w_r). d/dx_r of the summed-over-ranks loss = sum_r' w_r'[rows of r].
    w = torch.arange(full.numel(), dtype=torch.float64).reshape(full.shape) * (rank + 1)
    (full * w).sum().backward()
    base = torch.arange(full.numel(), dtype=torch.float64).reshape(full.shape)
    want = base * sum(r + 1 for r in range(world_size))
    assert torch.allclose(x.grad, want[offset : offset + x.shape[0]])
    # average_gradients: a 0-D and a 2-D parameter, grads rank+1 and 10*(rank+1); None skipped.
    a, b, c = (torch.nn.Parameter(torch.zeros(s, dtype=torch.float64)) for s in ((), (2, 2), (3,)))
    a.grad, b.grad = (
        torch.tensor(rank + 1.0, dtype=torch.float64),
        torch.full((2, 2), 10.0 * (rank + 1), dtype=torch.float64),
    )
    average_gradients([a, b, c])
    mean = sum(r + 1.0 for r in range(world_size)) / world_size
    assert a.grad.shape == () and a.grad.item() == mean and torch.all(b.grad == 10 * mean) and c.grad is None
    # A gradient on rank 0 only (e.g. a tower only its negatives went through) counts as zeros
    # elsewhere; tiny buckets (8 bytes) split the all-reduce per tensor, mixed dtypes too.
    d, e = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64)), torch.nn.Parameter(torch.zeros(2))
    d.grad = torch.full((3,), 6.0, dtype=torch.float64) if rank == 0 else None
    e.grad = torch.full((2,), float(rank))
    average_gradients([d, e], bucket_bytes=8)
    assert torch.all(d.grad == 6.0 / world_size) and torch.allclose(e.grad, torch.full((2,), (world_size - 1) / 2))
    return get_rank(), get_world_size()


def test_gather_with_grad_ragged_2_and_3_ranks():
    assert run_ranks(_body, 2) == [(0, 2), (1, 2)]
    assert run_ranks(_body, 3) == [(0, 3), (1, 3), (2, 3)]


def test_gather_is_identity_without_process_group():
    x = torch.randn(4, 2, requires_grad=True)
    assert gather_with_grad(x) is x
    assert get_rank() == 0 and get_world_size() == 1
