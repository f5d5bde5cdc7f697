"""Data-block throughput on this machine; prints a table (not a test).

    python benchmarks/data.py [--rows 100000] [--images 128]

Measures: JSONL parsing into Records (text rows; image rows with a stat per path),
JPEG decode + CLIP image processor at 224 px on one core, and sampler draws.
Everything runs in one process with one torch thread, so "per core" is literal.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import (
    CLIPImageProcessorPil,
)  # what CLIPImageProcessor falls back to without torchvision

from vembed_blocks.data import WeightedTaskSampler, load_images, read_records


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20_000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        rows = bench_records(d, args.rows) + bench_images(d, args.images) + bench_sampler(args.steps)
    width = max(len(r[0]) for r in rows)
    print(f"{'benchmark':<{width}}  {'rate':>12}  unit")
    for name, rate, unit in rows:
        print(f"{name:<{width}}  {rate:>12,.0f}  {unit}")


if __name__ == "__main__":
    main()
