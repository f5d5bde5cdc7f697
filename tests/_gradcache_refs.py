"""Reference pieces shared by the GradCache tests (tests/test_gradcache.py, the VLMSplit tests in
tests/test_vlm.py): a small text tower, ragged token batches, a plain InfoNCE, gradient compare."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class Tower(nn.Module):
    """Token embedding -> MLP block (optionally checkpointed) -> masked mean pool: [B, L] -> [B, D]."""

    def __init__(self, vocab: int = 40, dim: int = 12, dropout: float = 0.0, ckpt: bool = False, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(vocab, dim)
        self.block = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim))
        self.drop, self.ckpt = nn.Dropout(dropout), ckpt

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.emb(input_ids))
        h = h + (checkpoint(self.block, h, use_reentrant=False) if self.ckpt else self.block(h))
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1)


def batch(n: int, seed: int, length: int = 7, vocab: int = 40) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    return {"input_ids": torch.randint(0, vocab, (n, length), generator=g) * mask, "attention_mask": mask}


def info_nce(q: torch.Tensor, p: torch.Tensor, temperature: torch.Tensor | float = 0.1) -> torch.Tensor:
    q, p = F.normalize(q, dim=-1), F.normalize(p, dim=-1)
    return F.cross_entropy(q @ p.T / temperature, torch.arange(len(q)))


def grads(*modules: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for m in modules for p in m.parameters()]


def assert_close(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-10)
