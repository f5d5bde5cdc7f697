"""False-negative rules for the contrastive losses: which candidates of a row are not its negatives.

A false negative is a candidate that is really relevant to a row but scored as a negative:
a duplicate of the row's positive, a same-class row, an unlabelled positive among mined
negatives. `InfoNCE`, `SigLIP` and `ColBERT` take ``false_negatives=FalseNegatives(...)`` and
apply the same rules, by the same function (`rule_hits`), on every path: dense, tiled, ring,
gathered across ranks and under GradCache. Three rules, each optional:

- **duplicates** (on when a loss gets ``content_ids``): a candidate whose content id equals the
  content id of the row's own target (same text, same image bytes; see
  `data.collate.content_id`) is dropped; no labels needed, no row dropped;
- **margin** (``margin`` and/or ``ratio``): a candidate scoring above ``pos - margin`` or above
  ``ratio * pos``, where ``pos`` is the row's own positive's score (cosine, or MaxSim for
  ColBERT, before the temperature), is dropped, or with ``0 < weight < 1`` down-weighted:
  its ``exp(logit)`` counts ``weight`` times in the softmax (InfoNCE, ColBERT), its pair term
  ``weight`` times (SigLIP);
- **guide** (``guide_margin`` and/or ``guide_ratio``, with ``guide`` embeddings passed to the
  loss): GIST-style, a frozen guide model's cosine scores decide: a candidate the guide scores
  above ``g_pos - guide_margin`` (or ``guide_ratio * g_pos``) is dropped.

A row's own target is never touched, nor are columns already out (invalid, same-label). The
rules act on scores without gradient (they choose candidates; they are not differentiated).
After each call a loss holds ``masked``: per rule, how many (row, candidate) pairs of this
rank's rows the rule hit (a pair hit by two rules counts in both), as 0-d tensors (no sync;
sum them over ranks for the global count).

Carried as `Side` metadata (`_loss_utils`): rows get ``content`` (their target's id, -1 none),
``bound`` (score threshold, in the loss's scaled units), ``fn_logw`` (log of ``weight``),
``guide`` ``[r, G]`` and ``guide_bound``; columns get ``content`` and ``guide``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["FalseNegatives", "RULES"]

RULES = ("duplicates", "margin", "guide")


@dataclass(frozen=True)
class FalseNegatives:
    """Thresholds of the score rules (duplicates need only content ids; see the module docstring).

    ``margin``: drop a candidate scoring above ``pos - margin`` (cosine units);
    ``ratio``: ... above ``ratio * pos``; ``weight``: 0 drops what the margin rule hits, a value
    in (0, 1) down-weights it instead; ``guide_margin`` / ``guide_ratio``: the same two
    thresholds on the guide's scores (always dropped).
    """

    margin: float | None = None
    ratio: float | None = None
    weight: float = 0.0
    guide_margin: float | None = None
    guide_ratio: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.weight < 1.0:
            raise ValueError(f"FalseNegatives: weight must be in [0, 1) (0 = drop), got {self.weight}")
        for name in ("ratio", "guide_ratio"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"FalseNegatives: {name} must be > 0, got {value}")

    @property
    def scores(self) -> bool:
        """Whether the margin rule is on."""
        return self.margin is not None or self.ratio is not None

    @property
    def guided(self) -> bool:
        """Whether the guide rule is on (it then needs ``guide`` embeddings)."""
        return self.guide_margin is not None or self.guide_ratio is not None


def _acc(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def threshold(own: torch.Tensor, margin: float | None, ratio: float | None, scale=1.0) -> torch.Tensor:
    """``[r]`` score above which a candidate is suspect: ``min(own - scale * margin, ratio * own)``.

    ``own[r]``: each row's score of its own target, in the same (scaled) units as the scores it
    will be compared with; ``scale``: those units per cosine unit (``1 / temperature``).
    """
    own = own.detach()
    scale = scale.detach().to(own) if torch.is_tensor(scale) else scale  # a learnt scale: no host read
    bound = torch.full_like(own, math.inf)
    if margin is not None:
        bound = torch.minimum(bound, own - scale * margin)
    if ratio is not None:
        bound = torch.minimum(bound, ratio * own)
    return bound


def row_rules(
    rule: FalseNegatives | None,
    own_score: torch.Tensor,
    scale=1.0,
    content: torch.Tensor | None = None,
    guide: torch.Tensor | None = None,
    guide_target: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The rows' metadata for `rule_hits`: what each row needs to judge its candidates.

    ``own_score[r]``: each row's (scaled) score of its own target; ``content[r]``: its target's
    content id; ``guide[r, G]`` / ``guide_target[r, G]``: the guide's embeddings of the row and of
    its target (unit vectors, as `per_side` returns them).
    """
    meta: dict[str, torch.Tensor] = {}
    if content is not None:
        meta["content"] = content
    if rule is not None and rule.scores:
        own = own_score.to(_acc(own_score))
        meta["bound"] = threshold(own, rule.margin, rule.ratio, scale)
        logw = math.log(rule.weight) if rule.weight > 0 else -math.inf
        meta["fn_logw"] = torch.full_like(meta["bound"], logw)
    if rule is not None and rule.guided:
        if guide is None or guide_target is None:
            raise ValueError("FalseNegatives: guide_margin / guide_ratio need guide embeddings passed to the loss")
        own = (guide * guide_target).sum(-1)
        meta["guide"], meta["guide_bound"] = guide, threshold(own, rule.guide_margin, rule.guide_ratio)
    return meta


def has_rules(rows_meta: dict[str, torch.Tensor]) -> bool:
    """Whether `row_rules` put any rule's metadata on these rows (else no pair needs judging)."""
    return any(k in rows_meta for k in ("content", "bound", "guide"))


def rule_hits(
    rows_meta: dict[str, torch.Tensor], cols_meta: dict[str, torch.Tensor], z: torch.Tensor, eligible: torch.Tensor
) -> dict[str, torch.Tensor]:
    """``[r, c]`` hits of each active rule among the ``eligible`` pairs (candidates no other rule removed).

    ``z[r, c]``: the scores in the units of ``rows_meta["bound"]`` (before any masking).
    """
    hits: dict[str, torch.Tensor] = {}
    if "content" in rows_meta and "content" in cols_meta:
        col = cols_meta["content"][None, :]
        hits["duplicates"] = (rows_meta["content"][:, None] == col) & (col >= 0) & eligible
    if "bound" in rows_meta:
        hits["margin"] = (z.detach() > rows_meta["bound"][:, None].to(z.dtype)) & eligible
    if "guide" in rows_meta:
        g = rows_meta["guide"] @ cols_meta["guide"].to(rows_meta["guide"].dtype).T
        hits["guide"] = (g > rows_meta["guide_bound"][:, None]) & eligible
    return hits


def pair_filter(
    rows_meta: dict[str, torch.Tensor],
    cols_meta: dict[str, torch.Tensor],
    z: torch.Tensor,
    eligible: torch.Tensor,
    tally: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(drop[r, c], down[r, c])``: pairs the rules remove, and the log-weight to add to the
    pairs they down-weight (0 elsewhere); either is None when nothing applies. Adds each rule's
    hit count to ``tally``."""
    hits = rule_hits(rows_meta, cols_meta, z, eligible)
    if not hits:
        return None, None
    if tally is not None:
        for name, h in hits.items():
            count = h.sum()
            tally[name] = tally[name] + count if name in tally else count
    drop = None
    for name in ("duplicates", "guide"):
        if name in hits:
            drop = hits[name] if drop is None else drop | hits[name]
    down = None
    if "margin" in hits:  # log(weight), -inf when dropped: the same as a drop in a softmax or a weighted sum
        zero = torch.zeros((), dtype=z.dtype, device=z.device)
        down = torch.where(hits["margin"], rows_meta["fn_logw"][:, None].to(z.dtype), zero)
    return drop, down


def per_side(
    loss: str,
    key: str,
    given: dict | None,
    rows: int,
    negatives: tuple[int, ...] | None,
    need: tuple[str, ...],
    device: torch.device | None = None,
) -> list[torch.Tensor | None] | None:
    """``given[side]`` for ``query``, ``positive``, ``negatives``, checked, with the negatives flattened.

    ``given``: a dict (e.g. a collator's ``content_ids``) of ``query[B, ...]``, ``positive[B, ...]`` and
    ``negatives`` shaped like the loss's hard negatives without their feature axis (``[B, K, ...]`` or
    ``[M, ...]``; ``negatives``: that shape, None when the loss has none). Content ids have no feature
    axis, guide embeddings one (``key == "guide"``). ``need``: the sides that must be there; ``device``:
    where the loss computes (a collator's ids arrive on the CPU). Returns
    ``[query, positive, negatives[M, ...]]`` (None where absent), or None when ``given`` is None.
    """
    if given is None:
        return None
    unknown = set(given) - {"query", "positive", "negatives"}
    if unknown:
        raise ValueError(f"{loss}: {key} has unknown keys {sorted(unknown)} (query, positive, negatives)")
    trailing = int(key == "guide")
    if negatives is not None and key == "guide":
        need = (*need, "negatives")
    out = []
    for side, lead in (("query", (rows,)), ("positive", (rows,)), ("negatives", negatives)):
        x = given.get(side)
        if x is None:
            if side in need:
                raise ValueError(f"{loss}: {key} needs {side!r}")
            out.append(None)
        elif lead is None:
            raise ValueError(f"{loss}: {key} has 'negatives' but the loss got no negatives")
        elif x.dim() != len(lead) + trailing or tuple(x.shape[: len(lead)]) != tuple(lead):
            want = f"{list(lead)}" + (" + a feature axis" if trailing else "")
            raise ValueError(f"{loss}: {key}[{side!r}] must be {want}, got {tuple(x.shape)}")
        else:
            x = x.reshape(-1, *x.shape[len(lead) :]).to(device or x.device)
            # The guide's scores are cosines, computed without gradient in at least float32.
            out.append(torch.nn.functional.normalize(x.detach().to(_acc(x)), dim=-1) if trailing else x)
    return out
