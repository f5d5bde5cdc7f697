"""Load images with Pillow: EXIF orientation, RGB, an optional longest-side cap, clear errors.

Errors name the record (``file:line``) and the image path, so a bad image in a 10M-row
file can be found and fixed. Truncated files are errors, never silently half-decoded:
``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is left at False on purpose.
"""

from __future__ import annotations

import os

from PIL import Image, ImageOps

__all__ = ["ImageLoadError", "load_image", "load_images"]


class ImageLoadError(ValueError):
    """An image that could not be read; the message names the record and the path."""

    def __init__(self, path: str, reason: str, source: str | None = None) -> None:
        where = f"{source}: " if source else ""
        super().__init__(f"{where}cannot load image {path}: {reason}")
        self.path, self.source = path, source


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        # Composite transparency onto white: plain convert("RGB") keeps whatever colour the
        # transparent pixels happen to store (often black), which is not what anyone sees.
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img.convert("RGB")


def load_image(path: str, *, max_side: int | None = None, source: str | None = None) -> Image.Image:
    """Decode ``path`` fully and return an upright RGB image.

    ``max_side``: if set, downscale (aspect kept, bicubic) so the longest side is at most
    this many pixels; images already smaller are untouched. ``source`` (``file:line`` of the
    record) goes into error messages.
    """
    if not os.path.isfile(path):
        raise ImageLoadError(path, "file not found", source)
    try:
        with Image.open(path) as img:
            img.load()  # force the full decode here, so truncation is caught here
            img = ImageOps.exif_transpose(img)
            img = _to_rgb(img)
    except ImageLoadError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        # PIL reports unknown formats as UnidentifiedImageError (an OSError) and truncation as OSError.
        raise ImageLoadError(path, f"{type(e).__name__}: {e}", source) from e
    if max_side is not None and max(img.size) > max_side:
        scale = max_side / max(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.BICUBIC)
    return img


def load_images(
    paths: tuple[str, ...] | list[str], *, max_side: int | None = None, source: str | None = None
) -> list[Image.Image]:
    """``load_image`` over several paths (a record side with many images)."""
    return [load_image(p, max_side=max_side, source=source) for p in paths]
