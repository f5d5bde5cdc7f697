"""Evaluate an exported dual encoder on a records file: embed, save embeddings, print retrieval metrics.

    python recipes/evaluate.py --model runs/clip_t2i/final --data val.jsonl --output runs/eval

The queries are the unique queries of --data, the corpus its unique positives and hard
negatives (distractors); a query is relevant to the positives of every row it appears in.
Writes <output>/queries.safetensors and <output>/corpus.safetensors (key "embeddings",
L2-normalised float32, rows in first-appearance order, with the items listed in
<output>/items.json) and <output>/metrics.json, and prints the table. Use the same
--format/--bf16 as in training to reproduce the training run's final metrics.
"""

from __future__ import annotations

import argparse
import json
import logging
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from vembed_blocks import DualEncoderCollator, dual_encoder_features, load_records, retrieval_metrics
from vembed_blocks.embed import embed_items, retrieval_set
from vembed_blocks.towers import load_dual_encoder, text_padding

log = logging.getLogger("evaluate")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", required=True, help="exported folder (or HF id) of a CLIP/SigLIP model or of composed towers"
    )
    p.add_argument("--data", required=True, help="records file (JSONL/CSV/Parquet) with queries and positives")
    p.add_argument("--format", choices=["t2i", "i2t", "i2i", "t2t"], help="declare the data format (else detected)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--ks", default="1,5,10", help="cut-offs for the metrics")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--output", default="runs/eval")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, processor = load_dual_encoder(args.model)  # an HF dual encoder or composed towers
    model = model.to(device).eval()
    collator = DualEncoderCollator(processor, **text_padding(model))  # SigLIP: max_length=64 padding

    records = load_records(args.data, format=args.format)
    rs = retrieval_set(records)
    log.info("%d queries, %d corpus items from %s", len(rs.queries), len(rs.docs), args.data)

    def encoder(is_query: bool):
        @torch.no_grad()
        def run(items):
            inputs = {k: v.to(device) for k, v in collator.encode(items, is_query).items()}
            with torch.autocast(device.type, torch.bfloat16, enabled=args.bf16):
                return F.normalize(dual_encoder_features(model, inputs).float(), dim=-1)

        return run

    q = embed_items(rs.queries, encoder(True), args.batch_size, "embed queries")
    d = embed_items(rs.docs, encoder(False), args.batch_size, "embed corpus")
    os.makedirs(args.output, exist_ok=True)
    save_file({"embeddings": q.contiguous()}, os.path.join(args.output, "queries.safetensors"))
    save_file({"embeddings": d.contiguous()}, os.path.join(args.output, "corpus.safetensors"))
    with open(os.path.join(args.output, "items.json"), "w") as f:
        json.dump({"queries": [vars(i) for i in rs.queries], "corpus": [vars(i) for i in rs.docs]}, f)

    metrics = retrieval_metrics(q @ d.T, rs.relevant, ks=[int(k) for k in args.ks.split(",")])
    with open(os.path.join(args.output, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    width = max(len(n) for n in metrics)
    print("\n".join(f"{n:<{width}}  {v:.4f}" for n, v in metrics.items()), flush=True)
    return metrics


if __name__ == "__main__":
    main()
