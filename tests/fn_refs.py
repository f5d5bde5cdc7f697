"""Plain, pair-by-pair references (float64) of the false-negative rules on InfoNCE, SigLIP and ColBERT.

Straight from the rules' definitions (`vembed_blocks.false_negatives`): for each row and each
candidate column that is not the row's target (and not out already: an absent negative, a
same-label positive), a rule hits when

- duplicates: the column's content id is >= 0 and equals the content id of the row's target;
- margin: score > min(own - margin, ratio * own) (cosine or MaxSim units, before the temperature);
- guide: the guide's cosine > min(g_own - guide_margin, guide_ratio * g_own).

Duplicate and guide hits are dropped; margin hits weigh ``weight`` (0 = dropped). Counts are per
rule, over all rows and both directions.
"""

from __future__ import annotations

import math

import torch
from loss_refs import unit


def col(vec, cid=-1, content=-1, guide=None, label=-1, tokens=None):
    """One candidate column: its vector (or token matrix), global id (-1: a hard negative), ..."""
    return {"vec": vec, "id": cid, "content": content, "guide": guide, "label": label, "tokens": tokens}


def columns(p, pid, gp, labels, negs=()):
    """The positives as columns 0..B-1, then the (already real-only) negatives ``(vec, content, guide)``."""
    out = [
        col(p[j], j, int(pid[j]) if pid is not None else -1, None if gp is None else gp[j], _lab(labels, j))
        for j in range(len(p))
    ]
    return out + [col(v, -1, c, g) for v, c, g in negs]


def _lab(labels, j):
    return -1 if labels is None else int(labels[j])


def _bound(own, margin, ratio):
    b = math.inf
    if margin is not None:
        b = min(b, own - margin)
    if ratio is not None:
        b = min(b, ratio * own)
    return b


def rule_weight(rule, i, c, row, score, own, counts):
    """Weight of candidate ``c`` for row ``i`` (1 keep, ``weight`` down, 0 drop); tallies hits in ``counts``.

    ``row``: dict with the row's ``content`` (its target's), ``guide`` and ``target_guide``.
    """
    w = 1.0
    if row.get("content") is not None and c["content"] >= 0 and c["content"] == row["content"]:
        counts["duplicates"] = counts.get("duplicates", 0) + 1
        w = 0.0
    if rule is not None and (rule.margin is not None or rule.ratio is not None):
        if float(score.detach()) > _bound(float(own.detach()), rule.margin, rule.ratio):
            counts["margin"] = counts.get("margin", 0) + 1
            w *= rule.weight
    if rule is not None and (rule.guide_margin is not None or rule.guide_ratio is not None):
        g, gt = unit(row["guide"]), unit(row["target_guide"])
        if float(g @ unit(c["guide"])) > _bound(float(g @ gt), rule.guide_margin, rule.guide_ratio):
            counts["guide"] = counts.get("guide", 0) + 1
            w = 0.0
    return w


def softmax_direction(rows, cols, score, scale, rule, counts):
    """Mean over rows of -log of the row's target among its weighted candidates.

    ``rows``: list of dicts with ``vec``, ``target`` (column index), ``label``, ``content``, ``guide``,
    ``target_guide``; ``score(row_vec, col)`` the unscaled score.
    """
    losses = []
    for i, r in enumerate(rows):
        own = score(r["vec"], cols[r["target"]])
        logits = []
        for j, c in enumerate(cols):
            s = score(r["vec"], c)
            if j == r["target"]:
                logits.append(scale * s)
                continue
            if c["id"] >= 0 and r["label"] >= 0 and c["label"] == r["label"]:
                continue  # a same-label positive: out before any rule
            w = rule_weight(rule, i, c, r, s, own, counts)
            if w > 0:
                logits.append(scale * s + math.log(w))
        z = torch.stack([torch.as_tensor(x) for x in logits])
        losses.append(torch.logsumexp(z, 0) - scale * own)
    return torch.stack(losses).mean()


def infonce_fn(
    q, p, negs=(), labels=None, scale=20.0, symmetric=False, rule=None, qid=None, pid=None, gq=None, gp=None
):
    """InfoNCE with the rules. ``negs``: real negatives as ``(vec, content id, guide vec)``."""
    q, p = unit(q), unit(p)
    negs = [(unit(v), c, g) for v, c, g in negs]
    counts: dict[str, int] = {}

    def dot(x, c):
        return x @ unit(c["vec"])

    def rows_of(a, target_content, ga, gt):
        return [
            {
                "vec": a[i],
                "target": i,
                "label": _lab(labels, i),
                "content": None if target_content is None else int(target_content[i]),
                "guide": None if ga is None else ga[i],
                "target_guide": None if gt is None else gt[i],
            }
            for i in range(len(a))
        ]

    loss = softmax_direction(rows_of(q, pid, gq, gp), columns(p, pid, gp, labels, negs), dot, scale, rule, counts)
    if symmetric:
        back = softmax_direction(rows_of(p, qid, gp, gq), columns(q, qid, gq, labels), dot, scale, rule, counts)
        loss = (loss + back) / 2
    return loss, counts


def siglip_fn(a, b, negs=(), labels=None, t=10.0, bias=-10.0, rule=None, bid=None, ga=None, gb=None):
    """SigLIP with the rules: a pair the rules drop adds nothing, a down-weighted one ``weight`` x its term."""
    a, b = unit(a), unit(b)
    cols = columns(b, bid, gb, labels, [(unit(v), c, g) for v, c, g in negs])
    counts: dict[str, int] = {}
    total = 0
    for i in range(len(a)):
        row = {
            "content": None if bid is None else int(bid[i]),
            "guide": None if ga is None else ga[i],
            "target_guide": None if gb is None else gb[i],
        }
        own = a[i] @ b[i]
        for j, c in enumerate(cols):
            s = a[i] @ c["vec"]
            positive = j == i or (c["id"] >= 0 and _lab(labels, i) >= 0 and c["label"] == _lab(labels, i))
            w = 1.0 if positive else rule_weight(rule, i, c, row, s, own, counts)
            sign = 1.0 if positive else -1.0
            total = total - w * torch.log(torch.sigmoid(sign * (t * s + bias)))
    return total / len(a), counts


def colbert_fn(q, qm, d, dm, negs=(), temperature=0.05, rule=None, pid=None, gq=None, gp=None):
    """ColBERT with the rules; ``negs``: real negatives as ``(tokens[Ln, D], token mask[Ln], content id, guide)``."""
    from loss_refs import maxsim

    q, d = unit(q), unit(d)
    cols = [col((d[j], dm[j]), j, -1 if pid is None else int(pid[j]), None if gp is None else gp[j])
            for j in range(len(d))]  # fmt: skip
    cols += [col((unit(v), m), -1, c, g) for v, m, c, g in negs]
    rows = [{"vec": (q[i], qm[i]), "target": i, "label": -1, "content": None if pid is None else int(pid[i]),
             "guide": None if gq is None else gq[i], "target_guide": None if gp is None else gp[i]}
            for i in range(len(q))]  # fmt: skip
    counts: dict[str, int] = {}

    def score(row, c):
        return maxsim(row[0], row[1], c["vec"][0], c["vec"][1])

    return softmax_direction(rows, cols, score, 1 / temperature, rule, counts), counts
