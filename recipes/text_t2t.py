"""Fine-tune a text bi-encoder (BERT, MiniLM, BGE, Qwen3-Embedding) with InfoNCE, CoSENT or Triplet.

    python recipes/text_t2t.py --model sentence-transformers/all-MiniLM-L6-v2 --data train.jsonl --val-data val.jsonl
    torchrun --nproc_per_node=8 recipes/text_t2t.py --model BAAI/bge-base-en-v1.5 --data train.jsonl \
        --val-data val.jsonl --mine-negatives 4 --mine-margin 0.05 --batch-size 128 --chunk-size 32 --bf16

Rows: {"query", "positive", "negatives"?, "label"?, "score"?}. --model: a plain HF folder/id (mean
pooling, L2-normalised) or a sentence-transformers folder (pooling, normalisation, max length and
prompts from its files). CoSENT reads each pair's gold score from "score", else a numeric "label".
--mine-negatives K: embed the corpus with the model as loaded, mine K negatives per row, train on
<output>/mined.jsonl. Writes train_log.jsonl, metrics.json ({"before", "after"}), checkpoints
(--resume) and final/ (an HF folder that is also a sentence-transformers folder). docs/recipes/text_t2t.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from vembed_blocks import (
    CoSENT,
    InfoNCE,
    Matryoshka,
    Triplet,
    get_rank,
    get_world_size,
    init_distributed,
    retrieval_metrics,
)
from vembed_blocks.checkpoint import export_pretrained, latest_checkpoint, load_checkpoint, save_checkpoint
from vembed_blocks.data import TaskBatches, TextCollator, WeightedTaskSampler, load_records, scatter_negatives
from vembed_blocks.distributed import gather_with_grad, mean_over_ranks, shutdown_distributed
from vembed_blocks.embed import retrieval_set
from vembed_blocks.gradcache import GradCache
from vembed_blocks.mining import mine_hard_negatives
from vembed_blocks.parallel import (
    apply_lora,
    checkpoint_layers,
    clip_gradients,
    compile_layers,
    one_gradient_sync,
    wrap_ddp,
)
from vembed_blocks.pooling import POOL_METHODS
from vembed_blocks.schedule import warmup_cosine
from vembed_blocks.text_encoder import embed_texts, load_text_encoder, text_features, write_st_files

log = logging.getLogger("text_t2t")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF id or local folder (plain HF or sentence-transformers)")
    p.add_argument("--data", required=True, help="training file (JSONL/CSV/Parquet), T2T rows")
    p.add_argument("--val-data", help="validation file for before/after retrieval metrics")
    p.add_argument("--loss", choices=["infonce", "cosent", "triplet"], default="infonce")
    p.add_argument("--temperature", type=float, default=0.05, help="InfoNCE temperature")
    p.add_argument("--symmetric", action="store_true", help="InfoNCE: also doc->query")
    p.add_argument("--margin", type=float, default=0.2, help="Triplet margin (cosine distance)")
    p.add_argument("--pooling", choices=POOL_METHODS, help="default: the folder's 1_Pooling, else mean")
    p.add_argument("--max-length", type=int, help="token cap; default: the folder's max_seq_length, else 512")
    p.add_argument("--query-prefix", help="prepended to queries; default: the folder's 'query' prompt")
    p.add_argument("--doc-prefix", help="prepended to documents; default: the folder's 'document' prompt")
    p.add_argument("--mine-negatives", type=int, default=0, help="mine K hard negatives per row before training")
    p.add_argument("--mine-margin", type=float, help="skip candidates scoring above (positive - margin)")
    p.add_argument("--mine-ratio", type=float, help="skip candidates scoring above ratio * positive")
    p.add_argument("--batch-size", type=int, default=64, help="rows per rank per step")
    p.add_argument("--chunk-size", type=int, default=0, help="GradCache rows per chunk (0 = off)")
    p.add_argument("--lora", type=int, default=0, help="LoRA rank (0 = full fine-tuning)")
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--mrl-dims", help="Matryoshka dims, e.g. '384,256,128'")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, help="overrides --epochs")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm (0 = off)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the encoder")
    p.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing of every block")
    p.add_argument("--compile", action="store_true", help="torch.compile every block in place")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers (tokenisation)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=0, help="retrieval metrics on --val-data every N steps (0 = off)")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0 = at the end only)")
    p.add_argument("--resume", action="store_true", help="continue from <output>/checkpoints")
    p.add_argument("--stop-at", type=int, help="save and exit at this step (split a run across jobs; then --resume)")
    p.add_argument("--eval-batch-size", type=int, default=128)
    p.add_argument("--output", default="runs/text_t2t")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- pieces of the loop


def load_encoder(args: argparse.Namespace):
    """(model, collator, cfg): the folder's pooling/normalisation/length/prompts, overridden by the flags."""
    return load_text_encoder(
        args.model,
        pooling=args.pooling,
        max_length=args.max_length,
        query_prefix=args.query_prefix,
        doc_prefix=args.doc_prefix,
    )


def evaluate(model: nn.Module, collator: TextCollator, cfg, path: str, args) -> dict[str, float]:
    """Cosine retrieval of the unique positives (+ negatives) of ``path`` for its unique queries."""
    rs = retrieval_set(load_records(path, format="t2t"))
    q = embed_texts(model, collator, cfg, [i.text for i in rs.queries], True, args.eval_batch_size, args.bf16)
    d = embed_texts(model, collator, cfg, [i.text for i in rs.docs], False, args.eval_batch_size, args.bf16)
    return retrieval_metrics(F.normalize(q, dim=-1) @ F.normalize(d, dim=-1).T, rs.relevant, ks=(1, 5, 10))


def make_loss(args: argparse.Namespace) -> nn.Module:
    if args.loss == "cosent":
        loss = CoSENT()
    elif args.loss == "triplet":
        loss = Triplet(margin=args.margin)
    else:
        loss = InfoNCE(temperature=args.temperature, symmetric=args.symmetric)
    return Matryoshka(loss, [int(d) for d in args.mrl_dims.split(",")]) if args.mrl_dims else loss


def collate(collator: TextCollator, records: list) -> dict:
    """The collator's batch plus ``scores[B]`` when every row has a numeric "score" (or "label")."""
    batch = collator(records)
    scores = [r.extra.get("score", r.label) for r in records]
    if all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores):
        batch["scores"] = torch.tensor(scores, dtype=torch.float)
    return batch


# ----------------------------------------------------------------------------- main


def prepare(args: argparse.Namespace, model: nn.Module, collator: TextCollator, cfg) -> str:
    """The training file: --data, or with --mine-negatives a copy with mined negatives (<output>/mined.jsonl)."""
    mined = os.path.join(args.output, "mined.jsonl")
    if not args.mine_negatives or (args.resume and os.path.exists(mined)):  # resume: the negatives of the first launch
        return mined if args.mine_negatives else args.data
    records = load_records(args.data, format="t2t")
    rs = retrieval_set(records)
    q_of, d_of = {q: i for i, q in enumerate(rs.queries)}, {d: i for i, d in enumerate(rs.docs)}
    rank, world = get_rank(), get_world_size()

    def embed_all(items: list, is_query: bool) -> torch.Tensor:  # each rank a contiguous slice, gathered in order
        lo, hi = len(items) * rank // world, len(items) * (rank + 1) // world
        part = embed_texts(
            model, collator, cfg, [i.text for i in items[lo:hi] or items[:1]], is_query, args.eval_batch_size, args.bf16
        )
        device = next(model.parameters()).device
        return gather_with_grad(part[: hi - lo].to(device)).cpu()

    q, d = embed_all(rs.queries, True), embed_all(rs.docs, False)
    if rank == 0:
        rows = [(q_of[r.query], d_of[r.positive], r) for r in records]
        k = min(len(rs.docs), args.mine_negatives + max(len(s) for s in rs.relevant))  # room to drop other positives
        idx, _ = mine_hard_negatives(
            q[[a for a, _, _ in rows]],
            d,
            torch.tensor([b for _, b, _ in rows]),
            k,
            margin=args.mine_margin,
            max_ratio=args.mine_ratio,
        )
        with open(mined + ".tmp", "w") as f:
            for (qi, _, r), cand in zip(rows, idx.tolist()):
                found = [rs.docs[j].text for j in cand if j >= 0 and j not in rs.relevant[qi]][: args.mine_negatives]
                negs = list(dict.fromkeys([n.text for n in r.negatives] + found))
                row = {**r.extra, "query": r.query.text, "positive": r.positive.text, "negatives": negs}
                f.write(json.dumps(row | ({"label": r.label} if r.label is not None else {})) + "\n")
        os.replace(mined + ".tmp", mined)
        log.info("mined %d negatives for each of %d rows -> %s", args.mine_negatives, len(rows), mined)
    if world > 1:
        torch.distributed.barrier()
    return mined


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    rank, world, device = init_distributed()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(asctime)s %(message)s")
    torch.manual_seed(args.seed)
    os.makedirs(args.output, exist_ok=True)
    hf_model, collator, cfg = load_encoder(args)
    hf_model.to(device)
    for p in getattr(hf_model, "pooler", nn.Identity()).parameters():  # BERT's pooler head: pooling never uses it
        p.requires_grad_(False)  # (a parameter with no gradient gets no optimizer state, which resume would miss)
    data = prepare(args, hf_model, collator, cfg)
    if args.grad_checkpointing:
        checkpoint_layers(hf_model)
    if args.lora:
        hf_model = apply_lora(hf_model, r=args.lora, alpha=args.lora_alpha)
    if args.compile:
        compile_layers(hf_model)
    hf_model.train()
    model = wrap_ddp(hf_model)
    criterion = make_loss(args)

    train = load_records(data, format="t2t")
    sampler = WeightedTaskSampler({"train": len(train)}, args.batch_size, seed=args.seed, rank=rank, world_size=world)
    total = args.max_steps or max(1, round(args.epochs * math.ceil(len(train) / (args.batch_size * world))))
    params = [p for p in hf_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(args.warmup_steps, total))
    ckpt_dir = os.path.join(args.output, "checkpoints")
    start = 0
    if args.resume and latest_checkpoint(ckpt_dir) is not None:
        start = load_checkpoint(ckpt_dir, model=hf_model, optimizer=optimizer, sampler=sampler, scheduler=scheduler)
        log.info("resumed from %s at step %d", latest_checkpoint(ckpt_dir), start)

    val = args.val_data
    before_file = os.path.join(args.output, "metrics_before.json")
    if val and rank == 0 and (start == 0 or not os.path.exists(before_file)):
        with open(before_file, "w") as f:
            json.dump(evaluate(hf_model, collator, cfg, val, args), f)

    end = min(total, args.stop_at or total)
    batches = TaskBatches({"train": train}, sampler, functools.partial(collate, collator), steps=end - start)
    # Own generator: iter(DataLoader) would otherwise draw from the global RNG (dropout), and it runs at a
    # different point of a resumed run than of an uninterrupted one.
    loader = DataLoader(
        batches, batch_size=None, num_workers=args.num_workers, generator=torch.Generator().manual_seed(args.seed)
    )
    log.info(
        "training steps %d -> %d of %d, %d rows/step over %d rank(s)", start, end, total, args.batch_size * world, world
    )

    def evaluate_during(step: int) -> None:  # --eval-every: rank 0 scores; the others wait at the next collective
        # noqa below: main() deletes hf_model before shutdown, after the last call of this closure
        if val and rank == 0:
            metrics = evaluate(hf_model, collator, cfg, val, args)  # noqa: F821
            log.info(
                "eval step %d  R@1 %.4f  R@10 %.4f  MRR@10 %.4f",
                step,
                metrics["recall@1"],
                metrics["recall@10"],
                metrics["mrr@10"],
            )
            with open(os.path.join(args.output, "eval_log.jsonl"), "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")

    losses = train_loop(
        args,
        loader,
        model,
        criterion,
        optimizer,
        scheduler,
        sampler,
        hf_model,
        cfg,
        total,
        end,
        device,
        evaluate_during,
    )

    result = {"losses": losses}
    if end < total:
        log.info("stopped at step %d of %d; continue with --resume", end, total)
    else:
        result.update(finish(args, model, hf_model, collator, cfg, val, before_file))
    del model, hf_model  # the DDP wrapper must go before the process group (see shutdown_distributed)
    shutdown_distributed()
    return result


def train_loop(
    args, loader, model, criterion, optimizer, scheduler, sampler, state, cfg, total, end, device, evaluate_during
) -> list[float]:
    """The explicit loop: encode queries/docs/negatives (GradCache if --chunk-size), loss, step, log, save."""
    rank, world = get_rank(), get_world_size()
    gc = GradCache(chunk_size=args.chunk_size, sync_module=model) if args.chunk_size else None
    ckpt_dir = os.path.join(args.output, "checkpoints")

    def encode(inputs: dict) -> torch.Tensor:
        inputs = {k: v.to(device) for k, v in inputs.items()}
        fn = lambda **x: text_features(model, x, cfg.pooling, normalize=False)  # noqa: E731 (the losses normalise)
        with torch.autocast(device.type, torch.bfloat16, enabled=args.bf16):
            return (fn(**inputs) if gc is None else gc.encode(fn, **inputs)).float()

    t0, seen, losses = time.perf_counter(), 0, []
    train_log = open(os.path.join(args.output, "train_log.jsonl"), "a") if rank == 0 else None
    for item in loader:
        step, batch = item["step"] + 1, item["batch"]
        with one_gradient_sync(model):  # several forwards, one gradient all-reduce (parallel.one_gradient_sync)
            q, p = encode(batch["query"]), encode(batch["positive"])
            neg = encode(batch["negatives"]) if "negatives" in batch else None
            if args.loss == "cosent":
                if "scores" not in batch:
                    raise ValueError("--loss cosent needs a numeric 'score' (or 'label') on every row")
                loss = criterion(q, p, scores=batch["scores"].to(device))
            elif args.loss == "triplet":
                mask = batch.get("negatives_mask")
                loss = (
                    criterion(q, p)
                    if neg is None
                    else criterion(q, p, scatter_negatives(neg, mask), negatives_mask=mask.to(device))
                )
            else:
                labels = batch.get("labels")
                extra = {"labels": labels.to(device)} if labels is not None and not labels.is_floating_point() else {}
                loss = criterion(q, p, negatives=neg, **extra)
            loss.backward()
        clip_gradients([p for g in optimizer.param_groups for p in g["params"]], args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(mean_over_ranks(loss))  # the global batch's loss, not rank 0's
        seen += q.shape[0] * world
        if train_log:
            train_log.write(json.dumps({"step": step, "loss": losses[-1], "lr": scheduler.get_last_lr()[0]}) + "\n")
            train_log.flush()
        if step % args.log_every == 0 or step == end:
            rate = seen / (time.perf_counter() - t0)
            log.info(
                "step %d/%d  loss %.4f  lr %.2e  %.1f samples/s",
                step,
                total,
                losses[-1],
                scheduler.get_last_lr()[0],
                rate,
            )
        if (args.save_every and step % args.save_every == 0) or step == end:
            sampler.load_state_dict(item["sampler_state"])  # the state after the batch just trained on
            save_checkpoint(ckpt_dir, model=state, optimizer=optimizer, step=step, sampler=sampler, scheduler=scheduler)
        if args.eval_every and step % args.eval_every == 0 and step < total:
            evaluate_during(step)
    if train_log:
        train_log.close()
    return losses


def finish(args, model, hf_model, collator, cfg, val, before_file) -> dict:
    """Export an HF + sentence-transformers folder and evaluate after training."""
    final = os.path.join(args.output, "final")
    export_pretrained(model, final, tokenizer=collator.tokenizer)
    if get_rank() == 0:
        prompts = {
            k: v for k, v in (("query", collator.query_instruction), ("document", collator.doc_instruction)) if v
        }
        write_st_files(final, hf_model.config.hidden_size, cfg.pooling, cfg.normalize, cfg.max_length, prompts)
    log.info("exported to %s", final)
    if not val or get_rank() != 0:
        return {}
    with open(before_file) as f:
        before = json.load(f)
    after = evaluate(hf_model, collator, cfg, val, args)
    with open(os.path.join(args.output, "metrics.json"), "w") as f:
        json.dump({"before": before, "after": after}, f, indent=1)
    log.info("%s", "  ".join(f"{n} {before[n]:.4f} -> {after[n]:.4f}" for n in ("recall@1", "recall@10", "mrr@10")))
    return {"before": before, "after": after}


if __name__ == "__main__":
    main()
