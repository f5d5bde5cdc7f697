"""Peak memory and time of dense vs tiled InfoNCE (forward + backward) as the batch grows.

    python benchmarks/loss_memory.py                          # CPU: B = 4k .. 64k, dense up to 16k
    python benchmarks/loss_memory.py --batches 4096,131072 --dense-max 8192
    python benchmarks/loss_memory.py --device cuda            # + a 1,048,576-pair bf16 D=768 row

Workload: ``InfoNCE(temperature=0.05)`` on random ``query[B,D]``, ``positive[B,D]`` (in-batch
negatives only, so candidates N = B), one forward + backward; "tiled" is ``tile_size``
(default 4096), "dense" is ``tile_size=0``. Time: one timed step after a small warm-up
(wall clock; the median of ``--reps`` steps when asked for more).

Memory, "extra": peak memory above the inputs and their gradients, i.e. everything the loss
itself needs (normalised copies, the scaled rows, accumulators, tiles or the dense matrix).

- CPU: every configuration runs in a fresh subprocess with ``MALLOC_MMAP_THRESHOLD_=65536``
  (so glibc returns freed large blocks to the OS and RSS follows the live tensors). After
  the inputs exist, the worker resets the kernel's peak-RSS mark (``/proc/self/clear_refs``)
  and reads ``VmHWM`` after the step: extra = VmHWM - RSS before the step - gradient bytes.
- CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus the
  allocated bytes before the step (the inputs) and the gradient bytes.

Dense runs are skipped above ``--dense-max`` (the ``B x B`` float32 matrix and its gradient
alone would be 2 * 4 * B^2 bytes: 34 GB at B = 65,536).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from vembed_blocks.losses import InfoNCE  # noqa: E402

GIB = 1024**3


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _step(batch: int, dim: int, tile: int, dtype: torch.dtype, device: str, seed: int = 0):
    """Inputs, then a closure running one forward + backward of the loss on them."""
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(batch, dim, generator=g, device=device, dtype=dtype).requires_grad_()
    p = torch.randn(batch, dim, generator=g, device=device, dtype=dtype).requires_grad_()
    loss = InfoNCE(temperature=0.05, tile_size=tile)

    def run() -> None:
        q.grad = p.grad = None
        loss(q, p).backward()

    grad_bytes = 2 * batch * dim * q.element_size()
    return run, grad_bytes


def worker_cpu(batch: int, dim: int, tile: int, reps: int) -> dict:
    """Runs inside a fresh subprocess: one configuration, CPU."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    warm, _ = _step(256, dim, min(tile, 64) if tile else 0, torch.float32, "cpu", seed=1)
    warm()  # load kernels and thread pools before measuring
    del warm
    run, grad_bytes = _step(batch, dim, tile, torch.float32, "cpu")
    times = []
    extra = 0
    for _ in range(reps):
        base = _rss_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
        # The first step allocates the gradients; later steps reuse nothing (grads set to None).
        extra = max(extra, _rss_bytes("VmHWM") - base - grad_bytes)
    return {"time_s": statistics.median(times), "extra_bytes": extra}


def measure_cpu(batch: int, dim: int, tile: int, reps: int) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps([batch, dim, tile, reps])]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_cuda(batch: int, dim: int, tile: int, reps: int, dtype: torch.dtype) -> dict:
    try:
        warm, _ = _step(1024, dim, min(tile, 256) if tile else 0, dtype, "cuda", seed=1)
        warm()
        del warm
        run, grad_bytes = _step(batch, dim, tile, dtype, "cuda")
        times, extra = [], 0
        for _ in range(reps):
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            run()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            extra = max(extra, torch.cuda.max_memory_allocated() - base - grad_bytes)
        return {"time_s": statistics.median(times), "extra_bytes": extra}
    except torch.OutOfMemoryError:
        return {"error": "out of memory"}
    finally:
        torch.cuda.empty_cache()


def fmt(result: dict | None) -> tuple[str, str]:
    if result is None:
        return "-", "-"
    if "error" in result:
        return result["error"][:24], "-"
    return f"{result['extra_bytes'] / GIB:.3f} GiB", f"{result['time_s']:.2f} s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batches", default=None, help="comma-separated B (default: CPU 4k..64k; CUDA 4k..256k)")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--tile", type=int, default=4096)
    ap.add_argument("--dense-max", type=int, default=None, help="largest B run dense (default: CPU 16384, CUDA 65536)")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--no-million", action="store_true", help="CUDA: skip the 1,048,576-pair bf16 D=768 row")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker_cpu(*json.loads(args.worker))))
        return
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device")
    default_batches = "4096,8192,16384,32768,65536" + (",131072,262144" if cuda else "")
    batches = [int(b) for b in (args.batches or default_batches).split(",")]
    dense_max = args.dense_max or (65536 if cuda else 16384)
    where = torch.cuda.get_device_name() if cuda else f"CPU, {os.environ.get('BENCH_THREADS', '2')} threads"
    print(
        f"InfoNCE forward+backward, D={args.dim}, float32, tile={args.tile}, {where}; extra = peak above inputs+grads"
    )
    print(
        f"{'B':>9} | {'dense extra':>13} | {'dense time':>10} | {'tiled extra':>13} | {'tiled time':>10} | tiled/dense"
    )
    print("-" * 80)
    for b in batches:
        measure = (
            (lambda t: measure_cuda(b, args.dim, t, args.reps, torch.float32))
            if cuda
            else (lambda t: measure_cpu(b, args.dim, t, args.reps))
        )
        dense = measure(0) if b <= dense_max else None
        tiled = measure(args.tile)
        ratio = (
            f"{tiled['time_s'] / dense['time_s']:.2f}x" if dense and "time_s" in dense and "time_s" in tiled else "-"
        )
        print(
            f"{b:>9} | {fmt(dense)[0]:>13} | {fmt(dense)[1]:>10} | {fmt(tiled)[0]:>13} | {fmt(tiled)[1]:>10} | {ratio}",
            flush=True,
        )
    if cuda and not args.no_million:
        res = measure_cuda(1 << 20, 768, max(args.tile, 8192), 1, torch.bfloat16)
        extra, took = fmt(res)
        print(
            f"{1 << 20:>9} | {'(2.2 TB bf16)':>13} | {'-':>10} | {extra:>13} | {took:>10} | "
            f"bf16, D=768, tile={max(args.tile, 8192)}"
        )


if __name__ == "__main__":
    main()
