"""Collators: a list of ``Record``s -> model inputs, built by the model's own HF processor.

Every collator returns a plain dict (B records, K = most negatives of any record, M = the
number of real negatives, ``M = negatives_mask.sum()``)::

    {
      "query":    {model inputs for the B queries},
      "positive": {model inputs for the B positives},
      "negatives": {model inputs for the M real negatives, row-major by record},   # only if K > 0
      "negatives_mask": BoolTensor[B, K],   True = real negative                   # only if K > 0
      "labels": Tensor[B],                                                          # only if some record has a label
      "content_ids": {"query": LongTensor[B], "positive": LongTensor[B],
                      "negatives": LongTensor[M]},   # "negatives" only if K > 0, row-major like "negatives"
    }

Each inner dict goes straight into the model or ``GradCache.encode(fn, **batch["query"])``.
One side alone (evaluation, an API): ``collator.encode(items, is_query, sources=None)`` with the
same per-side dict; ``sources`` (e.g. ``"file:line"`` per item) only label error messages.
Negatives are encoded flat (no padding rows burn compute); ``scatter_negatives`` turns
their ``[M, D]`` embeddings into the ``[B, K, D]`` + mask that the losses take.
Content ids (`content_ids.content_id`): equal for items with equal text and image bytes, the same on
every rank and run, so a loss can drop a candidate equal to a row's own positive (a false negative);
``scatter_negative_ids`` lays the negatives' ids out as ``[B, K]`` (-1 where the mask is False).
Labels: str labels become `label_id(s)` (a hash: the same id on every rank and in every run),
ints/bools a LongTensor (ints must be >= 0). (The readers refuse float labels; a `Record` built in
code with float labels collates them as a FloatTensor, which must then be on every record of the
batch.) In a batch where some records have a str/int label and others none, the unlabelled ones get
-1, which the losses read as "no label" (a negative of everybody).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import unicodedata
from typing import Any, Callable, Sequence

import torch

from .images import load_images
from .records import Item, Record, RecordError

log = logging.getLogger(__name__)

__all__ = [
    "TextCollator",
    "DualEncoderCollator",
    "VLMCollator",
    "FixedNegatives",
    "WithScores",
    "scatter_negatives",
    "scatter_negative_ids",
    "label_id",
    "format_instruction",
    "EMPTY_CONTENT",
]

_NO_ROW_INSTRUCTIONS = (
    "this row has its own instruction (extra['instruction'], e.g. ms-swift's system turn), which only VLMCollator "
    "sends (a chat's system turn); drop it from the data or use a VLM recipe"
)
# What a chat carries for an item with neither text nor image, as the official Qwen3-VL-Embedding
# embedder sends (an empty user turn would pool on the template alone).
EMPTY_CONTENT = "NULL"


def scatter_negatives(embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``embeddings[M, ...]`` of the real negatives -> ``[B, K, ...]`` with zeros where ``mask`` is False.

    Differentiable (gradients flow back to ``embeddings``).
    """
    if int(mask.sum()) != embeddings.shape[0]:
        raise ValueError(f"mask marks {int(mask.sum())} real negatives but got {embeddings.shape[0]} embeddings")
    out = embeddings.new_zeros(*mask.shape, *embeddings.shape[1:])
    out[mask.to(embeddings.device)] = embeddings
    return out


def scatter_negative_ids(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``ids`` of the negatives -> ``LongTensor[B, K]``, -1 where ``mask[B, K]`` is False.

    ``ids``: ``[M]`` with ``M = mask.sum()`` (a plain collator: the real negatives, row-major), or
    ``[B * K]`` (`FixedNegatives`: every slot encoded, padding included, whose ids are dropped).
    """
    ids, mask = ids.reshape(-1), mask.to(device=ids.device, dtype=torch.bool)
    out = torch.full(mask.shape, -1, dtype=torch.long, device=ids.device)
    if ids.numel() == mask.numel():
        return torch.where(mask, ids.view(mask.shape).long(), out)
    if ids.numel() != int(mask.sum()):
        raise ValueError(
            f"mask marks {int(mask.sum())} real negatives of {mask.numel()} slots but got {ids.numel()} ids"
        )
    out[mask] = ids.long()
    return out


def label_id(label: str) -> int:
    """A string label's id in ``[0, 2**63)``: the first 8 bytes of its BLAKE2b hash.

    The same on every rank and in every run (Python's ``hash`` is salted per process), so
    labels gathered across ranks compare correctly; two different labels collide with
    probability about ``n**2 / 2**64`` for n distinct labels.
    """
    return int.from_bytes(hashlib.blake2b(label.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def _labels(records: Sequence[Record]) -> torch.Tensor | None:
    present = [r for r in records if r.label is not None]
    if not present:
        return None
    values = [r.label for r in present]
    if all(isinstance(v, str) for v in values):
        ids = {r.label: label_id(r.label) for r in present}
        return torch.tensor([ids.get(r.label, -1) for r in records], dtype=torch.long)
    if all(isinstance(v, (bool, int)) for v in values):
        for r in present:
            if r.label < 0:  # -1 is how a batch says "no label"
                raise RecordError(r.source, f"integer labels must be >= 0, got {r.label}")
        return torch.tensor([-1 if r.label is None else int(r.label) for r in records], dtype=torch.long)
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        for r in records:
            if r.label is None:  # a score cannot be "absent": a silently filled one would train on it
                raise RecordError(r.source, "record has no numeric label (score) but others in its batch do")
        return torch.tensor(values, dtype=torch.float)
    raise RecordError(records[0].source, f"labels in a batch must all be str, all int or all numbers: {values}")


def _content_ids(records: Sequence[Record]) -> dict[str, torch.Tensor]:
    """``{"query": [B], "positive": [B], "negatives": [M]}`` content ids ("negatives" only if any), in the
    order the sides are encoded: the items as given, before any instruction prefix."""
    # Imported here: a block loads at most 3 package modules at import (tests/test_footprint.py).
    from .content_ids import content_ids

    sources = [r.source for r in records]
    out = {
        "query": content_ids([r.query for r in records], sources),
        "positive": content_ids([r.positive for r in records], sources),
    }
    negs = [(n, r.source) for r in records for n in r.negatives]
    if negs:
        out["negatives"] = content_ids([n for n, _ in negs], [s for _, s in negs])
    return out


def _sources(items: Sequence[Item], sources: Sequence[str] | None) -> Sequence[str]:
    """Error-message labels of ``items``: the given ``sources``, or ``items[i]`` (their position in the call)."""
    if sources is None:
        return [f"items[{i}]" for i in range(len(items))]
    if len(sources) != len(items):
        raise ValueError(f"{len(items)} items but {len(sources)} sources")
    return sources


class _Collator:
    """Shared skeleton: encode query / positive / flat negatives side by side."""

    query_instruction: str | None = None
    doc_instruction: str | None = None

    def encode(
        self, items: Sequence[Item], is_query: bool, sources: Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Model inputs for one side: ``items`` as queries (``is_query``: the query instruction) or
        documents. ``sources``: one label per item for error messages (``"file:line"``; default
        ``items[i]``)."""
        raise NotImplementedError

    def __call__(self, records: Sequence[Record]) -> dict[str, Any]:
        if not records:
            raise ValueError("cannot collate an empty batch")
        sources = [r.source for r in records]
        own = [r.extra.get("instruction") for r in records]  # a row's own (e.g. ms-swift's system turn)
        by_row = {"instructions": own} if any(i is not None for i in own) else {}
        if by_row and not isinstance(self, VLMCollator):
            raise RecordError(sources[own.index(next(i for i in own if i is not None))], _NO_ROW_INSTRUCTIONS)
        out: dict[str, Any] = {
            "query": self.encode([r.query for r in records], True, sources, **by_row),
            "positive": self.encode([r.positive for r in records], False, sources),
        }
        k = max(len(r.negatives) for r in records)
        if k:
            negs = [(n, r.source) for r in records for n in r.negatives]
            out["negatives"] = self.encode([n for n, _ in negs], False, [s for _, s in negs])
            out["negatives_mask"] = torch.tensor([[j < len(r.negatives) for j in range(k)] for r in records])
        labels = _labels(records)
        if labels is not None:
            out["labels"] = labels
        out["content_ids"] = _content_ids(records)
        return out

    def _text(self, item: Item, is_query: bool) -> str | None:
        prefix = self.query_instruction if is_query else self.doc_instruction
        if item.text is None or not prefix:
            return item.text
        return prefix + item.text


class TextCollator(_Collator):
    """Text-only pairs (bi-encoders, ColBERT) through a tokenizer.

    ``query_instruction`` / ``doc_instruction`` are prefixed verbatim (include any separator,
    e.g. ``"query: "``). Each side: the tokenizer's tensors, ``input_ids[n, L]`` +
    ``attention_mask[n, L]`` (+ ``token_type_ids`` if it makes them), right-padded unless the
    tokenizer says otherwise.
    """

    def __init__(
        self,
        tokenizer: Any,
        max_length: int = 512,
        query_instruction: str | None = None,
        doc_instruction: str | None = None,
    ) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length
        self.query_instruction, self.doc_instruction = query_instruction, doc_instruction

    def encode(
        self, items: Sequence[Item], is_query: bool, sources: Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        for item, src in zip(items, _sources(items, sources)):
            if item.images or item.text is None:
                raise RecordError(src, "TextCollator needs text-only records (this one has images)")
        texts = [self._text(it, is_query) for it in items]
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return dict(enc)


class DualEncoderCollator(_Collator):
    """CLIP / SigLIP style: each side is text (``input_ids``, ``attention_mask``), one image
    per item (``pixel_values[n, 3, H, W]``), or both (M2I queries: fuse them yourself).

    ``padding``: ``True`` pads to the longest text; SigLIP was trained with
    ``padding="max_length"`` (and ``max_length=64``), use that for it. ``max_image_side``
    caps decoded images before the processor resizes them (saves decode-time memory).
    """

    def __init__(
        self,
        processor: Any,
        max_length: int = 77,
        padding: bool | str = True,
        max_image_side: int | None = None,
        query_instruction: str | None = None,
        doc_instruction: str | None = None,
    ) -> None:
        self.processor, self.max_length, self.padding, self.max_image_side = (
            processor,
            max_length,
            padding,
            max_image_side,
        )
        self.query_instruction, self.doc_instruction = query_instruction, doc_instruction

    def encode(
        self, items: Sequence[Item], is_query: bool, sources: Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        sources = _sources(items, sources)
        with_text = [it.text is not None for it in items]
        with_image = [bool(it.images) for it in items]
        out: dict[str, torch.Tensor] = {}
        for present, kind in ((with_text, "text"), (with_image, "an image")):
            if any(present) and not all(present):
                src = sources[present.index(False)]
                raise RecordError(src, f"this record has no {kind} where others in the batch do; one tower per side")
        if all(with_text):
            texts = [self._text(it, is_query) for it in items]
            enc = self.processor.tokenizer(
                texts, padding=self.padding, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            out.update(enc)
        if all(with_image):
            images = []
            for it, src in zip(items, sources):
                if len(it.images) != 1:
                    raise RecordError(src, f"a dual encoder takes one image per item, got {len(it.images)}")
                images += load_images(it.images, max_side=self.max_image_side, source=src)
            out["pixel_values"] = self.processor.image_processor(images, return_tensors="pt")["pixel_values"]
        return out


class VLMCollator(_Collator):
    """Qwen3-VL (and other chat VLMs): one chat per item, images as placeholders, left padded.

    Each item becomes ``[system: instruction] [user: <image>... text]`` rendered by the
    processor's chat template (``add_generation_prompt`` appends the assistant prefix, whose
    last token is then the pooled one), laid out as the official Qwen3-VL-Embedding embedder does
    (`_chat`: the instruction gets a final ``"."`` unless it ends in punctuation, an item with
    neither text nor image sends ``"NULL"``). The processor expands each image placeholder to
    ``prod(image_grid_thw) / merge_size**2`` tokens. Left padding puts every row's last real
    token at position -1 (``pool(..., "last")`` works for either side anyway). A record's own instruction
    (``Record.extra["instruction"]``: ms-swift's system turn) replaces the query instruction for its query.

    Each side: everything the processor returns: ``input_ids[n, L]``, ``attention_mask[n, L]``,
    ``mm_token_type_ids[n, L]`` and, when the side has images, flat ``pixel_values[patches, C*T*P*P]``
    + ``image_grid_thw[images, 3]`` (``GradCache.encode`` splits these by row).
    """

    def __init__(
        self,
        processor: Any,
        query_instruction: str = "Represent the user's input.",
        doc_instruction: str | None = None,
        max_image_side: int | None = None,
        add_generation_prompt: bool = True,
        message_fn: Callable[[Item, str | None], list[dict]] | None = None,
    ) -> None:
        self.processor, self.max_image_side, self.add_generation_prompt = (
            processor,
            max_image_side,
            add_generation_prompt,
        )
        self.query_instruction, self.doc_instruction = query_instruction, doc_instruction or query_instruction
        self.message_fn = message_fn or _chat

    def encode(
        self,
        items: Sequence[Item],
        is_query: bool,
        sources: Sequence[str] | None = None,
        instructions: Sequence[str | None] | None = None,
    ) -> dict[str, torch.Tensor]:
        """``instructions``: one per item, its own system prompt (None: the side's instruction)."""
        side = self.query_instruction if is_query else self.doc_instruction
        own = instructions or [None] * len(items)
        texts, images = [], []
        for it, src, instruction in zip(items, _sources(items, sources), own):
            messages = self.message_fn(it, side if instruction is None else instruction)
            texts.append(
                self.processor.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=self.add_generation_prompt
                )
            )
            images += load_images(it.images, max_side=self.max_image_side, source=src)
        enc = self.processor(text=texts, images=images or None, padding=True, padding_side="left", return_tensors="pt")
        return dict(enc)


def format_instruction(text: str | None) -> str | None:
    """A system instruction as the official Qwen3-VL-Embedding embedder sends it.

    Rule: strip surrounding whitespace; if the last character is not unicode punctuation (general
    category ``P*``: ``.`` ``?`` ``!`` ``。`` ``"`` ``)`` ... but not symbols such as ``$``), append ``"."``.
    ``None`` or a blank text -> ``None`` (no system turn; the official embedder would send its default
    ``"Represent the user's input."`` there, which is `VLMCollator`'s default instruction).
    """
    text = (text or "").strip()
    if not text:
        return None
    return text if unicodedata.category(text[-1]).startswith("P") else text + "."


def _chat(item: Item, instruction: str | None) -> list[dict]:
    """The default conversation, laid out as the official Qwen3-VL-Embedding embedder does:
    ``[system: format_instruction(instruction)]`` (left out when that is None), then a user turn with
    the item's images, then its text when non-empty; an item with neither gets `EMPTY_CONTENT` as text.
    The text is sent as is (not stripped), as there."""
    content: list[dict] = [{"type": "image"} for _ in item.images]
    if item.text:
        content.append({"type": "text", "text": item.text})
    if not content:
        content.append({"type": "text", "text": EMPTY_CONTENT})
    messages = [{"role": "user", "content": content}]
    system = format_instruction(instruction)
    if system:
        messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
    return messages


class FixedNegatives:
    """Every record with exactly ``k`` hard negatives: short rows padded with copies of their positive,
    masked out (``negatives_mask[B, k]``); longer rows cut to their first ``k``.

    Why: under FSDP2 every sharded forward is a collective, so every rank must encode the same
    number of negatives per step; a ragged count would hang. Padding costs forwards, never
    correctness (padded slots are masked in the loss). ``k = 0`` drops the data's negatives,
    with a warning once per process (a silently unused column is a surprise).

    ``content_ids["negatives"]`` is ``[B * k]``, aligned with the encoded slots: a padded slot has its
    positive's id (that is what it encodes); ``scatter_negative_ids`` turns it into -1 by the mask.
    """

    def __init__(self, collator: Callable[[Sequence[Record]], dict[str, Any]], k: int) -> None:
        if k < 0:
            raise ValueError(f"FixedNegatives: k must be >= 0, got {k}")
        self.collator, self.k, self.warned = collator, k, False

    def __call__(self, records: Sequence[Record]) -> dict[str, Any]:
        k = self.k
        if not k and not self.warned and any(r.negatives for r in records):
            self.warned = True
            log.warning("rows have hard negatives but --num-negatives is 0: they are not used (pass --num-negatives K)")
        batch = self.collator(
            [dataclasses.replace(r, negatives=(list(r.negatives[:k]) + [r.positive] * k)[:k]) for r in records]
        )
        if k:
            batch["negatives_mask"] = torch.tensor([[j < len(r.negatives) for j in range(k)] for r in records])
        return batch


class WithScores:
    """``collate(records)`` plus ``scores[B]`` (float) when every row has a numeric gold score ``extra["score"]``
    (CoSENT's pairs). Rows without one leave the batch as the collator made it."""

    def __init__(self, collate: Callable[[list[Record]], dict]) -> None:
        self.collate = collate

    def __call__(self, records: list[Record]) -> dict:
        batch = self.collate(records)
        scores = [r.extra.get("score") for r in records]
        if all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores):
            batch["scores"] = torch.tensor(scores, dtype=torch.float)
        return batch
