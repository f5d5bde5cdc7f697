"""A small two-sided head over frozen embeddings (`FusionHead`), saved and loaded as a folder.

It is trained on embedding stores (`vembed_blocks.data.embed_store`) of a frozen model; at use
time, embed with the frozen model as the extraction did, then ``head.query(q)`` / ``head.doc(d)``
and compare by cosine.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

__all__ = ["FusionHead", "pooled"]


class FusionHead(nn.Module):
    """Two MLPs into one space: ``query[B, Dq] -> [B, dim]`` and ``doc[B, Dd] -> [B, dim]``."""

    def __init__(self, query_dim: int, doc_dim: int, hidden: int, dim: int) -> None:
        super().__init__()
        self.config = {"query_dim": query_dim, "doc_dim": doc_dim, "hidden": hidden, "dim": dim}
        self.query = nn.Sequential(nn.Linear(query_dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.doc = nn.Sequential(nn.Linear(doc_dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, query: torch.Tensor, doc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.query(query), self.doc(doc)

    def save_pretrained(self, out: str) -> None:
        os.makedirs(out, exist_ok=True)
        weights = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(weights, os.path.join(out, "model.safetensors"))
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump({"architecture": "FusionHead", **self.config}, f, indent=1)

    @classmethod
    def from_pretrained(cls, path: str) -> "FusionHead":
        with open(os.path.join(path, "config.json")) as f:
            head = cls(**{k: v for k, v in json.load(f).items() if k != "architecture"})
        head.load_state_dict(load_file(os.path.join(path, "model.safetensors")))
        return head


def pooled(batch: dict, side: str) -> torch.Tensor:
    """``[B, D]`` of one side; per-token stores (``[B, L, D]`` + mask) are mean-pooled over real tokens."""
    x = batch[side].float()
    if side + "_mask" not in batch:
        return x
    mask = batch[side + "_mask"].unsqueeze(-1).float()
    return (x * mask).sum(1) / mask.sum(1).clamp(min=1)
