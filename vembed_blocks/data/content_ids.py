"""Content ids: one int64 per `Item`, equal for items with equal content, so a loss can tell that a
candidate is the row's own positive (a false negative) without comparing embeddings.

``content_id(item)`` hashes the item's text exactly as given (no instruction prefix: the collator
adds the same one to every item of a side) and the *bytes* of its images, in order: the same image
under two file names, or as a file and as a tar member with the same bytes, is one id. Ids are in
``[0, 2**63)``, the same on every rank, in every process and in every run (BLAKE2b, never Python's
salted ``hash``), so ids gathered across ranks compare correctly.

Rules (each part is tagged and framed, so no two different items hash the same input bytes):

- text ``None`` (no text: an image-only item) and ``""`` (an empty text) are different items;
- a text ``X`` and an image whose bytes are ``X`` differ, and text + image differs from either alone;
- images are hashed in their order: ``(a, b)`` and ``(b, a)`` are different items (a VLM sees them so);
- an image is its encoded bytes: a `ShardImage`'s ``data``, else the file its path names; a picture
  known only decoded (a ``datasets`` Image) hashes its pixels (mode, size, raw bytes), so it matches
  another decoded copy of itself but not the file it came from.

Two different items share an id with probability about ``n**2 / 2**64`` for n distinct items compared
(a million distinct items: ~5e-8); an image digest is 128-bit, so two different images collide
with probability about ``n**2 / 2**129``. A file's digest is cached per process on
``(path, size, mtime_ns)`` (`_file_digest`, bounded), so a file is read once, not every batch,
and a rewritten file is read again.

Imports: nothing from the package at import (``ImageLoadError`` inside the error branch), so the
collators can load this module lazily within their import budget (tests/test_footprint.py).
"""

from __future__ import annotations

import functools
import hashlib
import os
import stat
from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:
    from .records import Item

__all__ = ["content_id", "content_ids"]

# Separates content ids from every other BLAKE2b use (label_id hashes bare label bytes).
_PERSON = b"vembed.content"
_CHUNK = 1 << 20  # bytes read at a time when hashing a file: bounded memory for any file size
_CACHE_FILES = 1 << 16  # file digests kept per process (~200 bytes each with their key: ~13 MB at most)


@functools.lru_cache(maxsize=_CACHE_FILES)
def _file_digest(path: str, size: int, mtime_ns: int) -> bytes:
    """The 16-byte BLAKE2b digest of the file at ``path``. ``size`` and ``mtime_ns`` are only part of
    the cache key, so a file rewritten in place is hashed again."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.digest()


def _image_part(image: str, source: str | None) -> bytes:
    """``b"b" + digest of the encoded bytes`` or ``b"p" + digest of the decoded pixels`` of one image
    (a path or a `ShardImage`); 17 bytes either way."""
    data = getattr(image, "data", None)
    if data is not None:
        return b"b" + hashlib.blake2b(data, digest_size=16).digest()
    try:
        st = os.stat(image)
    except OSError:
        st = None
    if st is not None and stat.S_ISREG(st.st_mode):
        # str(): a ShardImage as the cache key would keep its decoded picture alive in the cache.
        return b"b" + _file_digest(str(image), st.st_size, st.st_mtime_ns)
    picture = getattr(image, "image", None)
    if picture is not None:
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{picture.mode}:{picture.size[0]}x{picture.size[1]}:".encode())
        h.update(picture.tobytes())
        return b"p" + h.digest()
    from .images import ImageLoadError

    raise ImageLoadError(image, "file not found", source)


def content_id(item: Item, source: str | None = None) -> int:
    """``item``'s content id in ``[0, 2**63)`` (module docstring): BLAKE2b over its tagged text and images.

    ``source`` (``"file:line"``) names the record in the ``ImageLoadError`` of a missing image file.
    """
    h = hashlib.blake2b(digest_size=8, person=_PERSON)
    if item.text is not None:
        # surrogatepass: a lone surrogate from a JSON "\\ud800" escape is still a text with an id.
        text = item.text.encode("utf-8", "surrogatepass")
        h.update(b"t" + len(text).to_bytes(8, "little") + text)
    for image in item.images:
        h.update(_image_part(image, source))
    return int.from_bytes(h.digest(), "little") >> 1


def content_ids(items: Sequence[Item], sources: Sequence[str] | None = None) -> torch.Tensor:
    """``LongTensor[len(items)]`` of `content_id` per item; ``sources``: one error label per item."""
    labels = sources if sources is not None else [None] * len(items)
    return torch.tensor([content_id(it, src) for it, src in zip(items, labels)], dtype=torch.long)
