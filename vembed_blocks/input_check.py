"""`InputCheck`: the first training steps' batches read once, so a run that cannot learn says why before it
trains (`metrics.check_embeddings` asks the same of an encoder's output). See docs/input_check.md.

Why: a tokenizer that does not cover the data (a demo's word-level tokenizer on real captions) maps most words
to its unknown token, every query embeds alike and the loss stays flat with nothing saying why. ::

    check = InputCheck(tokenizer=collator, batches=2, strict=True)  # a tokenizer, a processor or a collator
    for step, batches, streams in loader.steps(end):
        check.see(batches)  # every step on every rank; the verdict once ``batches`` steps were seen

Sides of a micro-batch (`_sides`): a dict with ``input_ids`` [B, L] (+ ``attention_mask``) is text,
``pixel_values`` images ([B, C, H, W], or Qwen-VL's flat patches [N, C*T*P*P] split by ``image_grid_thw``
[n, 3]), a float [B, D] tensor (or [B, L, D] with ``<side>_mask``) embeddings; nested dicts are walked
(``student/query``); a list of row dicts (edit rows) gives a side per key; ``negatives_mask`` keeps real rows.
The verdict: one int64 tensor of per-side counts (names included, so ranks that saw different sides agree)
summed by one ``all_reduce``; every rank reads the same findings from the sum and either every rank raises
the same `InputCheckError` or rank 0 logs warnings.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
import torch.distributed as dist

from .metrics import SAME_VECTOR_TOLERANCE, embedding_spread, mean_token_vectors
from .user_errors import UserError

__all__ = ["InputCheck", "InputCheckError"]

log = logging.getLogger(__name__)

UNKNOWN_WARN = 0.05  # share of content tokens that are the unknown token: warn above this ...
UNKNOWN_ERROR = 0.5  # ... and stop above this
EMPTY_ERROR = 0.5  # share of text rows without a real token: any warns, above this stops
FLAT_TOLERANCE = 1e-6  # an image is one colour when each channel's max - min (normalised values) is at most this
# Counted per side; the order is the layout of the tensor summed over ranks.
FIELDS = ("rows", "text_rows", "empty_rows", "tokens", "unknown_tokens", "duplicate_rows", "images",
          "one_colour_images", "embedding_rows", "multi_row_batches", "identical_batches")  # fmt: skip
_SLOTS, _NAME_BYTES = 32, 48  # sides per check, bytes of a side's name carried in the summed tensor
_IGNORED = {"labels", "scores"}


class InputCheckError(UserError):
    """The first steps' inputs cannot train the model (``findings``: one line each, errors first)."""

    def __init__(self, findings: list[str]) -> None:
        super().__init__("the input check stopped the run:\n" + "\n".join(f"  - {f}" for f in findings))
        self.findings = findings


@dataclass(frozen=True)
class _Vocab:
    """What the check needs of a tokenizer: the unknown token (None: it has none) and the other special ids."""

    unk_id: int | None
    unk_token: str | None
    pad_id: int | None
    special: torch.Tensor  # [S] special ids, the unknown token's excluded


def _vocab(obj: Any) -> _Vocab | None:
    """The `_Vocab` of a tokenizer, of a processor's ``.tokenizer`` or of a collator's tokenizer / processor
    (through wrappers holding the collator: ``FixedNegatives.collator``, ``WithScores.collate``)."""
    for _ in range(4):  # a wrapper -> its collator -> its processor -> its tokenizer
        if obj is None or hasattr(obj, "all_special_ids"):
            break
        inner = (getattr(obj, a, None) for a in ("tokenizer", "processor", "collator", "collate"))
        obj = next((x for x in inner if x is not None), None)
    if obj is None or not hasattr(obj, "all_special_ids"):
        return None
    unk = getattr(obj, "unk_token_id", None)
    named = {getattr(obj, f"{n}_token_id", None) for n in ("bos", "eos", "pad", "sep", "cls", "mask")}
    if unk in named:  # a byte-level BPE tokenizer naming its end-of-text "unknown" never emits it for a text
        unk = None
    special = sorted(set(obj.all_special_ids) - {unk})
    unk_token = str(obj.unk_token) if unk is not None else None
    return _Vocab(unk, unk_token, getattr(obj, "pad_token_id", None), torch.tensor(special, dtype=torch.long))


@dataclass
class _Side:
    """One side of a micro-batch, its rows selected: text ``ids``/``mask`` [n, L], ``images`` (each [C, P]),
    embeddings ``emb`` [n, D]. ``rows``: how many rows the identity checks compare (0: none)."""

    name: str
    rows: int
    ids: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    images: list[torch.Tensor] | None = None
    emb: torch.Tensor | None = None


def _is_float(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()


def _images(side: Mapping[str, Any]) -> list[torch.Tensor] | None:
    """``pixel_values`` as one ``[C, P]`` tensor per image (Qwen-VL patches: channel-major, C = 3)."""
    pv, grid = side.get("pixel_values"), side.get("image_grid_thw")
    if not _is_float(pv):
        return None
    if pv.dim() == 2 and isinstance(grid, torch.Tensor):
        sizes = grid.prod(-1).tolist()
        if sum(sizes) != len(pv):
            return None
        c = 3 if pv.shape[1] % 3 == 0 else 1
        return [p.reshape(len(p), c, -1).transpose(0, 1).reshape(c, -1) for p in pv.split(sizes)]
    return [p.reshape(p.shape[0], -1) for p in pv] if pv.dim() >= 4 else None


def _dict_side(name: str, side: Mapping[str, Any], row_mask: Any) -> _Side:
    """A text / image side; ``row_mask`` (``negatives_mask`` [B, K]) keeps only the real rows."""
    ids, mask, images = side.get("input_ids"), side.get("attention_mask"), _images(side)
    ids = ids if isinstance(ids, torch.Tensor) and ids.dim() == 2 else None
    n = len(ids) if ids is not None else len(images or [])
    keep = row_mask.flatten().bool() if isinstance(row_mask, torch.Tensor) and row_mask.numel() == n else None
    if keep is not None:
        ids, mask = (ids[keep] if ids is not None else None), (mask[keep] if mask is not None else None)
        images = [x for x, k in zip(images, keep.tolist()) if k] if images and len(images) == n else images
        n = int(keep.sum())
    return _Side(name, n, ids, mask if ids is not None else None, images)


def _row_sides(rows: list[dict], prefix: str) -> Iterator[_Side]:
    """Sides of a micro-batch of row dicts: a [C, H, W] tensor a row is an image side, a list of them images
    (no row identity: rows share sources legitimately), a [D] or [L, D] tensor a row embeddings (L mean-pooled)."""
    for key in rows[0]:
        name, values = f"{prefix}/{key}" if prefix else key, [r.get(key) for r in rows]
        if all(_is_float(v) and v.dim() == 3 for v in values):
            yield _Side(name, len(values), images=[v.reshape(v.shape[0], -1) for v in values])
        elif all(isinstance(v, (list, tuple)) and all(_is_float(x) and x.dim() == 3 for x in v) for v in values):
            images = [x.reshape(x.shape[0], -1) for v in values for x in v]
            if images:
                yield _Side(name, 0, images=images)
        elif all(_is_float(v) and v.dim() in (1, 2) for v in values) and len({v.shape[-1] for v in values}) == 1:
            pooled = [v.float() if v.dim() == 1 else v.float().mean(0) for v in values]
            yield _Side(name, len(values), emb=torch.stack(pooled))


def _sides(batch: Any, prefix: str = "") -> Iterator[_Side]:
    """Every side of a collated micro-batch (see the module docstring); what it does not know it skips."""
    if isinstance(batch, (list, tuple)) and batch and all(isinstance(r, dict) for r in batch):
        yield from _row_sides(list(batch), prefix)
        return
    if not isinstance(batch, Mapping):
        return
    if "input_ids" in batch or "pixel_values" in batch:  # the batch is one side itself
        yield _dict_side(prefix or "input", batch, None)
        return
    for key, value in batch.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if key in _IGNORED or str(key).endswith("_mask"):
            continue
        sibling = batch.get(f"{key}_mask")
        if isinstance(value, Mapping) and ("input_ids" in value or "pixel_values" in value):
            yield _dict_side(name, value, sibling)
        elif isinstance(value, Mapping) or (isinstance(value, list) and value and isinstance(value[0], dict)):
            yield from _sides(value, name)
        elif _is_float(value) and value.dim() in (2, 3):
            yield _Side(name, len(value), emb=value if value.dim() == 2 else mean_token_vectors(value, sibling))
        elif isinstance(value, (list, tuple)):  # e.g. a teacher's (query, document) embeddings
            embs = [(i, v) for i, v in enumerate(value) if _is_float(v) and v.dim() == 2]
            yield from (_Side(f"{name}[{i}]", len(v), emb=v) for i, v in embs)


def _template(rows: list[torch.Tensor], unk: int | None, same_is_template: bool) -> tuple[int, int]:
    """(prefix, suffix) lengths every row shares (an instruction, a chat template), together at most the shortest
    row, so each row keeps what differs. Neither ends next to the text on an unknown token: words a tokenizer does
    not know all read [UNK], so rows of unknown words share [UNK] runs that are text, not template. Rows all the
    same: all template if ``same_is_template`` (a chat around images, which differ), else (0, 0) (text)."""
    if len(rows) < 2:
        return 0, 0
    shortest, ends = min(len(r) for r in rows), []
    for flip in (False, True):
        cols = torch.stack([(r.flip(0) if flip else r)[:shortest] for r in rows])
        n = int((cols == cols[0]).all(0).int().cumprod(0).sum())
        while n and unk is not None and int(cols[0, n - 1]) == unk:
            n -= 1
        ends.append(n)
    if all(len(r) == shortest and torch.equal(r, rows[0]) for r in rows):
        return (shortest, 0) if same_is_template else (0, 0)
    return ends[0], min(ends[1], shortest - ends[0])


def _token_counts(rows: list[torch.Tensor], vocab: _Vocab | None, images: bool) -> tuple[int, int]:
    """(content tokens, unknown tokens among them) of a side's real-token rows (see the module docstring);
    ``images``: the side has images beside its texts."""
    if not rows:
        return 0, 0
    p, s = _template(rows, vocab.unk_id if vocab else None, images)
    content = torch.cat([r[p : len(r) - s] for r in rows])
    if vocab is None:
        return len(content), 0
    real = ~torch.isin(content, vocab.special)
    unknown = int((content == vocab.unk_id).sum()) if vocab.unk_id is not None else 0
    return int(real.sum()), unknown


def _pack(totals: Mapping[str, Mapping[str, int]]) -> torch.Tensor:
    """Per-side counts -> ``int64[_SLOTS, _NAME_BYTES + 2 + len(FIELDS)]``: name bytes, 1 (present), name hash,
    counts. A side's slot follows from its name's hash, so a sum over ranks adds a side's counts whichever
    ranks saw it, and name bytes / present give its name back."""
    out = torch.zeros(_SLOTS, _NAME_BYTES + 2 + len(FIELDS), dtype=torch.long)
    for name in sorted(totals):
        raw = name.encode()[:_NAME_BYTES]
        digest = int.from_bytes(hashlib.blake2b(raw, digest_size=5).digest(), "little")
        slot = digest % _SLOTS
        for _ in range(_SLOTS):  # a local collision takes the next free slot
            if not out[slot, _NAME_BYTES]:
                break
            slot = (slot + 1) % _SLOTS
        else:
            log.warning("input check: more than %d sides, %s is not counted", _SLOTS, name)
            continue
        out[slot, : len(raw)] = torch.tensor(list(raw), dtype=torch.long)
        out[slot, _NAME_BYTES : _NAME_BYTES + 2] = torch.tensor([1, digest])
        out[slot, _NAME_BYTES + 2 :] = torch.tensor([totals[name][f] for f in FIELDS])
    return out


def _unpack(packed: torch.Tensor) -> dict[str, dict[str, int]]:
    """`_pack`'s tensor (summed over ranks) -> per-side counts, by name."""
    totals = {}
    for slot, row in enumerate(packed.tolist()):
        present, digest = row[_NAME_BYTES], row[_NAME_BYTES + 1]
        if not present:
            continue
        raw = bytes(b // present for b in row[:_NAME_BYTES]).rstrip(b"\0")
        same = digest % present == 0 and all(b % present == 0 for b in row[:_NAME_BYTES])
        if same and int.from_bytes(hashlib.blake2b(raw, digest_size=5).digest(), "little") == digest // present:
            name = raw.decode(errors="replace")
        else:  # ranks put different sides in this slot (a hash collision met by probing on some ranks only)
            name = f"sides of slot {slot}"
        totals[name] = dict(zip(FIELDS, row[_NAME_BYTES + 2 :]))
    return dict(sorted(totals.items()))


def _side_findings(name: str, c: Mapping[str, int], steps: str, unk: str | None, stop: str) -> list[tuple[bool, str]]:
    """(is an error, message) of one side's summed counts ``c``; ``stop`` ends an error's message."""
    out = []
    if c["unknown_tokens"] and c["unknown_tokens"] / c["tokens"] > UNKNOWN_WARN:
        error = c["unknown_tokens"] / c["tokens"] > UNKNOWN_ERROR
        why = (f"the model's tokenizer does not cover this data (a demo or wrong --model?){stop}" if error
               else "the tokenizer covers this data only in part (is --model the one meant for it?)")  # fmt: skip
        share = f"{c['unknown_tokens'] / c['tokens']:.0%} of tokens ({c['unknown_tokens']} of {c['tokens']})"
        out.append((error, f"{name}: {share} are the tokenizer's unknown token ({unk}) in the {steps}: {why}"))
    if c["empty_rows"]:
        error = c["empty_rows"] / c["text_rows"] > EMPTY_ERROR
        rows = f"{c['empty_rows']} of {c['text_rows']} texts ({c['empty_rows'] / c['text_rows']:.0%})"
        why = "empty texts, or texts the tokenizer drops entirely; check the data's text fields"
        out.append((error, f"{name}: {rows} have no token but special ones in the {steps}: {why}{stop * error}"))
    if c["one_colour_images"]:
        error = c["one_colour_images"] == c["images"] >= 2
        imgs = f"{c['one_colour_images']} of {c['images']} images ({c['one_colour_images'] / c['images']:.0%})"
        why = "blank or broken image files, or an image processor that flattens them; check the images"
        out.append((error, f"{name}: {imgs} are one flat colour in the {steps}: {why}{stop * error}"))
    if c["multi_row_batches"] and c["identical_batches"] == c["multi_row_batches"]:
        what = "rows are one vector" if c["embedding_rows"] else "rows are identical"
        why = ("the stored embeddings are constant: check the model that extracted them" if c["embedding_rows"]
               else "the data repeats one item, or the collator drops what differs")  # fmt: skip
        batches = f"{c['multi_row_batches']} micro-batch{'es' * (c['multi_row_batches'] != 1)} of 2+ rows"
        out.append((False, f"{name}: in every micro-batch all {what} in the {steps} ({batches}): {why}"))
    return out


class InputCheck:
    """Read the first ``batches`` steps' micro-batches; then, once, find what would keep the model from learning.

    ``tokenizer``: None (no unknown-token check), a HF tokenizer, a processor with ``.tokenizer`` or a collator
    holding either. ``side_tokenizers``: the tokenizer of the sides under a top-level key whose texts another
    tokenizer made (``{"teacher": teacher_collator}``; None there: no token check, the default for
    "teacher"). ``strict=False`` logs the
    error-level findings as warnings instead of raising `InputCheckError`. ``findings`` holds the verdict's lines.
    """

    def __init__(
        self, tokenizer: Any = None, batches: int = 2, strict: bool = True, side_tokenizers: Mapping | None = None
    ) -> None:
        self.batches, self.strict, self.findings = batches, strict, []
        self._vocab = _vocab(tokenizer)
        # A side named "teacher" holds another model's token ids (a live distillation teacher): checked with
        # its own tokenizer when given, else not at all (read with this one, its ids would look unknown).
        self._side_vocabs = {"teacher": None, **{k: _vocab(t) for k, t in (side_tokenizers or {}).items()}}
        self._steps, self._done, self._totals = 0, False, None
        self._counts: dict[str, dict[str, int]] = {}
        self._texts: dict[str, list[torch.Tensor]] = {}  # per side: each row's real tokens (the template's input)

    def see(self, batches: Any) -> list[str] | None:
        """Count one step's micro-batches (a list of collated batches); on the ``batches``-th call return the
        findings (every rank the same), raising `InputCheckError` on every rank when strict and one is an
        error. Other calls return None; after the verdict it does nothing. A collective on that one call."""
        if self._done or self.batches <= 0:
            return None
        self._steps += 1
        for micro in batches if isinstance(batches, (list, tuple)) else [batches]:
            try:
                for side in _sides(micro):
                    self._add(side)
            except Exception as e:  # a layout this check misreads must not stop training (nor skip the verdict)
                log.warning("input check: could not read a batch (%s: %s); it is not counted", type(e).__name__, e)
        return self.verdict() if self._steps >= self.batches else None

    def verdict(self) -> list[str]:
        """The findings from every rank's counts so far (the collective `see` runs on its last counted step;
        call it yourself, on every rank, if a run ends sooner). Idempotent."""
        if self._done:
            return self.findings
        self._done = True
        packed = _pack(self._local_totals())
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            on_cpu = "gloo" in str(dist.get_backend()) or not torch.cuda.is_available()
            summed = packed.to("cpu" if on_cpu else torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(summed)  # every rank calls see() as often: every rank reaches this once
            packed = summed.cpu()
        self._totals = _unpack(packed)
        steps = f"first {self._steps} step{'s' * (self._steps != 1)}"
        stop = "; pass --ignore-input-check to train anyway" if self.strict else " (--ignore-input-check: training on)"
        unk = lambda name: getattr(self._vocab_for(name), "unk_token", None)
        found = [f for name, c in self._totals.items() for f in _side_findings(name, c, steps, unk(name), stop)]
        found.sort(key=lambda f: not f[0])  # errors first (a stable sort keeps the sides' order)
        self.findings = [message for _, message in found]
        if self.strict and any(error for error, _ in found):
            raise InputCheckError(self.findings)
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if rank == 0:
            for message in self.findings:
                log.warning(message)
            if not self.findings:
                log.info("input check: the %s look trainable (%s)", steps, ", ".join(self._totals) or "no sides")
        return self.findings

    def summary(self) -> dict[str, Any]:
        """``{"steps": n, "sides": {side: {FIELDS..., "unknown_share", "empty_share", "one_colour_share"}}}``:
        summed over ranks after the verdict, this rank's counts before."""
        totals = self._totals if self._totals is not None else self._local_totals()
        sides = {}
        for name, c in totals.items():
            shares = {"unknown_share": ("unknown_tokens", "tokens"), "empty_share": ("empty_rows", "text_rows"),
                      "one_colour_share": ("one_colour_images", "images")}  # fmt: skip
            sides[name] = {**c, **{k: c[a] / c[b] if c[b] else 0.0 for k, (a, b) in shares.items()}}
        return {"steps": self._steps, "sides": sides}

    def _vocab_for(self, name: str) -> _Vocab | None:
        top = name.split("/", 1)[0].split("[", 1)[0]
        return self._side_vocabs[top] if top in self._side_vocabs else self._vocab

    def _local_totals(self) -> dict[str, dict[str, int]]:
        """This rank's counts with the content-token counts of its text rows filled in."""
        totals = {name: dict(c) for name, c in self._counts.items()}
        for name, rows in self._texts.items():
            c = totals[name]
            c["tokens"], c["unknown_tokens"] = _token_counts(rows, self._vocab_for(name), c["images"] > 0)
        return totals

    def _add(self, side: _Side) -> None:
        """Count one micro-batch side."""
        c = self._counts.setdefault(side.name, dict.fromkeys(FIELDS, 0))
        c["rows"] += side.rows
        keys: list[list[bytes]] = [[] for _ in range(side.rows)]  # per row: what makes it that row
        same = True
        if side.ids is not None:
            same &= self._add_text(side, c, keys)
        if side.images is not None:
            c["images"] += len(side.images)
            c["one_colour_images"] += sum(_one_colour(x) for x in side.images)
            first = side.images[0] if side.images else None
            same &= all(x.shape == first.shape and torch.equal(x, first) for x in side.images)
            if len(side.images) == side.rows:  # one image a row: it is part of the row
                for key, x in zip(keys, side.images):
                    key.append(hashlib.blake2b(x.float().numpy().tobytes(), digest_size=16).digest())
        if side.emb is not None:
            c["embedding_rows"] += len(side.emb)
            same &= len(side.emb) >= 2 and embedding_spread(side.emb) < SAME_VECTOR_TOLERANCE
            for key, row in zip(keys, side.emb.float()):
                key.append(row.numpy().tobytes())
        if side.rows >= 2:
            c["multi_row_batches"] += 1
            c["identical_batches"] += int(same)
            seen = Counter(b"|".join(key) for key in keys)
            c["duplicate_rows"] += sum(n for n in seen.values() if n > 1)

    def _add_text(self, side: _Side, c: dict[str, int], keys: list[list[bytes]]) -> bool:
        """Count a text side's rows into ``c``, keep their real tokens, add each row's tokens to its key; return
        whether every row is the same."""
        vocab, ids = self._vocab_for(side.name), side.ids.long()
        mask = side.mask.bool() if side.mask is not None else None
        if mask is None:
            pad = vocab.pad_id if vocab is not None else None
            mask = ids != pad if pad is not None else torch.ones_like(ids, dtype=torch.bool)
        real = mask & ~torch.isin(ids, vocab.special) if vocab is not None else mask
        c["text_rows"] += len(ids)
        c["empty_rows"] += int((real.sum(1) == 0).sum())
        rows = [r[m] for r, m in zip(ids, mask)]
        self._texts.setdefault(side.name, []).extend(rows)
        for key, r in zip(keys, rows):
            key.append(r.numpy().tobytes())
        return all(len(r) == len(rows[0]) and torch.equal(r, rows[0]) for r in rows)


def _one_colour(image: torch.Tensor) -> bool:
    """``image[C, P]``: every channel holds one value (within `FLAT_TOLERANCE`)."""
    x = image.float()
    return bool((x.amax(1) - x.amin(1)).max() <= FLAT_TOLERANCE)
