r"""Evaluate any exported model on a records file: metrics, top-k results, embeddings and a report.

Demo (no --model/--data): trains recipes/clip_t2i.py's demo in-process (a rendered image-caption set, a tiny
random CLIP) into <output>/demo/run, then evaluates its export on the demo's validation set and prints the
metrics, the best matches of a few queries and where the files are; a later bare run with the same --output
reuses that export. --relevance labels labels each caption by the colour and shape it names:

    python recipes/evaluate.py
    python recipes/evaluate.py --relevance labels
    torchrun --nproc_per_node=2 recipes/evaluate.py

The model folder may come from any recipe (clip_t2i: CLIP / SigLIP / composed or image-only towers;
text_t2t, distill: text encoders; qwen3_fsdp: Qwen3-VL embedding; colbert: ColBERT / ColQwen);
its family is detected from its files (`vembed_blocks.encoder.load_encoder`). One GPU, eight, two nodes:

    python recipes/evaluate.py --model runs/clip_t2i/final --data val.jsonl --output runs/eval
    python recipes/clip_t2i.py --vision-model facebook/dinov2-small --format i2i --data pairs.jsonl --output runs/sku
    python recipes/evaluate.py --model runs/sku/final --data products.jsonl --format i2i \
        --relevance labels --queries-in-corpus --output runs/eval_products
    torchrun --nproc_per_node=8 recipes/evaluate.py --model runs/qwen3_fsdp/final --data val.parquet \
        --format t2i --bf16 --output runs/eval_qwen3
    torchrun --nnodes 2 --node_rank $NODE_RANK --nproc_per_node=8 --master_addr $HEAD --master_port 29500 \
        recipes/evaluate.py --model runs/qwen3_fsdp/final --data val.parquet --format t2i --bf16 --output /shared/eval

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
import runpy

import torch
from safetensors.torch import save_file

from vembed_blocks.data.columns import parse_columns, parse_csv_delimiter
from vembed_blocks.data.records import FORMATS, load_records
from vembed_blocks.demo import COLOURS, SHAPES
from vembed_blocks.distributed import init_distributed, shutdown_distributed
from vembed_blocks.embed import (
    RELEVANCE,
    embed_on_all_ranks,
    retrieval_set_for,
    self_excluded_scores,
    top_docs,
    top_scores,
)
from vembed_blocks.encoder import Encoder, load_encoder
from vembed_blocks.metrics import check_embeddings, format_table, recall_curve, retrieval_metrics
from vembed_blocks.run_log import write_args
from vembed_blocks.user_errors import report_user_errors

log = logging.getLogger("evaluate")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a folder a recipe exported (its family is detected); default: the demo's")
    p.add_argument("--data", help="records file (JSONL/CSV/Parquet) with queries and positives; default: the demo's")
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
    p.add_argument("--show", type=int, default=3, help="print the best --show-k matches of the first N queries")
    p.add_argument("--show-k", type=int, default=3, help="matches printed per query (--show)")
    p.add_argument("--demo-quick", action="store_true", help="demo: clip_t2i's quick demo (a smaller set and model)")
    p.add_argument("--output", default="runs/eval")
    p.add_argument("--columns", help="the file's column names for the fields, e.g. 'query=Query,positive=Positive'")
    p.add_argument("--csv-delimiter", help="CSV field separator (default: ',', or sniffed from the header, e.g. ';')")
    p.add_argument("--debug", action="store_true", help="show the full traceback of a user error (also VEMBED_DEBUG=1)")
    args = p.parse_args(argv)
    if (args.model is None) != (args.data is None):  # neither: the demo
        p.error("--model is required with --data" if args.model is None else "--data is required with --model")
    if args.demo_quick and args.model is not None:
        p.error("--demo-quick is for the demo (neither --model nor --data)")
    try:
        args.ks_list = sorted({int(k) for k in args.ks.split(",")})
    except ValueError:
        p.error(f"--ks must be comma-separated integers, got {args.ks!r}")
    if args.queries_in_corpus and args.relevance != "labels":
        p.error("--queries-in-corpus needs --relevance labels")
    if min(args.ks_list) <= 0 or args.batch_size <= 0 or min(args.top_k, args.curve_k, args.show, args.show_k) < 0:
        p.error("--ks, --batch-size must be positive; --top-k, --curve-k, --show, --show-k not negative")
    return args


# ----------------------------------------------------------------------------- the demo (no --model/--data)


def demo_export(args: argparse.Namespace, rank: int, world: int) -> None:
    """Point --model / --data at clip_t2i's demo: its export and validation set, training it first (in-process,
    into ``<output>/demo/run``) unless a finished run of the same size is there. --relevance labels: a copy of
    the validation set labelled by `label_by_object`."""
    run = os.path.join(args.output, "demo", "run")
    if finished_demo(run, args.demo_quick):
        log.info("reusing the demo model trained earlier in %s (delete that folder to train it again)", run)
    else:
        clip = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "clip_t2i.py"))
        # Its main ends by destroying the process group; init_distributed creates a fresh one for ours.
        clip["main"](["--output", run, "--num-workers", "0", *["--demo-quick"] * args.demo_quick])
        init_distributed()
    args.model, args.data = os.path.join(run, "final"), os.path.join(run, "demo", "val.jsonl")
    if args.relevance == "labels":
        labelled = os.path.join(run, "demo", "val_labels.jsonl")  # next to val.jsonl: its image paths are relative
        if rank == 0:
            label_by_object(args.data, labelled)
        if world > 1:
            torch.distributed.barrier()
        args.data = labelled


def finished_demo(run: str, quick: bool) -> bool:
    """Whether ``run`` holds a finished clip_t2i demo (its export and final metrics) of this size."""
    try:
        with open(os.path.join(run, "args.json")) as f:
            saved = json.load(f)
    except FileNotFoundError:
        return False
    done = all(os.path.exists(os.path.join(run, f)) for f in ("final/config.json", "metrics.json"))
    return done and saved.get("data") is None and saved.get("demo_quick") == quick


def label_by_object(src: str, dst: str) -> str:
    """Write ``src`` (demo rows) to ``dst`` with a ``label`` per row: the colour and shape its caption names
    ("red circle"), so every render of that object, at any position, is relevant to the caption."""
    rows = []
    with open(src) as f:
        for n, line in enumerate(f, 1):
            row = json.loads(line)
            words = set(row["query"].replace(",", " ").split())
            colours, shapes = [c for c in COLOURS if c in words], [s for s in SHAPES if s in words]
            if len(colours) != 1 or len(shapes) != 1:
                raise ValueError(f"{src}:{n}: expected one colour and one shape word in {row['query']!r}")
            rows.append(row | {"label": f"{colours[0]} {shapes[0]}"})
    with open(dst + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(dst + ".tmp", dst)
    return dst


# ----------------------------------------------------------------------------- embed, score, write


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


def rank(args: argparse.Namespace, enc: Encoder, rs, q, d) -> tuple[torch.Tensor, list, tuple]:
    """``(scores, relevant, best)``: what the metrics read (`embed.top_scores`), and each query's best corpus
    items ``(scores[Q, k], corpus indices[Q, k])``, best first, ties to the lower index, its own item
    (labels) left out, for topk.jsonl and the examples. Unit vectors: the corpus ranked once, tile by tile
    (`embed.top_docs`), never the ``[Q, N]`` matrix; multi-vector models: the MaxSim matrix, computed once."""
    depth = min(max([*args.ks_list, args.curve_k, args.top_k, args.show_k]), len(rs.docs))
    if not enc.multi_vector:
        best = top_docs(rs, q, d, depth)
        return (*top_scores(rs, q, d, depth, best=best), best)
    scores = self_excluded_scores(rs, enc.similarity(q, d))
    vals, idx = torch.sort(scores.float(), dim=1, descending=True, stable=True)
    return scores, rs.relevant, (vals[:, : depth + 1], idx[:, : depth + 1])


def topk_rows(rs, best: tuple[torch.Tensor, torch.Tensor], k: int):
    """Yield, for each query of ``best`` (`rank`), its ``k`` best corpus items with score and relevance;
    the query's own item (labels) is never listed."""
    self_doc = getattr(rs, "self_doc", [None] * len(rs.queries))
    vals, order = best[0].float(), best[1].tolist()
    for qi, ranked in enumerate(order):
        ranked = [(r, j) for r, j in enumerate(ranked) if j >= 0 and j != self_doc[qi]][:k]
        row = {"query_index": qi, "query": vars(rs.queries[qi]), "num_relevant": len(rs.relevant[qi])}
        if hasattr(rs, "query_labels"):
            row["label"] = rs.query_labels[qi]
        row["results"] = [
            {"rank": n + 1, "corpus_index": j, "score": vals[qi, r].item(), "relevant": j in rs.relevant[qi]}
            | vars(rs.docs[j])
            for n, (r, j) in enumerate(ranked)
        ]
        yield row


def write_topk(path: str, rs, best: tuple[torch.Tensor, torch.Tensor], k: int) -> None:
    """``topk.jsonl``: one JSON line per query (`topk_rows`)."""
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in topk_rows(rs, best, k))


def describe(item: dict) -> str:
    """An item as one short string: its image paths (relative to the working directory when under it), then its
    text quoted."""
    images = [p if os.path.relpath(p).startswith("..") else os.path.relpath(p) for p in item["images"]]
    return " + ".join([*images, *([repr(item["text"])] if item["text"] else [])])


def print_examples(rs, best: tuple[torch.Tensor, torch.Tensor], n: int, k: int) -> None:
    """The first ``n`` queries and their ``k`` best corpus items (``*`` marks a relevant one)."""
    for row in topk_rows(rs, (best[0][:n], best[1][:n]), min(k, len(rs.docs))):
        label = f", label {row['label']!r}" if "label" in row else ""
        print(f"query {row['query_index']}: {describe(row['query'])} ({row['num_relevant']} relevant{label})")
        for hit in row["results"]:
            print(f"  {hit['rank']:>2}. {hit['score']:7.4f} {'*' if hit['relevant'] else ' '} {describe(hit)}")


def score_and_write(args: argparse.Namespace, enc: Encoder, rs, q, d) -> dict[str, float]:
    """Metrics, recall curve, top-k, embeddings, metrics.json and report.md (rank 0)."""
    from vembed_blocks.report import write_report

    for name, emb in (("query embeddings", q), ("corpus embeddings", d)):  # all one vector: metrics mean nothing
        finding = check_embeddings(name, *(emb if isinstance(emb, tuple) else (emb,)))
        if finding:
            log.warning(finding)
    scores, relevant, best = rank(args, enc, rs, q, d)  # dot products of unit vectors (as the recipes), or MaxSim
    metrics = retrieval_metrics(scores, relevant, ks=args.ks_list)
    unscored = sum(not r for r in rs.relevant)
    if unscored:
        log.warning(
            "%d of %d queries have no relevant corpus item: left out of the averages", unscored, len(rs.queries)
        )
    result: dict = {"after": metrics}
    if args.curve_k:
        result["recall_curve"] = {"after": recall_curve(scores, relevant, max_k=args.curve_k)}
    result["counts"] = {"queries": len(rs.queries), "corpus": len(rs.docs), "queries_without_relevant": unscored}
    save_embeddings(args.output, rs, q, d)
    if args.top_k:
        write_topk(os.path.join(args.output, "topk.jsonl"), rs, best, min(args.top_k, len(rs.docs)))
    with open(os.path.join(args.output, "metrics.json"), "w") as f:
        json.dump(result, f, indent=1)
    names = [n for n in ("recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10") if n in metrics] or list(metrics)
    print(format_table(metrics, names=names, label=enc.family), flush=True)
    print_examples(rs, best, args.show, args.show_k)
    log.info("wrote %s", write_report(args.output))
    files = sorted(f for f in os.listdir(args.output) if os.path.isfile(os.path.join(args.output, f)))
    print(f"wrote to {args.output}: {', '.join(files)}", flush=True)
    return metrics


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the evaluation; returns the metrics on rank 0 (``{}`` on other ranks)."""
    args = parse_args(argv)
    rank, world, device = init_distributed()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(asctime)s %(message)s")
    demo = args.model is None
    if demo:  # no --model/--data: clip_t2i's demo export
        demo_export(args, rank, world)
    overrides = dict(query_instruction=args.query_instruction, doc_instruction=args.doc_instruction)
    overrides.update(max_length=args.max_length, max_image_side=args.max_image_side)
    columns = parse_columns(args.columns) if args.columns else None  # the file's own column names
    delimiter = parse_csv_delimiter(args.csv_delimiter) if args.csv_delimiter else None
    records = load_records(args.data, format=args.format, columns=columns, delimiter=delimiter)  # before the model
    rs = retrieval_set_for(records, args.relevance, not args.no_negatives, args.queries_in_corpus)
    enc = load_encoder(args.model, device=device, dtype=args.dtype, batch_size=args.batch_size, **overrides)
    if rank == 0:
        args.world_size, args.family = world, enc.family
        write_args(vars(args), args.output)
    log.info("%s model; %d queries, %d corpus items from %s", enc.family, len(rs.queries), len(rs.docs), args.data)
    q, d = embed_sides(args, enc, rs, device)
    metrics = score_and_write(args, enc, rs, q, d) if rank == 0 else {}
    if demo and rank == 0:
        print(f"model: {args.model} (trained by recipes/clip_t2i.py: {os.path.dirname(args.model)})", flush=True)
    shutdown_distributed()
    return metrics


if __name__ == "__main__":
    with report_user_errors():  # a mistake in flags, files or rows: one line (--debug: the traceback)
        main()
