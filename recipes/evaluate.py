r"""Evaluate any exported model on a records file: metrics, top-k results, embeddings and a report.

The model folder may come from any recipe (clip_t2i: CLIP / SigLIP / composed or image-only towers;
text_t2t, distill: text encoders; qwen3_fsdp: Qwen3-VL embedding; colbert: ColBERT / ColQwen);
its family is detected from its files (`vembed_blocks.encoder.load_encoder`). Examples:

    python recipes/evaluate.py --model runs/clip_t2i/final --data val.jsonl --output runs/eval
    python recipes/evaluate.py --model runs/products/final --data products.jsonl --format i2i \
        --relevance labels --queries-in-corpus --output runs/eval_products
    torchrun --nproc_per_node=8 recipes/evaluate.py --model runs/qwen3/final --data val.parquet \
        --format t2i --bf16 --output runs/eval_qwen3

--relevance positives (default): queries are the unique queries of --data, the corpus its unique
positives and hard negatives (distractors), and a query is relevant to the positives of every row
it appears in. --relevance labels: every corpus item with the query's label is relevant, the
query's own item excluded when it is in the corpus (--queries-in-corpus adds every query to it:
a set searched against itself, as product / class retrieval is reported).

Writes to --output: metrics.json ({"after": metrics, "recall_curve": {"after": [r@1..r@K]},
"counts": ...}), topk.jsonl (per query: its k best corpus items with scores and relevance),
queries.safetensors / corpus.safetensors (key "embeddings", L2-normalised float32, rows in
first-appearance order; multi-vector models add "mask") with items.json (which item each row is;
the layout distill's --teacher-embeddings reads), args.json and report.md. With torchrun every
rank embeds a share; rank 0 scores and writes. Use the training run's --format / --bf16 to
reproduce its final metrics.
"""

from __future__ import annotations

import argparse
import json
import logging
import os

import torch
from safetensors.torch import save_file

from vembed_blocks.data import load_records
from vembed_blocks.data.records import FORMATS
from vembed_blocks.distributed import init_distributed, shutdown_distributed
from vembed_blocks.embed import RELEVANCE, embed_on_all_ranks, retrieval_set_for, self_excluded_scores
from vembed_blocks.encoder import Encoder, load_encoder
from vembed_blocks.metrics import format_table, recall_curve, retrieval_metrics
from vembed_blocks.run_log import write_args

log = logging.getLogger("evaluate")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a folder a recipe exported (its family is detected)")
    p.add_argument("--data", required=True, help="records file (JSONL/CSV/Parquet) with queries and positives")
    p.add_argument("--format", choices=FORMATS, help="declare the data format (else detected per row)")
    p.add_argument("--relevance", choices=RELEVANCE, default="positives", help="what makes a corpus item relevant")
    p.add_argument("--queries-in-corpus", action="store_true", help="labels: add every query to the corpus")
    p.add_argument("--no-negatives", action="store_true", help="leave hard negatives out of the corpus")
    p.add_argument("--batch-size", type=int, default=128, help="items per forward")
    p.add_argument("--ks", default="1,5,10", help="cut-offs for the metrics")
    p.add_argument("--top-k", type=int, default=10, help="corpus items per query in topk.jsonl (0: no file)")
    p.add_argument("--curve-k", type=int, default=100, help="recall@1..K in metrics.json and the report")
    p.add_argument("--bf16", action="store_true", help="autocast to bf16 (as a training run with --bf16)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="cast the weights (GPU memory)")
    p.add_argument("--query-instruction", help="override the folder's query instruction / prefix")
    p.add_argument("--doc-instruction", help="override the folder's document instruction / prefix")
    p.add_argument("--max-length", type=int, help="override the folder's text length cap (text, colbert)")
    p.add_argument("--max-image-side", type=int, help="override the folder's image size cap (vlm, colbert)")
    p.add_argument("--output", default="runs/eval")
    args = p.parse_args(argv)
    try:
        args.ks_list = sorted({int(k) for k in args.ks.split(",")})
    except ValueError:
        p.error(f"--ks must be comma-separated integers, got {args.ks!r}")
    if args.queries_in_corpus and args.relevance != "labels":
        p.error("--queries-in-corpus needs --relevance labels")
    if min(args.ks_list) <= 0 or args.batch_size <= 0 or args.top_k < 0 or args.curve_k < 0:
        p.error("--ks, --batch-size must be positive; --top-k, --curve-k not negative")
    return args


def embed_sides(args: argparse.Namespace, enc: Encoder, rs, device: torch.device):
    """(queries, corpus) embeddings: ``[n, D]``, or ``(tokens[n, L, D], mask[n, L])`` for multi-vector models.

    Every rank embeds an equal share (`embed_on_all_ranks`) in one `Encoder.encode` call, which
    batches by ``--batch-size`` and logs progress; every rank gets all rows.
    """

    def side(items, is_query: bool, desc: str):
        def run(share):
            with torch.autocast(device.type, torch.bfloat16, enabled=args.bf16):
                return enc.encode(share, is_query)

        return embed_on_all_ranks(items, run, batch_size=len(items), desc=desc)

    return side(rs.queries, True, "embed queries"), side(rs.docs, False, "embed corpus")


def save_embeddings(out: str, rs, q, d) -> None:
    """``queries.safetensors`` / ``corpus.safetensors`` + ``items.json`` (the layout `TeacherStore` reads)."""
    for name, emb in (("queries", q), ("corpus", d)):
        tensors = {"embeddings": emb[0], "mask": emb[1]} if isinstance(emb, tuple) else {"embeddings": emb}
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out, f"{name}.safetensors"))
    items = {"queries": [vars(i) for i in rs.queries], "corpus": [vars(i) for i in rs.docs]}
    if hasattr(rs, "query_labels"):
        items.update(query_labels=rs.query_labels, corpus_labels=rs.doc_labels)
    with open(os.path.join(out, "items.json"), "w") as f:
        json.dump(items, f)


def write_topk(path: str, rs, scores: torch.Tensor, k: int, chunk: int = 1024) -> None:
    """One JSON line per query: its ``k`` best corpus items (ties to the lower index, as the metrics rank),
    with score and relevance; the query's own item (``--relevance labels``) is never listed."""
    self_doc = getattr(rs, "self_doc", [None] * len(rs.queries))
    with open(path, "w") as f:
        for start in range(0, len(rs.queries), chunk):
            block = scores[start : start + chunk].float()
            order = torch.sort(block, dim=1, descending=True, stable=True).indices[:, : k + 1].tolist()
            for i, ranked in enumerate(order):
                qi = start + i
                ranked = [j for j in ranked if j != self_doc[qi]][:k]
                row = {"query_index": qi, "query": vars(rs.queries[qi]), "num_relevant": len(rs.relevant[qi])}
                if hasattr(rs, "query_labels"):
                    row["label"] = rs.query_labels[qi]
                row["results"] = [
                    {"rank": r + 1, "corpus_index": j, "score": block[i, j].item(), "relevant": j in rs.relevant[qi]}
                    | vars(rs.docs[j])
                    for r, j in enumerate(ranked)
                ]
                f.write(json.dumps(row) + "\n")


def score_and_write(args: argparse.Namespace, enc: Encoder, rs, q, d) -> dict[str, float]:
    """Metrics, recall curve, top-k, embeddings, metrics.json and report.md (rank 0)."""
    from vembed_blocks.report import write_report

    # Unit vectors: dot products (as the recipes score); multi-vector models: MaxSim.
    scores = self_excluded_scores(rs, enc.similarity(q, d) if enc.multi_vector else q @ d.T)
    metrics = retrieval_metrics(scores, rs.relevant, ks=args.ks_list)
    unscored = sum(not r for r in rs.relevant)
    if unscored:
        log.warning(
            "%d of %d queries have no relevant corpus item: left out of the averages", unscored, len(rs.queries)
        )
    result: dict = {"after": metrics}
    if args.curve_k:
        result["recall_curve"] = {"after": recall_curve(scores, rs.relevant, max_k=args.curve_k)}
    result["counts"] = {"queries": len(rs.queries), "corpus": len(rs.docs), "queries_without_relevant": unscored}
    save_embeddings(args.output, rs, q, d)
    if args.top_k:
        write_topk(os.path.join(args.output, "topk.jsonl"), rs, scores, min(args.top_k, len(rs.docs)))
    with open(os.path.join(args.output, "metrics.json"), "w") as f:
        json.dump(result, f, indent=1)
    names = [n for n in ("recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10") if n in metrics] or list(metrics)
    print(format_table(metrics, names=names, label=enc.family), flush=True)
    log.info("wrote %s", write_report(args.output))
    return metrics


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the evaluation; returns the metrics on rank 0 (``{}`` on other ranks)."""
    args = parse_args(argv)
    rank, world, device = init_distributed()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(asctime)s %(message)s")
    overrides = dict(query_instruction=args.query_instruction, doc_instruction=args.doc_instruction)
    overrides.update(max_length=args.max_length, max_image_side=args.max_image_side)
    records = load_records(args.data, format=args.format)  # bad data fails before a large model loads
    rs = retrieval_set_for(records, args.relevance, not args.no_negatives, args.queries_in_corpus)
    enc = load_encoder(args.model, device=device, dtype=args.dtype, batch_size=args.batch_size, **overrides)
    if rank == 0:
        args.world_size, args.family = world, enc.family
        write_args(args, args.output)
    log.info("%s model; %d queries, %d corpus items from %s", enc.family, len(rs.queries), len(rs.docs), args.data)
    q, d = embed_sides(args, enc, rs, device)
    metrics = score_and_write(args, enc, rs, q, d) if rank == 0 else {}
    shutdown_distributed()
    return metrics


if __name__ == "__main__":
    main()
