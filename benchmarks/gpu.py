"""GPU benchmarks in one run: GradCache at batches plain training cannot hold, the memory-budget curve,
tiled InfoNCE at a million pairs, and FSDP2 throughput of a Qwen3-VL-2B-sized model. Prints one
markdown table per section (paste them into docs/benchmarks.md with the card's name).

    python benchmarks/gpu.py                          # a CUDA device, real sizes (not yet run on one)
    python benchmarks/gpu.py --sections clip,tiled    # some sections only
    python benchmarks/gpu.py --device cpu --tiny      # every section, tiny sizes, seconds (what CI runs)

Models are randomly initialised from the real configs (no hub): CLIP ViT-B/16 (openai/clip-vit-base-patch16
sizes) and Qwen3-VL-2B-Instruct; the numbers are written out below. Compute is bf16 (autocast for CLIP, an
FSDP2 MixedPrecisionPolicy for Qwen3-VL). Times: the minimum over --reps after a warm-up, synchronised.
Peak memory: ``torch.cuda.max_memory_allocated`` over the step (CPU: peak RSS, VmHWM, which counts the
allocator's cache too). "x plain" compares time per sample with plain training at the largest batch it fits.
"""

from __future__ import annotations

import argparse
import gc as pygc
import math
import os
import sys
import time
from typing import Callable

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from vembed_blocks.gradcache import GradCache  # noqa: E402
from vembed_blocks.losses import InfoNCE  # noqa: E402

# openai/clip-vit-base-patch16 (CLIPConfig sizes; quick_gelu as in the checkpoint; projection_dim 512).
CLIP_TEXT = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8)
CLIP_TEXT.update(max_position_embeddings=77, hidden_act="quick_gelu")
CLIP_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
CLIP_VISION.update(image_size=224, patch_size=16, hidden_act="quick_gelu")
# Qwen/Qwen3-VL-2B-Instruct config.json: text_config, vision_config and the special token ids.
QWEN_TEXT = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, head_dim=128)
QWEN_TEXT.update(num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=262144, rms_norm_eps=1e-6)
QWEN_TEXT.update(tie_word_embeddings=True, hidden_act="silu")
QWEN_TEXT["rope_parameters"] = dict(
    rope_type="default", rope_theta=5e6, mrope_section=[24, 20, 20], mrope_interleaved=True
)
QWEN_VISION = dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2048)
QWEN_VISION.update(
    in_channels=3, patch_size=16, spatial_merge_size=2, temporal_patch_size=2, hidden_act="gelu_pytorch_tanh"
)
QWEN_VISION.update(num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17])
QWEN_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)
# --tiny: the same architectures, narrow and shallow (same code paths, seconds on a CPU).
SMALL = dict(hidden_size=32, intermediate_size=64)
TINY_CLIP_TEXT = dict(CLIP_TEXT, **SMALL, vocab_size=1000, num_hidden_layers=2, num_attention_heads=4, eos_token_id=2)
TINY_CLIP_TEXT.update(bos_token_id=1, pad_token_id=0)
TINY_CLIP_VISION = dict(CLIP_VISION, **SMALL, num_hidden_layers=2, num_attention_heads=4, image_size=32)
TINY_QWEN_TEXT = dict(QWEN_TEXT, **SMALL, vocab_size=200, num_hidden_layers=2, num_attention_heads=2, head_dim=16)
TINY_QWEN_TEXT.update(num_key_value_heads=1, max_position_embeddings=512)
TINY_QWEN_TEXT["rope_parameters"] = dict(QWEN_TEXT["rope_parameters"], rope_theta=1e4, mrope_section=[2, 3, 3])
TINY_QWEN_VISION = dict(QWEN_VISION, **SMALL, depth=2, num_heads=2, out_hidden_size=32, num_position_embeddings=64)
TINY_QWEN_VISION.update(deepstack_visual_indexes=[0])
TINY_QWEN_IDS = dict(image_token_id=150, video_token_id=151, vision_start_token_id=152, vision_end_token_id=153)
GIB = 2**30


class Bench:
    """Device, sizes and measurement (time + peak memory) shared by the sections."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.dev, self.tiny, self.reps = torch.device(args.device), args.tiny, args.reps
        self.cuda = self.dev.type == "cuda"
        self.max_batch = args.max_batch or (16 if args.tiny else 1 << 16)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.dev)

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.dev)
            return
        try:  # Linux: writing 5 to clear_refs resets VmHWM
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass

    def peak(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.dev)
        try:
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024.0
        except (OSError, StopIteration):
            return float("nan")

    def measure(self, step: Callable[[], None], reps: int | None = None, warmup: bool = True) -> tuple[float, float]:
        """(seconds, peak bytes) of ``step``: min over reps after an optional warm-up; raises on OOM."""
        times, peak = [], 0.0
        for r in range(int(warmup) + (reps or self.reps)):
            self.sync()
            self.reset_peak()
            t0 = time.perf_counter()
            step()
            self.sync()
            if r >= int(warmup):
                times.append(time.perf_counter() - t0)
                peak = max(peak, self.peak())
        return min(times), peak

    def free(self) -> None:
        pygc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


def fits(bench: Bench, step: Callable[[], None], reps: int | None = None, warmup: bool = True):
    """`Bench.measure`, or None when the step runs out of device memory."""
    try:
        return bench.measure(step, reps, warmup)
    except torch.cuda.OutOfMemoryError:
        bench.free()
        return None


def gb(x: float) -> str:
    return f"{x / GIB:.2f}" if x >= 0.01 * GIB else f"{x / GIB:.4f}"


# ----------------------------------------------------------------------------- CLIP + GradCache


def clip_setup(bench: Bench):
    from transformers import CLIPConfig, CLIPModel

    text, vision = (TINY_CLIP_TEXT, TINY_CLIP_VISION) if bench.tiny else (CLIP_TEXT, CLIP_VISION)
    torch.manual_seed(0)
    with bench.dev:
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32 if bench.tiny else 512))
    model.train()
    loss_fn = InfoNCE(temperature=0.07)
    size, vocab = vision["image_size"], text["vocab_size"]

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator(bench.dev).manual_seed(n)
        return (
            torch.randn(n, 3, size, size, device=bench.dev, generator=g, dtype=torch.bfloat16),
            torch.randint(3, vocab, (n, 77), device=bench.dev, generator=g),
        )

    def image(pixel_values):
        return model.get_image_features(pixel_values=pixel_values).pooler_output

    def text_fn(input_ids):
        return model.get_text_features(input_ids=input_ids).pooler_output

    def step(n: int, how: str, chunk: int = 0, **gc_kw) -> Callable[[], None]:
        """plain | floor (no-grad pass + forward/backward per chunk, the classic minimum) | gradcache."""
        pix, ids = batch(n)

        def run() -> None:
            model.zero_grad(set_to_none=True)
            with torch.autocast(bench.dev.type, dtype=torch.bfloat16):
                if how == "plain":
                    loss_fn(image(pix), text_fn(ids)).backward()
                elif how == "floor":
                    for fn, x in ((image, pix), (text_fn, ids)):
                        with torch.no_grad():
                            [fn(x[s : s + chunk]) for s in range(0, n, chunk)]
                    for fn, x in ((image, pix), (text_fn, ids)):
                        for s in range(0, n, chunk):
                            fn(x[s : s + chunk]).float().sum().backward()
                else:
                    gc = GradCache(chunk_size=chunk, **gc_kw)
                    q = gc.encode(image, pix)
                    run.kept = [gc.last_plan.kept]
                    p = gc.encode(text_fn, ids)
                    run.kept.append(gc.last_plan.kept)
                    loss_fn(q, p).backward()

        run.kept = []
        return run

    return model, step, image, batch


def clip_section(bench: Bench) -> dict:
    model, step, image, batch = clip_setup(bench)
    best, n = None, 4 if bench.tiny else 64
    while n <= bench.max_batch:  # the largest power-of-two batch plain training fits
        res = fits(bench, step(n, "plain"), reps=1)
        if res is None:
            break
        best, n = (n, res), 2 * n
    if best is None:
        raise SystemExit(f"plain CLIP training does not fit even batch {n}")
    bp, (t_plain, peak_plain) = best
    t_plain, peak_plain = bench.measure(step(bp, "plain"))
    chunk = max(1, bp // 4)
    print(
        f"\n## CLIP ViT-B/16-sized dual encoder{' (tiny)' if bench.tiny else ''}, bf16 autocast, InfoNCE; "
        f"largest plain batch (powers of 2): {bp}; GradCache chunk {chunk} (keep_graphs=1)\n"
    )
    print("| batch | method | step s | samples/s | x plain per sample | peak GiB |\n|---|---|---|---|---|---|")
    per_plain = t_plain / bp

    def row(n: int, name: str, res) -> None:
        if res is None:
            print(f"| {n} | {name} | out of memory | | | |")
        else:
            print(f"| {n} | {name} | {res[0]:.3f} | {n / res[0]:.0f} | {res[0] / n / per_plain:.2f} | {gb(res[1])} |")

    row(bp, "plain", (t_plain, peak_plain))
    for mult in (1, 4, 16):
        n = bp * mult
        row(n, f"classic floor (chunk {chunk})", fits(bench, step(n, "floor", chunk)))
        row(n, "GradCache", fits(bench, step(n, "gradcache", chunk)))
    bench.free()
    return dict(model=model, step=step, image=image, batch=batch, bp=bp, chunk=chunk, per_plain=per_plain)


def budget_section(bench: Bench, clip: dict | None) -> None:
    clip = clip or clip_section(bench)
    step, bp, chunk, per_plain = clip["step"], clip["bp"], clip["chunk"], clip["per_plain"]
    n = 4 * bp
    pix, _ = clip["batch"](chunk)
    probe = GradCache(chunk_size=chunk, memory_budget=math.inf)
    with torch.autocast(bench.dev.type, dtype=torch.bfloat16):
        probe.encode(clip["image"], pix)
    f = probe.last_plan.chunk_bytes
    probe.reset()
    del pix
    bench.free()
    floor = fits(bench, step(n, "floor", chunk))
    print(
        f"\n## GradCache memory budget curve: CLIP as above, batch {n} (4x plain), chunk {chunk}, "
        f"{2 * n // chunk} chunks per step; F = first image chunk's footprint = {gb(f)} GiB\n"
    )
    print("| memory_budget | graphs kept (image + text) | step s | x plain per sample | x classic floor | peak GiB |")
    print("|---|---|---|---|---|---|")
    budgets = [
        ("0 (classic)", 0.0),
        ("1 F", f),
        ("2 F", 2 * f),
        ("4 F", 4 * f),
        ("8 F", 8 * f),
        ("inf (all)", math.inf),
    ]
    bench.free()
    if bench.cuda:  # what a user would set: what is free, less the step's inputs and room for one chunk (2 F)
        inputs = n * sum(t.nbytes for t in clip["batch"](1))
        budgets.insert(-1, ("free - inputs - 2 F", max(0.0, torch.cuda.mem_get_info(bench.dev)[0] - inputs - 2 * f)))
    for name, budget in budgets:
        run = step(n, "gradcache", chunk, memory_budget=budget)
        res = fits(bench, run)
        if res is None:
            print(f"| {name} | | out of memory | | | |")
            continue
        ratio = f"{res[0] / floor[0]:.2f}" if floor else "n/a"
        kept = " + ".join(map(str, run.kept))
        print(f"| {name} | {kept} | {res[0]:.3f} | {res[0] / n / per_plain:.2f} | {ratio} | {gb(res[1])} |")
    bench.free()


# ----------------------------------------------------------------------------- tiled InfoNCE


def tiled_section(bench: Bench) -> None:
    sizes, dim = ([512, 2048], 32) if bench.tiny else ([65_536, 1_048_576], 768)
    tiled = 128 if bench.tiny else None  # tiny sizes are below the automatic threshold: force the tiles
    print(f"\n## InfoNCE, {dim}-d bf16 embeddings, forward + backward: dense vs tiled (tile_size={tiled})\n")
    print("| pairs | path | fwd+bwd s | peak GiB |\n|---|---|---|---|")
    for n in sizes:
        for path, tile in (("dense", 0), ("tiled", tiled)):
            need = 3 * 2 * n * n  # bf16 logits, their softmax and its gradient
            if path == "dense" and bench.cuda and need > torch.cuda.mem_get_info(bench.dev)[0]:
                print(f"| {n:,} | dense | does not fit (needs ~{need / GIB:,.0f} GiB) | |")
                continue
            res = tiled_run(bench, n, dim, tile)
            print(f"| {n:,} | {path} | {'out of memory' if res is None else f'{res[0]:.3f} | {gb(res[1])}'} |")
            bench.free()


def tiled_run(bench: Bench, n: int, dim: int, tile: int | None):
    g = torch.Generator(bench.dev).manual_seed(0)
    q = torch.randn(n, dim, device=bench.dev, dtype=torch.bfloat16, generator=g).requires_grad_()
    p = torch.randn(n, dim, device=bench.dev, dtype=torch.bfloat16, generator=g).requires_grad_()
    loss_fn = InfoNCE(temperature=0.05, tile_size=tile)

    def run() -> None:
        q.grad = p.grad = None
        loss_fn(q, p).backward()

    big = not bench.tiny and n > 100_000  # a million pairs: one timed run (kernels warmed up at 65k)
    return fits(bench, run, 1, warmup=False) if big else fits(bench, run)


# ----------------------------------------------------------------------------- Qwen3-VL + FSDP2


def qwen_inputs(bench: Bench, n: int, ids: dict, vision: dict) -> dict:
    side = 2 if bench.tiny else 28  # patches per side: 448 px images at patch 16 (32 px tiny)
    tokens, text = side * side // vision["spatial_merge_size"] ** 2, 8 if bench.tiny else 64
    g = torch.Generator(bench.dev).manual_seed(0)
    words = torch.randint(0, 100 if bench.tiny else 150_000, (n, text), device=bench.dev, generator=g)
    img = torch.full((n, tokens), ids["image_token_id"], device=bench.dev)
    start = torch.full((n, 1), ids["vision_start_token_id"], device=bench.dev)
    end = torch.full((n, 1), ids["vision_end_token_id"], device=bench.dev)
    input_ids = torch.cat([start, img, end, words], 1)
    patch = vision["in_channels"] * vision["temporal_patch_size"] * vision["patch_size"] ** 2
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "mm_token_type_ids": (input_ids == ids["image_token_id"]).long(),
        "pixel_values": torch.randn(n * side * side, patch, device=bench.dev, generator=g),
        "image_grid_thw": torch.tensor([[1, side, side]] * n, device=bench.dev),
    }


def qwen_section(bench: Bench, batch: int) -> None:
    if not dist.is_initialized():  # FSDP2 on one device: a 1-rank process group, no launcher needed
        backend = "nccl" if bench.cuda else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    cfg = (TINY_QWEN_TEXT, TINY_QWEN_VISION, TINY_QWEN_IDS) if bench.tiny else (QWEN_TEXT, QWEN_VISION, QWEN_IDS)
    inputs = qwen_inputs(bench, batch, cfg[2], cfg[1])
    seq = inputs["input_ids"].shape[1]
    print(
        f"\n## Qwen3-VL-2B-sized model{' (tiny)' if bench.tiny else ''}, FSDP2 on 1 rank (bf16 params, fp32 reduce), "
        f"batch {batch} x {seq} tokens (1 image each), forward + backward, last-token InfoNCE\n"
    )
    print("| activation checkpointing | parameters | step s | samples/s | tokens/s | peak GiB |")
    print("|---|---|---|---|---|---|")
    for ckpt in (False, True):
        params, res = qwen_run(bench, cfg, inputs, ckpt)
        if res is None:
            print(f"| {ckpt} | {params / 1e6:,.1f} M | out of memory | | | |")
        else:
            t, peak = res
            print(
                f"| {ckpt} | {params / 1e6:,.1f} M | {t:.3f} | {batch / t:.1f} | {batch * seq / t:,.0f} | {gb(peak)} |"
            )
        bench.free()


def qwen_run(bench: Bench, cfg: tuple[dict, dict, dict], inputs: dict, ckpt: bool):
    from transformers import Qwen3VLConfig, Qwen3VLModel

    from vembed_blocks.parallel import checkpoint_layers
    from vembed_blocks.vlm import shard_vlm, vlm_embed

    torch.manual_seed(0)
    with bench.dev:  # initialised on the device: no 2B-parameter init on the CPU
        model = Qwen3VLModel(Qwen3VLConfig(text_config=cfg[0], vision_config=cfg[1], **cfg[2]))
    model.train()
    if ckpt:
        checkpoint_layers(model)
    model = shard_vlm(model, mixed_precision="bf16")
    loss_fn = InfoNCE(temperature=0.05, gather=False)

    def run() -> None:
        model.zero_grad(set_to_none=True)
        e = vlm_embed(model, inputs)
        loss_fn(e[0::2].float(), e[1::2].float()).backward()

    return sum(p.numel() for p in model.parameters()), fits(bench, run)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny models and sizes: every code path in seconds (CI)")
    ap.add_argument("--sections", default="clip,budget,tiled,qwen")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-batch", type=int, default=0, help="cap of the plain-batch search (default 16 tiny, 65536)")
    ap.add_argument("--qwen-batch", type=int, default=0, help="default 8 (4 tiny)")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: pass --device cpu (with --tiny for the CI run)")
    if args.device == "cpu":
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    bench, sections = Bench(args), args.sections.split(",")
    name = torch.cuda.get_device_name(bench.dev) if bench.cuda else f"CPU ({os.cpu_count()} cores)"
    print(f"# vembed-blocks GPU benchmarks on {name}, torch {torch.__version__}{', tiny sizes' if args.tiny else ''}")
    clip = clip_section(bench) if "clip" in sections else None
    if "budget" in sections:
        budget_section(bench, clip)
    del clip
    bench.free()
    if "tiled" in sections:
        tiled_section(bench)
    if "qwen" in sections:
        qwen_section(bench, args.qwen_batch or (4 if args.tiny else 8))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
