"""`load_image` decoding: 16/32-bit pictures are scaled into 8 bits, and a longest-side cap bounds the decode's memory.

References are plain numpy arithmetic or plain Pillow calls on the full picture (convert, resize, exif_transpose),
never `vembed_blocks` itself. The memory checks run `load_image` in a fresh interpreter, so its peak RSS is that
one load.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from _watchdog import run_watched
from PIL import Image, ImageOps

from vembed_blocks.data.images import ImageLoadError, ShardImage, load_image

REPO = Path(__file__).resolve().parents[1]
BIG = (12000, 9000)  # 108 megapixels: 432 MB as one decoded RGB(X) copy, 4 bytes a pixel
MB = 1 << 20


def _grey(img: Image.Image) -> np.ndarray:
    """The one grey channel of an RGB picture, after checking that its three channels are equal."""
    a = np.asarray(img)
    assert img.mode == "RGB" and np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 0], a[..., 2])
    return a[..., 0].astype(np.int64)


def _from(mode: str, values: np.ndarray) -> Image.Image:
    """A Pillow image of ``mode`` holding ``values`` (2-D), built from raw bytes so no conversion touches them."""
    raw = {"I;16": "<u2", "I;16L": "<u2", "I;16B": ">u2", "I": "<i4", "F": "<f4"}[mode]
    h, w = values.shape
    return Image.frombytes(mode, (w, h), values.astype(raw).tobytes(), "raw", mode)


# 0..65535 in steps of ~16: clipping at 255 would leave ~17 grey levels, scaling gives all 256
GRADIENT_16 = np.linspace(0, 65535, 4096).round().astype(np.int64).reshape(64, 64)


@pytest.mark.parametrize("mode", ["I;16", "I;16L", "I;16B", "I"])
def test_16_bit_values_are_scaled_by_257_not_clipped(tmp_path, mode):
    want = np.round(GRADIENT_16 / 257)  # 65535 -> 255
    img = _from(mode, GRADIENT_16)
    # files too: a 16-bit grey PNG opens as I;16, a 32-bit integer TIFF (holding 16-bit values) as I
    ext = {"I;16": "png", "I": "tiff"}.get(mode)
    sources = [ShardImage(f"in-memory.{mode}", None, img)]
    if ext:
        img.save(tmp_path / f"g.{ext}")
        assert Image.open(tmp_path / f"g.{ext}").mode == mode
        sources.append(str(tmp_path / f"g.{ext}"))
    for src in sources:
        got = _grey(load_image(src))
        assert len(np.unique(got)) >= 200, len(np.unique(got))
        assert np.abs(got - want).max() <= 1


@pytest.mark.parametrize(
    "values, want",
    [
        # beyond 16 bits, non-negative: [0, 2^31 - 1] -> [0, 255]
        (np.linspace(0, 2**31 - 1, 4096).round(), lambda v: v / (2**31 - 1) * 255),
        # negative values: the signed range [-2^31, 2^31 - 1] -> [0, 255]
        (np.linspace(-(2**31), 2**31 - 1, 4096).round(), lambda v: (v + 2**31) / (2**32 - 1) * 255),
    ],
)
def test_32_bit_integers_map_their_full_range(values, want):
    v = values.astype(np.int64).reshape(64, 64)
    got = _grey(load_image(ShardImage("i32.tiff", None, _from("I", v))))
    assert len(np.unique(got)) >= 200
    assert np.abs(got - np.round(want(v.astype(np.float64)))).max() <= 1


@pytest.mark.parametrize("lo, hi", [(0.0, 1.0), (0.25, 0.5), (-3.0, 5.0), (10.0, 4000.0)])
def test_float_images_in_0_1_times_255_else_stretched(tmp_path, lo, hi):
    x = np.linspace(lo, hi, 4096, dtype=np.float32).reshape(64, 64)
    x64 = x.astype(np.float64)
    want = x64 * 255 if 0 <= lo and hi <= 1 else (x64 - lo) / (hi - lo) * 255
    _from("F", x).save(tmp_path / "f.tiff")
    assert Image.open(tmp_path / "f.tiff").mode == "F"
    got = _grey(load_image(str(tmp_path / "f.tiff")))
    assert np.abs(got - np.round(want)).max() <= 1
    assert len(np.unique(got)) >= (60 if hi - lo == 0.25 else 200)


def test_float_nan_is_black_and_the_finite_values_set_the_stretch():
    x = np.linspace(-1, 3, 64, dtype=np.float32).reshape(8, 8)
    x[0, 0] = np.nan
    got = _grey(load_image(ShardImage("f.tiff", None, _from("F", x))))
    lo, hi = np.nanmin(x.astype(np.float64)), np.nanmax(x.astype(np.float64))
    want = np.round((x.astype(np.float64) - lo) / (hi - lo) * 255)
    assert got[0, 0] == 0 and np.abs(got.ravel()[1:] - want.ravel()[1:]).max() <= 1


@pytest.mark.parametrize("mode", ["1", "L", "P", "CMYK", "YCbCr", "RGB"])
def test_8_bit_modes_convert_as_plain_pillow_does(mode):
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).convert(mode)
    want = np.asarray(img.convert("RGB"))
    assert np.array_equal(np.asarray(load_image(ShardImage("x.tiff", None, img))), want)


def test_transparent_modes_composite_on_white():
    rgba = np.zeros((4, 64, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, np.arange(0, 256, 4)[None, :]
    alpha = rgba[..., 3:].astype(np.float64) / 255
    grey = np.asarray(Image.fromarray(rgba[..., :3]).convert("L"), np.float64)[..., None]  # LA keeps Pillow's luma
    for img, colour in ((Image.fromarray(rgba), rgba[..., :3]), (Image.fromarray(rgba).convert("LA"), grey)):
        want = colour * alpha + 255 * (1 - alpha) + np.zeros((1, 1, 3))
        got = np.asarray(load_image(ShardImage("t.png", None, img)), np.float64)
        assert np.abs(got - want).max() <= 1, img.mode


# ---- the longest-side cap: draft / reduce, orientation, the bomb check, truncation ----------------------------------


def _quadrants(w: int, h: int) -> Image.Image:
    """Four flat quadrants (red, blue / green, white): any wrong turn or flip moves a colour to another corner."""
    a = np.empty((h, w, 3), np.uint8)
    a[: h // 2, : w // 2], a[: h // 2, w // 2 :] = (255, 0, 0), (0, 0, 255)
    a[h // 2 :, : w // 2], a[h // 2 :, w // 2 :] = (0, 255, 0), (255, 255, 255)
    return Image.fromarray(a)


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("max_side", [100, 40])
def test_capped_jpeg_is_upright_and_matches_a_full_decode(tmp_path, orientation, max_side):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "q.jpg"
    _quadrants(1600, 800).save(path, quality=90, exif=exif)
    got = load_image(str(path), max_side=max_side)
    upright = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    w, h = upright.size
    want_size = (round(w * max_side / max(w, h)), round(h * max_side / max(w, h)))
    assert got.size == want_size and got.mode == "RGB"
    want = np.asarray(upright.resize(want_size, Image.Resampling.BICUBIC), np.float64)
    assert np.abs(np.asarray(got, np.float64) - want).mean() < 4, orientation


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "P+transparency", "I;16"])
def test_capped_png_is_reduced_before_conversion_and_matches_a_full_resize(tmp_path, mode):
    rng = np.random.default_rng(2)
    base = rng.integers(0, 256, (9, 12, 4), dtype=np.uint8)
    base[..., 3] = np.maximum(base[..., 3], 40)
    big = Image.fromarray(base).resize((1200, 900), Image.Resampling.NEAREST)  # flat blocks of 100 px
    save = {}
    if mode == "I;16":
        img = _from(mode, np.asarray(big.convert("L"), np.int64) * 257)
        ref = big.convert("L").convert("RGB")  # v * 257 / 257 = the L values
    elif mode in ("RGBA", "P+transparency"):
        img = big if mode == "RGBA" else big.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE)
        if mode == "P+transparency":
            save = {"transparency": int(np.asarray(img)[0, 0])}  # the top-left block turns see-through
            img.info.update(save)
        a = np.asarray(img.convert("RGBA"), np.float64)
        alpha = a[..., 3:] / 255
        ref = Image.fromarray(np.round(a[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8))
    else:
        img = big.convert("RGB").convert(mode)
        ref = img.convert("RGB")
    img.save(tmp_path / "b.png", **save)
    want = np.asarray(ref.resize((100, 75), Image.Resampling.BICUBIC), np.float64)
    for src in (str(tmp_path / "b.png"), ShardImage("b.png", None, img)):
        got = load_image(src, max_side=100)
        assert got.size == (100, 75) and got.mode == "RGB"
        assert np.abs(np.asarray(got, np.float64) - want).mean() < 3, (mode, src)
    if save:  # the see-through block is white in the reference and in both loads
        assert np.array_equal(want[2, 2], [255, 255, 255]) and np.array_equal(np.asarray(got)[2, 2], [255, 255, 255])


def test_cap_keeps_the_decompression_bomb_check(tmp_path, monkeypatch):
    _quadrants(300, 300).save(tmp_path / "bomb.jpg")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # 90,000 pixels > twice the limit: Pillow refuses
    for max_side in (None, 16):
        with pytest.raises(ImageLoadError, match="DecompressionBombError"):
            load_image(str(tmp_path / "bomb.jpg"), max_side=max_side)


def test_capped_truncated_jpeg_is_still_an_error(tmp_path):
    buf = io.BytesIO()
    _quadrants(2400, 1600).save(buf, format="JPEG", quality=90)
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageLoadError, match="truncated"):
        load_image(str(tmp_path / "cut.jpg"), max_side=64)


# ---- peak memory of one capped load, in a fresh interpreter ---------------------------------------------------------

_PROBE = """
import json, resource, sys, warnings
warnings.simplefilter("ignore")  # 108 MP is over Pillow's decompression-bomb warning threshold (not its error one)
from vembed_blocks.data.images import load_image
sizes = [load_image(p, max_side=512).size for p in sys.argv[1:]]
try:  # this process image's own high-water mark: VmHWM starts afresh at exec
    peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) * 1024
except OSError:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"sizes": sizes, "peak": peak}))
"""


def _peak(*paths: Path) -> tuple[list[tuple[int, int]], int]:
    """Sizes of ``load_image(p, max_side=512)`` over ``paths`` and the peak RSS (bytes) of the interpreter doing it.

    Linux's ``ru_maxrss`` of a spawned child starts at the parent's RSS at the fork (a pytest process with torch
    loaded and the 432 MB test picture just made), so the probe reads ``VmHWM``, which exec resets.
    """
    run = run_watched(  # a hang fails, a slow machine does not
        [sys.executable, "-c", _PROBE, *map(str, paths)], cwd=REPO, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    return [tuple(s) for s in out["sizes"]], out["peak"]


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    """A 12000x9000 JPEG and PNG (cheap to make: 100-pixel flat blocks), and tiny ones of each for the baseline."""
    d = tmp_path_factory.mktemp("big")
    small = Image.fromarray(np.random.default_rng(3).integers(0, 256, (90, 120, 3), dtype=np.uint8))
    img = small.resize(BIG, Image.Resampling.NEAREST)
    img.save(d / "big.jpg", quality=70)
    img.save(d / "big.png", compress_level=1)
    del img
    small.save(d / "tiny.jpg", quality=70)
    small.save(d / "tiny.png")
    return d


@pytest.fixture(scope="module")
def baseline(big) -> int:
    """Peak RSS of an interpreter that imports everything a load needs and loads two tiny pictures."""
    return _peak(big / "tiny.jpg", big / "tiny.png")[1]


def _check_size(size: tuple[int, int]) -> None:
    assert max(size) == 512 and abs(size[1] - 512 * BIG[1] / BIG[0]) <= 1, size


def test_capped_100_mp_jpeg_decodes_near_the_cap(big, baseline):
    (size,), peak = _peak(big / "big.jpg")
    _check_size(size)
    print(f"JPEG 12000x9000 max_side=512: peak RSS {peak / MB:.0f} MB, baseline {baseline / MB:.0f} MB")
    assert peak - baseline < 150 * MB  # one full decode alone would be 432 MB


def test_capped_100_mp_png_holds_one_decoded_copy(big, baseline):
    (size,), peak = _peak(big / "big.png")
    _check_size(size)
    print(f"PNG 12000x9000 max_side=512: peak RSS {peak / MB:.0f} MB, baseline {baseline / MB:.0f} MB")
    assert peak - baseline < 1.3 * BIG[0] * BIG[1] * 4
