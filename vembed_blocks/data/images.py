"""Load images with Pillow: EXIF orientation, RGB, an optional longest-side cap, clear errors.

Errors name the record (``file:line``) and the image path, so a bad image in a 10M-row
file can be found and fixed. Truncated files are errors, never silently half-decoded:
``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is left at False on purpose.

Imports: Pillow only inside the functions that decode, so the blocks that merely name images
(records, shards, the encoder) do not pay for it at import.

An image need not be a file of its own: a `ShardImage` (a tar member, Parquet bytes, a
picture a streaming reader already decoded) goes through the same steps from memory.
"""

from __future__ import annotations

import io
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["ImageLoadError", "ShardImage", "load_image", "load_images"]


class ImageLoadError(ValueError):
    """An image that could not be read; the message names the record and the path."""

    def __init__(self, path: str, reason: str, source: str | None = None) -> None:
        where = f"{source}: " if source else ""
        super().__init__(f"{where}cannot load image {path}: {reason}")
        self.path, self.source = path, source


class ShardImage(str):
    """An image that is not a file of its own: a tar member, Parquet bytes, a decoded picture.

    The string is its label (``"/data/00003.tar:000123.jpg"``), what error messages show, so
    a ``ShardImage`` goes wherever an image path goes (``Item.images``). ``data`` holds the
    encoded bytes (``None`` when the label is a real path or only ``image`` is known);
    ``image`` is a decoded ``PIL.Image`` taken as upright (`load_image` then only converts it
    to RGB and caps its size), set once a reader has decoded and checked it.
    """

    data: bytes | None
    image: Any

    def __new__(cls, label: str, data: bytes | None = None, image: Any = None) -> "ShardImage":
        obj = super().__new__(cls, label)
        obj.data, obj.image = data, image
        return obj

    def __reduce__(self) -> tuple:
        # str's default pickling would keep the label and drop the bytes and the picture.
        return (ShardImage, (str(self), self.data, self.image))


def _to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as RGB; transparent pixels composited onto white (``img`` itself when already RGB)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        from PIL import Image

        # Composite transparency onto white: plain convert("RGB") keeps whatever colour the
        # transparent pixels happen to store (often black), which is not what anyone sees.
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img.convert("RGB")


def _decode(path: str, source: str | None) -> Image.Image:
    """Fully decode a file or a ``ShardImage``'s bytes into an upright RGB image."""
    from PIL import Image, ImageOps

    data = getattr(path, "data", None)
    if data is None and not os.path.isfile(path):
        raise ImageLoadError(path, "file not found", source)
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as img:
            img.load()  # force the full decode here, so truncation is caught here
            return _to_rgb(ImageOps.exif_transpose(img))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        # PIL reports unknown formats as UnidentifiedImageError (an OSError) and truncation as OSError.
        raise ImageLoadError(path, f"{type(e).__name__}: {e}", source) from e


def load_image(path: str, *, max_side: int | None = None, source: str | None = None) -> Image.Image:
    """Decode ``path`` fully and return an upright RGB image.

    ``path``: a file path or a `ShardImage` (its decoded ``image`` if set, else its ``data``
    bytes, else the file its label names). ``max_side``: if set, downscale (aspect kept,
    bicubic) so the longest side is at most this many pixels; images already smaller are
    untouched. ``source`` (``file:line`` of the record) goes into error messages.
    """
    decoded = getattr(path, "image", None)
    img = _to_rgb(decoded) if decoded is not None else _decode(path, source)
    if max_side is not None and max(img.size) > max_side:
        scale = max_side / max(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        from PIL import Image

        img = img.resize(size, Image.Resampling.BICUBIC)
    return img


def load_images(
    paths: tuple[str, ...] | list[str], *, max_side: int | None = None, source: str | None = None
) -> list[Image.Image]:
    """``load_image`` over several paths (a record side with many images)."""
    return [load_image(p, max_side=max_side, source=source) for p in paths]
