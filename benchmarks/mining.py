"""Time and peak memory of mine_hard_negatives, without and with candidate tiling; prints a markdown table.

    python benchmarks/mining.py                                  # 2,000 x 1M x 384 float32, k=8
    python benchmarks/mining.py --candidates 20000               # a quick check of the script itself
    git show HEAD:vembed_blocks/mining.py > /tmp/mining_head.py
    python benchmarks/mining.py --reference /tmp/mining_head.py  # + a row for another implementation

Workload: random normalised float32 ``query[Q,D]`` and ``candidates[N,D]``, a random positive per
query, ``k`` hard negatives with ``--margin`` (default 0.05) and ``--max-ratio`` (default none).
Rows: "no tiling" is ``candidate_block=N`` (every chunk of ``chunk_size`` queries scores all N
candidates at once, as before tiling); "tiled (default)" is ``candidate_block=None`` (auto-sized:
a ~256 MiB float32 score tile); ``--reference`` adds a row running ``mine_hard_negatives`` from
that file with its own defaults.

Each row runs in a fresh subprocess (``MALLOC_MMAP_THRESHOLD_=65536``, so freed large blocks go
back to the OS) on ``BENCH_THREADS`` threads (default 2). After the inputs exist and a tiny
warm-up call, the worker resets the peak-RSS mark (``/proc/self/clear_refs`` <- "5"), mines once
(wall clock) and reads ``VmHWM``: "peak above inputs" = VmHWM - VmRSS before the call. The rows'
indices are compared with the first row's ("same": every index equal).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
GIB = 1024**3


def _proc_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _load(reference: str | None):
    if not reference:
        from vembed_blocks.mining import mine_hard_negatives

        return mine_hard_negatives
    spec = importlib.util.spec_from_file_location("mining_reference", reference)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.mine_hard_negatives


def worker(cfg: dict) -> dict:
    """Runs inside a fresh subprocess: one configuration."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    mine = _load(cfg["reference"])
    kw = {} if cfg["reference"] else {"candidate_block": cfg["block"]}
    g = torch.Generator().manual_seed(0)
    cand = torch.randn(cfg["n"], cfg["dim"], generator=g)
    cand /= cand.norm(dim=1, keepdim=True)
    query = torch.randn(cfg["q"], cfg["dim"], generator=g)
    query /= query.norm(dim=1, keepdim=True)
    pos = torch.randint(0, cfg["n"], (cfg["q"],), generator=g)
    mine(query[:4], cand[:64], pos[:4] % 64, 2, margin=0.1)  # load kernels and thread pools
    base = _proc_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
    start = time.perf_counter()
    idx, _ = mine(query, cand, pos, cfg["k"], margin=cfg["margin"], max_ratio=cfg["max_ratio"], **kw)
    took = time.perf_counter() - start
    extra = _proc_bytes("VmHWM") - base
    torch.save(idx, cfg["out"])
    return {"time_s": took, "extra_bytes": extra}


def measure(cfg: dict) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cfg)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--candidates", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--margin", type=float, default=0.05)
    ap.add_argument("--max-ratio", type=float, default=None)
    ap.add_argument("--reference", default=None, help="a .py file with another mine_hard_negatives: one more row")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    n = args.candidates
    base = {"q": args.queries, "n": n, "dim": args.dim, "k": args.k, "margin": args.margin}
    base["max_ratio"] = args.max_ratio
    rows = [("no tiling", n, None), ("tiled (default)", None, None)]
    if args.reference:
        rows.append((f"reference: {os.path.basename(args.reference)}", "-", args.reference))
    threads = os.environ.get("BENCH_THREADS", "2")
    print(
        f"mine_hard_negatives: {args.queries:,} queries x {n:,} candidates x {args.dim} float32, k={args.k}, "
        f"margin={args.margin}, max_ratio={args.max_ratio}; CPU, {threads} threads\n"
    )
    print("| configuration | candidate_block | time | peak RSS above inputs | same indices as first row |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        first = None
        for i, (name, block, reference) in enumerate(rows):
            out = os.path.join(tmp, f"{i}.pt")
            res = measure({**base, "block": block, "reference": reference, "out": out})
            if "error" in res:
                print(f"| {name} | {block or 'auto'} | {res['error'][:40]} | - | - |", flush=True)
                continue
            idx = torch.load(out)
            first = idx if first is None else first
            same = "yes" if torch.equal(idx, first) else f"no ({int((idx != first).sum())} differ)"
            print(
                f"| {name} | {block or 'auto'} | {res['time_s']:.1f} s | {res['extra_bytes'] / GIB:.2f} GiB | {same} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
