"""Data-block throughput on this machine; prints a table (not a test).

    python benchmarks/data.py [--rows 100000] [--images 128] [--stream-sizes 10000,1000000,10000000]

Measures: JSONL parsing into Records (text rows; image rows with a stat per path),
JPEG decode + CLIP image processor at 224 px on one core, and sampler draws.
Everything runs in one process with one torch thread, so "per core" is literal.

Streaming section (vembed_blocks/data/shards.py, shard_stream.py): time to first batch and peak RSS of a fresh
process that opens N samples of JSONL shards (metadata-only t2t rows; one 10k-row shard written
once and hard-linked N / 10k times, so 10M samples cost one shard of disk), and samples/s of one
worker streaming tar shards of 224 px JPEGs through decode + CLIP image processor.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import (
    CLIPImageProcessorPil,
)  # what CLIPImageProcessor falls back to without torchvision

from vembed_blocks.data import WeightedTaskSampler, load_image, load_images, read_records


def _rate(fn, n: int) -> float:
    t = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t)


def bench_records(d: str, rows: int) -> list[tuple[str, float, str]]:
    text = os.path.join(d, "t2t.jsonl")
    with open(text, "w") as f:
        for i in range(rows):
            f.write(
                json.dumps(
                    {"query": f"query number {i}", "positive": f"passage {i} " * 8, "negatives": ["a", "b"], "label": i}
                )
                + "\n"
            )
    Image.new("RGB", (4, 4)).save(os.path.join(d, "x.jpg"))
    image = os.path.join(d, "t2i.jsonl")
    with open(image, "w") as f:
        for i in range(rows):
            f.write(json.dumps({"query": f"caption {i}", "positive": "x.jpg", "negatives": ["x.jpg", "x.jpg"]}) + "\n")
    out = []
    for name, path, kw in (
        ("t2t", text, {}),
        ("t2i, stat images", image, {}),
        ("t2i, no stat", image, {"check_images": False}),
    ):
        r = _rate(lambda: sum(1 for _ in read_records(path, **kw)), rows)
        out.append((f"parse JSONL -> Record ({name})", r, "records/s"))
    return out


def bench_images(d: str, n: int) -> list[tuple[str, float, str]]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        # Smooth gradient + mild noise: closer to a photo's JPEG size than pure noise.
        base = np.linspace(0, 255, 224, dtype=np.float32)[None, :, None] * np.ones((224, 1, 3), np.float32)
        img = np.clip(base + rng.normal(0, 20, (224, 224, 3)), 0, 255).astype(np.uint8)
        paths.append(os.path.join(d, f"im{i}.jpg"))
        Image.fromarray(img).save(paths[-1], quality=90)
    proc = CLIPImageProcessorPil()  # 224 shortest edge + 224 center crop, CLIP mean/std
    decode = _rate(lambda: load_images(paths), n)
    full = _rate(lambda: [proc(load_images(paths[i : i + 32]), return_tensors="pt") for i in range(0, n, 32)], n)
    return [
        ("decode 224px JPEG (load_image)", decode, "images/s/core"),
        ("decode + CLIP processor", full, "images/s/core"),
    ]


def bench_sampler(steps: int) -> list[tuple[str, float, str]]:
    out = []
    for name, sizes in (
        ("3 tasks, 100k rows", {"a": 50_000, "b": 30_000, "c": 20_000}),
        ("1 task, 1e9 rows", {"big": 10**9}),
    ):
        s = WeightedTaskSampler(sizes, batch_size=32, seed=0, rank=3, world_size=8)
        r = _rate(lambda: [next(s) for _ in range(steps)], steps)
        out.append((f"sampler draws, global batch 256 ({name})", r, "draws/s"))
    return out


_FIRST_BATCH = """
import resource, sys, time
t0 = time.perf_counter()
from vembed_blocks.data.shards import open_stream
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
loader = open_stream(sys.argv[1], 256, seed=0, shuffle_buffer=1000)
step, batches, _ = next(iter(loader.steps(1)))
first = time.perf_counter() - t
print(first, base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def bench_stream_first_batch(d: str, sizes: list[int]) -> list[tuple[str, float, str]]:
    """Time to the first batch (256 records) and peak RSS, in a fresh process per size."""
    per_shard = 10_000
    shard = os.path.join(d, "stream-base.jsonl")
    with open(shard, "w") as f:
        f.writelines(json.dumps({"query": f"query {i}", "positive": f"passage {i}"}) + "\n" for i in range(per_shard))
    out = []
    for n in sizes:
        folder = os.path.join(d, f"stream-{n}")
        os.makedirs(folder)
        shards = max(1, n // per_shard)
        for s in range(shards):
            os.link(shard, os.path.join(folder, f"{s:06d}.jsonl"))
        spec = os.path.join(folder, f"{{{0:06d}..{shards - 1:06d}}}.jsonl")
        res = subprocess.run([sys.executable, "-c", _FIRST_BATCH, spec], capture_output=True, text=True, check=True)
        first, base, peak = map(float, res.stdout.split())
        out.append((f"stream {n:,} samples ({shards} shards): time to first batch", first, "s"))
        out.append((f"stream {n:,} samples: peak RSS (after imports: {base / 1024:.0f} MB)", peak / 1024, "MB"))
    return out


def bench_stream_decode(d: str, n: int) -> list[tuple[str, float, str]]:
    """One worker (num_workers=0) streaming tar shards: tar read + JPEG decode + CLIP image processor."""
    from vembed_blocks.data.shards import open_stream

    rng = np.random.default_rng(0)
    base = np.linspace(0, 255, 224, dtype=np.float32)[None, :, None] * np.ones((224, 1, 3), np.float32)
    for s in range(2):
        with tarfile.open(os.path.join(d, f"img-{s:05d}.tar"), "w") as tf:
            for i in range(n // 2):
                buf = io.BytesIO()
                Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)).save(
                    buf, format="JPEG", quality=90
                )
                for name, data in ((f"{s}{i:06d}.jpg", buf.getvalue()), (f"{s}{i:06d}.txt", b"a caption")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    proc = CLIPImageProcessorPil()
    # load_image returns the picture the reader already decoded (as a collator's call would)
    collate = lambda recs: proc([load_image(r.positive.images[0]) for r in recs], return_tensors="pt")  # noqa: E731
    loader = open_stream(os.path.join(d, "img-{00000..00001}.tar"), 32, collate, shuffle_buffer=256)
    steps = n // 32
    r = _rate(lambda: list(loader.steps(steps)), steps * 32)
    return [("stream tar: read + decode 224px JPEG + CLIP processor", r, "samples/s/worker")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20_000)
    ap.add_argument("--stream-sizes", default="10000,1000000,10000000", help="samples per streaming set")
    ap.add_argument("--stream-images", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        rows = bench_records(d, args.rows) + bench_images(d, args.images) + bench_sampler(args.steps)
        sizes = [int(x) for x in args.stream_sizes.split(",") if x]
        rows += bench_stream_first_batch(d, sizes) + bench_stream_decode(d, args.stream_images)
    width = max(len(r[0]) for r in rows)
    print(f"{'benchmark':<{width}}  {'rate':>12}  unit")
    for name, rate, unit in rows:
        print(f"{name:<{width}}  {rate:>12,.2f}  {unit}" if rate < 100 else f"{name:<{width}}  {rate:>12,.0f}  {unit}")


if __name__ == "__main__":
    main()
