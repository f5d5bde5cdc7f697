"""Plain, loop-by-loop reference losses (float64) that the tests compare the library against.

Written for obviousness, not speed: one row (or pair, or token) at a time, straight from
each loss's definition. Shared by the single-process and the multi-process loss tests.
"""

from __future__ import annotations

import torch


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def cross_entropy_row(logits: list[torch.Tensor], target: int) -> torch.Tensor:
    z = torch.stack(logits)
    return torch.logsumexp(z, 0) - z[target]


def negatives_list(neg, neg_mask) -> list[torch.Tensor]:
    """Every real hard negative as a separate vector, in row-major order."""
    if neg is None:
        return []
    if neg.dim() == 2:
        return [neg[m] for m in range(neg.shape[0]) if neg_mask is None or neg_mask[m]]
    return [neg[i, k] for i in range(neg.shape[0]) for k in range(neg.shape[1]) if neg_mask is None or neg_mask[i, k]]


def same_label(labels, i, j) -> bool:
    """Rows i and j share a label; a label < 0 means the row has none."""
    return labels is not None and labels[i] >= 0 and labels[i] == labels[j]


def infonce(q, p, neg=None, neg_mask=None, labels=None, scale=20.0, symmetric=False):
    """Mean over rows of -log softmax(own positive) among kept positives + all real negatives."""
    q, p = unit(q), unit(p)
    negs = [unit(n) for n in negatives_list(neg, neg_mask)]

    def direction(a, b, extra):
        losses = []
        for i in range(a.shape[0]):
            kept = [j for j in range(b.shape[0]) if j == i or not same_label(labels, i, j)]
            cands = [b[j] for j in kept] + extra
            losses.append(cross_entropy_row([scale * (a[i] @ c) for c in cands], kept.index(i)))
        return torch.stack(losses).mean()

    loss = direction(q, p, negs)
    return (loss + direction(p, q, [])) / 2 if symmetric else loss


def siglip(a, b, t=10.0, bias=-10.0, labels=None, neg=None, neg_mask=None):
    """Sum over pairs (every row of a vs every b and every real hard negative) / B."""
    a, b = unit(a), unit(b)
    negs = [unit(n) for n in negatives_list(neg, neg_mask)]
    total = 0
    for i in range(a.shape[0]):
        for j in range(b.shape[0]):
            z = 1.0 if (i == j or same_label(labels, i, j)) else -1.0
            total = total - torch.log(torch.sigmoid(z * (t * (a[i] @ b[j]) + bias)))
        for n in negs:
            total = total - torch.log(torch.sigmoid(-(t * (a[i] @ n) + bias)))
    return total / a.shape[0]


def maxsim(q, qm, d, dm):
    """Average over real query tokens of the best dot product over real doc tokens."""
    best = []
    for s in range(q.shape[0]):
        if qm[s]:
            best.append(torch.stack([q[s] @ d[t] for t in range(d.shape[0]) if dm[t]]).max())
    return torch.stack(best).mean()


def colbert(q, qm, d, dm, neg=None, neg_mask=None, temperature=0.05):
    """q[B,Lq,D] d[B,Ld,D]; neg[B,K,Ln,D] with token mask [B,K,Ln] (all False = absent)."""
    q, d = unit(q), unit(d)
    cands = [(d[j], dm[j]) for j in range(d.shape[0])]
    if neg is not None:
        for i in range(neg.shape[0]):
            for k in range(neg.shape[1]):
                if neg_mask[i, k].any():
                    cands.append((unit(neg[i, k]), neg_mask[i, k]))
    losses = []
    for i in range(q.shape[0]):
        logits = [maxsim(q[i], qm[i], c, cm) / temperature for c, cm in cands]
        losses.append(cross_entropy_row(logits, i))
    return torch.stack(losses).mean()
