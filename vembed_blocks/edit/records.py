"""The seed-004 edit format as records: a forward edit and, where the row allows, its inverse.

An edit row::

    {"source_image": image | [image, ...] | null, "target_image": image,
     "instruction": text, "instruction_cn": text,          (missing -> "", as seed 004 says)
     "inverse_instruction": text, "inverse_instruction_cn": text}

`vembed_blocks.data.records` detects such a row (it has ``target_image``) and hands it to
`edit_records`, so ``read_records`` reads the edit format like any other while the format's
rules live here, in the edit wing. Options (``read_records`` passes them through):
``t2i_mode`` drops the source images, ``inverse`` (default True) adds the inverse record
(target + inverse instruction -> sources), ``language`` picks ``"en"`` or ``"cn"`` fields.

Imports: standard library only, plus `vembed_blocks.data.records` for ``Item`` / ``Record``
(already loaded whenever a row reaches this module); no diffusers, no Pillow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from ..data.records import Item, Record

if TYPE_CHECKING:
    from ..data.records import _Row

__all__ = ["LANGUAGES", "OPTIONS", "check_options", "edit_records"]

LANGUAGES = {"en": "", "cn": "_cn"}  # language -> suffix of its instruction fields
OPTIONS = ("t2i_mode", "inverse", "language")


def check_options(options: Mapping[str, Any]) -> None:
    """Refuse an unknown ``language`` up front, before any row is read."""
    language = options.get("language", "en")
    if language not in LANGUAGES:
        raise ValueError(f"language must be one of {sorted(LANGUAGES)}, got {language!r}")


def edit_records(row: _Row, *, t2i_mode: bool = False, inverse: bool = True, language: str = "en") -> list[Record]:
    """One edit row -> the forward record, plus the inverse record (target + inverse -> sources).

    ``row`` is the reader's validated row view (its errors name ``file:line``). The records'
    ``extra`` holds ``num_source_images`` (of the row, also in t2i mode) and ``inverse``.
    """
    suffix = LANGUAGES[language]
    target = row.images("target_image")
    if len(target) != 1:
        raise row.fail("missing field 'target_image' (expected one image path)")
    all_sources = row.images("source_image")
    sources = () if t2i_mode else all_sources
    nsrc = len(all_sources)
    # The seed treats a missing instruction as "" (an edit may be implied by its source images);
    # only a query with neither text nor images is refused, since it would embed nothing.
    text = row.text("instruction" + suffix, required=False) or ""
    if not text and not sources:
        why = " (t2i_mode drops them)" if all_sources else ""
        raise row.fail(f"no 'instruction{suffix}' and no source image{why}: the query would be empty")
    out = [
        Record(
            query=Item(text=text, images=sources),
            positive=Item(images=target),
            format="edit",
            extra={"num_source_images": nsrc, "inverse": False},
        )
    ]
    inv_text = row.text("inverse_instruction" + suffix, required=False)
    # No inverse row when there is nothing to invert to or no text for it (documented).
    if inverse and not t2i_mode and sources and inv_text:
        out.append(
            Record(
                query=Item(text=inv_text, images=target),
                positive=Item(images=sources),
                format="edit",
                extra={"num_source_images": nsrc, "inverse": True},
            )
        )
    return out
