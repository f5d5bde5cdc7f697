"""Load images with Pillow: EXIF orientation, RGB, an optional longest-side cap, clear errors.

Errors name the record (``file:line``) and the image path, so a bad image in a 10M-row
file can be found and fixed. Truncated files are errors, never silently half-decoded:
``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is left at False on purpose.

Imports: Pillow (and numpy, for 16/32-bit pictures) only inside the functions that decode, so the
blocks that merely name images (records, shards, the encoder) do not pay for it at import.

An image need not be a file of its own: a `ShardImage` (a tar member, Parquet bytes, a
picture a streaming reader already decoded) goes through the same steps from memory.

Bit depth: 16- and 32-bit pictures (Pillow modes ``I;16``/``I;16B``/``I;16L``, ``I``, ``F``: 16-bit grey PNG and
TIFF, 32-bit TIFF) are scaled into 8 bits, never clipped; the rule is in `_to_rgb`.

Memory under a cap (``max_side``): a JPEG is decoded at 1/2, 1/4 or 1/8 scale (``Image.draft``) to no less than
twice the capped size, so its peak follows the cap, not the file. Pillow cannot decode a PNG (or most other
formats) smaller, so there the bound is one decoded copy: it is box-reduced and converted to RGB a band of rows at a
time, before the final bicubic resample, and never copied whole. 8-bit pictures that need no reduction (no cap, or
sides under 4x the capped ones) come out pixel for pixel as a plain decode, transpose, convert and bicubic resize.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
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


# Draft and box-reduce only down to twice the target before the bicubic resample (Pillow's own reducing_gap for
# thumbnails): the result is as sharp as one bicubic pass over the full picture, at a fraction of the memory.
_GAP = 2
# Pixels converted at once when a picture is reduced or converted band by band: 2 MP is 8 MB as RGB(X) and
# 16 MB as the float64 scratch of a 16/32-bit band, next to 432 MB for one decoded 108 MP RGB picture.
_BAND_PIXELS = 1 << 21
# EXIF orientation -> the transpose that shows the picture upright (the EXIF spec's table).
_UPRIGHT = {
    2: "FLIP_LEFT_RIGHT",
    3: "ROTATE_180",
    4: "FLIP_TOP_BOTTOM",
    5: "TRANSPOSE",
    6: "ROTATE_270",
    7: "TRANSVERSE",
    8: "ROTATE_90",
}


def _is_wide(mode: str) -> bool:
    """Whether Pillow ``mode`` holds more than 8 bits a pixel in one grey channel (16/32-bit integers, floats)."""
    return mode in ("I", "F") or mode.startswith("I;16")


def _bands(img: Image.Image, factor: int) -> Iterator[tuple[int, Image.Image]]:
    """``(top row, copy of the rows)`` over bands of ``img``: about ``_BAND_PIXELS`` each, ``factor`` rows a multiple
    (all but the last), so the bands of a ``reduce(factor)`` tile the whole picture's reduction exactly."""
    w, h = img.size
    rows = max(1, _BAND_PIXELS // (w * factor)) * factor
    for top in range(0, h, rows):
        yield top, img.crop((0, top, w, min(h, top + rows)))


def _wide_range(img: Image.Image) -> tuple[float, float]:
    """Smallest and largest finite value of a 16/32-bit picture (NaN and infinities left out; (0, 0) if none)."""
    if img.mode.startswith("I;16"):
        return 0, 0xFFFF  # their rule needs no range (and Pillow's getextrema refuses I;16B and I;16L)
    lo, hi = img.getextrema()
    if img.mode != "F" or (math.isfinite(lo) and math.isfinite(hi)):
        return lo, hi
    import numpy as np

    # getextrema answers NaN once one pixel is NaN: find the finite range band by band instead.
    lo, hi = math.inf, -math.inf
    for _, band in _bands(img, 1):
        a = np.asarray(band)
        a = a[np.isfinite(a)]
        if a.size:
            lo, hi = min(lo, float(a.min())), max(hi, float(a.max()))
    return (lo, hi) if lo <= hi else (0.0, 0.0)


def _wide_to_grey8(a: np.ndarray, mode: str, lo: float, hi: float) -> np.ndarray:
    """8-bit grey levels (uint8) for the values ``a`` of a 16/32-bit ``mode`` picture spanning ``[lo, hi]``.

    The rule `_to_rgb` documents; ``lo``/``hi`` are the whole picture's, so every band of it maps alike.
    """
    import numpy as np

    if mode.startswith("I;16") or (mode == "I" and lo >= 0 and hi <= 0xFFFF):
        # round(v / 257), exact in integers: 257 is odd, so no v lies halfway between two levels.
        return ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if mode == "I":
        base, span = (0.0, 2.0**31 - 1) if lo >= 0 else (-(2.0**31), 2.0**32 - 1)
    elif lo >= 0 and hi <= 1:
        base, span = 0.0, 1.0
    else:
        base, span = lo, (hi - lo) or 1.0  # a constant picture outside [0, 1] comes out black
    x = (a.astype(np.float64) - base) * (255 / span)
    np.nan_to_num(x, copy=False, nan=0.0)
    return np.rint(np.clip(x, 0, 255, out=x), out=x).astype(np.uint8)


def _rgb_reduced(img: Image.Image, factor: int) -> Image.Image:
    """``img`` as RGB (`_to_rgb`), shrunk ``factor`` times by box averages (sides rounded up), a band at a time.

    Band by band, the memory beside the decoded picture is one band's: converting a 144 MP palette, RGBA or 16-bit
    picture whole first would add a full-size RGB copy (4 bytes a pixel), and Pillow's reduce() of RGBA does too.
    """
    import numpy as np
    from PIL import Image

    wide = _wide_range(img) if _is_wide(img.mode) else None
    w, h = img.size
    out = Image.new("RGB", (-(-w // factor), -(-h // factor)))
    for top, band in _bands(img, factor):
        if wide is not None:
            band = Image.fromarray(_wide_to_grey8(np.asarray(band), img.mode, *wide)).convert("RGB")
        else:
            band = _to_rgb(band)
        out.paste(band.reduce(factor) if factor > 1 else band, (0, top // factor))
    return out


def _to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit RGB (``img`` itself when already RGB).

    Transparent pixels are composited onto white. 16/32-bit grey pictures are scaled into 0..255, never clipped,
    and come out grey (three equal channels):

    - ``I;16``, ``I;16B``, ``I;16L``: ``v -> round(v / 257)`` (65535 -> 255);
    - ``I``: the same when every value fits 16 bits (0..65535: Pillow opens 16-bit PNG and TIFF as ``I;16`` or
      ``I``); otherwise the full 32-bit range maps linearly onto 0..255, ``[0, 2^31 - 1]`` when no value is
      negative and ``[-2^31, 2^31 - 1]`` when some is;
    - ``F``: ``x -> round(255 x)`` when every finite value lies in [0, 1]; otherwise a min-max stretch of the
      finite values onto 0..255 (a constant picture is black); NaN is black.
    """
    if img.mode == "RGB":
        return img
    if _is_wide(img.mode):
        return _rgb_reduced(img, 1)
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        from PIL import Image

        # Composite transparency onto white: plain convert("RGB") keeps whatever colour the
        # transparent pixels happen to store (often black), which is not what anyone sees.
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img.convert("RGB")


def _fit(size: tuple[int, int], max_side: int | None) -> tuple[int, int] | None:
    """The size a longest side of ``max_side`` gives a ``size`` picture (aspect kept, sides at least 1 pixel);
    ``None`` when there is no cap or the picture already fits."""
    if max_side is None or max(size) <= max_side:
        return None
    scale = max_side / max(size)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def _factor(size: tuple[int, int], target: tuple[int, int]) -> int:
    """The box-reduction factor that keeps ``size`` at no less than ``_GAP`` times ``target`` (1: none)."""
    return max(1, min(size[0] // (_GAP * target[0]), size[1] // (_GAP * target[1])))


def _shrink(img: Image.Image, target: tuple[int, int], extent: tuple[float, float] | None = None) -> Image.Image:
    """``img`` as RGB of size ``target``: box-reduced (band by band) to no less than ``_GAP`` x ``target``, then
    resampled bicubic.

    ``extent``: the whole picture's size in ``img``'s pixels when ``img`` is a JPEG drafted at 1/s scale, whose
    last row and column stand for less than s full-size pixels; the resample's box then keeps the exact aspect.
    """
    from PIL import Image

    extent = extent or img.size
    factor = _factor(img.size, target)
    small = _rgb_reduced(img, factor) if factor > 1 else _to_rgb(img)
    box = (0.0, 0.0, extent[0] / factor, extent[1] / factor)
    return small.resize(target, Image.Resampling.BICUBIC, box=box)


def _decode(path: str, source: str | None, max_side: int | None = None) -> Image.Image:
    """Decode a file or a ``ShardImage``'s bytes into an upright RGB image, its longest side capped at ``max_side``.

    Under a cap the downscale happens in the stored orientation, before any full-size copy, and the small result is
    then turned upright: turning only swaps width and height, so the cap holds for the upright longest side.
    """
    from PIL import Image, ImageOps

    data = getattr(path, "data", None)
    if data is None and not os.path.isfile(path):
        raise ImageLoadError(path, "file not found", source)
    try:
        # Image.open refuses decompression bombs (over 2x Image.MAX_IMAGE_PIXELS) from the header's size, before
        # any draft, so a cap never lets a bomb through.
        with Image.open(io.BytesIO(data) if data is not None else path) as img:
            target = _fit(img.size, max_side)
            # A JPEG decodes at 1/2..1/8 scale (aspect kept: both sides divided alike, rounded up); others ignore it.
            drafted = img.draft(None, (_GAP * target[0], _GAP * target[1])) if target else None
            img.load()  # force the full decode here, so truncation is caught here
            extent = drafted[1][2:] if drafted else img.size
            if target is None or (tuple(extent) == img.size and _factor(img.size, target) == 1):
                # Nothing to draft or reduce: the plain order (upright, RGB, resample), pixel for pixel as before.
                rgb = _to_rgb(ImageOps.exif_transpose(img))
                return rgb if target is None else rgb.resize(_fit(rgb.size, max_side), Image.Resampling.BICUBIC)
            small = _shrink(img, target, extent)
            turn = _UPRIGHT.get(img.getexif().get(0x0112, 1))
            return small.transpose(getattr(Image.Transpose, turn)) if turn else small
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        # PIL reports unknown formats as UnidentifiedImageError (an OSError) and truncation as OSError.
        raise ImageLoadError(path, f"{type(e).__name__}: {e}", source) from e


def load_image(path: str, *, max_side: int | None = None, source: str | None = None) -> Image.Image:
    """Decode ``path`` (the whole file: a truncated one is an error) and return an upright 8-bit RGB image.

    ``path``: a file path or a `ShardImage` (its decoded ``image`` if set, else its ``data``
    bytes, else the file its label names). ``max_side``: if set, downscale (aspect kept,
    bicubic) so the longest side is at most this many pixels; images already smaller are
    untouched. A picture 4x the target or more is first drafted (JPEG) and box-reduced to no less
    than twice the target, which bounds memory (module docstring). 16/32-bit pictures are scaled into 8 bits
    (`_to_rgb`). ``source`` (``file:line`` of the record) goes into error messages.
    """
    decoded = getattr(path, "image", None)
    if decoded is None:
        return _decode(path, source, max_side)
    target = _fit(decoded.size, max_side)
    if target is not None and _factor(decoded.size, target) > 1:
        return _shrink(decoded, target)
    img = _to_rgb(decoded)
    if target is None:
        return img
    from PIL import Image

    return img.resize(target, Image.Resampling.BICUBIC)


def load_images(
    paths: tuple[str, ...] | list[str], *, max_side: int | None = None, source: str | None = None
) -> list[Image.Image]:
    """``load_image`` over several paths (a record side with many images)."""
    return [load_image(p, max_side=max_side, source=source) for p in paths]
