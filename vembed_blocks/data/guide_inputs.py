"""A collate wrapper for a second, frozen model that reads the same rows with its own tokenizer or image
processor (a false-negative guide, `vembed_blocks.false_negatives`)::

    collate = WithGuideInputs(FixedNegatives(collator, k), FixedNegatives(guide_collator, k))
    batch = collate(records)      # + batch["guide"] = {"query", "positive", "negatives"?, "negatives_mask"?}

``batch["guide"]`` holds the guide collator's per-side inputs of the same records in the same order
(its ``negatives`` laid out as the main batch's when both collators are wrapped alike), so its
embeddings line up row for row with the trained model's. Imports: nothing of the package.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

__all__ = ["WithGuideInputs"]

SIDES = ("query", "positive", "negatives", "negatives_mask")


class WithGuideInputs:
    """``collate(records)`` plus ``["guide"]``: ``guide_collate(records)``'s ``query`` / ``positive`` /
    ``negatives`` inputs and ``negatives_mask`` (those it has). Picklable (loader workers) if both collates are."""

    def __init__(self, collate: Callable[[Sequence[Any]], dict], guide_collate: Callable[[Sequence[Any]], dict]):
        self.collate, self.guide_collate = collate, guide_collate

    def __call__(self, records: Sequence[Any]) -> dict:
        batch = self.collate(records)
        guide = self.guide_collate(records)
        batch["guide"] = {side: guide[side] for side in SIDES if side in guide}
        return batch
