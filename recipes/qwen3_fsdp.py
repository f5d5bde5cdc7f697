"""Train a Qwen3-VL-Embedding style model: Qwen3-VL backbone, last-token pooling, FSDP2, GradCache.

Each item becomes a chat ([system: instruction] [user: images + text] + assistant prefix) via
the processor's chat template; its embedding is the hidden state of the last token. Queries
are scored against every positive and hard negative of all ranks (gathered InfoNCE), optionally
at several Matryoshka widths. Data: JSONL in the T2I / I2T / M2I / T2T / I2I formats (docs/data.md).

One GPU, eight GPUs, and two nodes of eight (run the second command on each node):

    python recipes/qwen3_fsdp.py --model Qwen/Qwen3-VL-2B-Instruct --data train.jsonl --val-data val.jsonl \
        --batch-size 64 --chunk-size 8 --bf16 --grad-checkpointing --lora 32 --output runs/qwen3
    torchrun --nproc_per_node=8 recipes/qwen3_fsdp.py --model Qwen/Qwen3-VL-2B-Instruct --data train.jsonl \
        --val-data val.jsonl --batch-size 64 --chunk-size 8 --bf16 --grad-checkpointing --mrl-dims 2048,1024,512,256 \
        --num-negatives 1 --output runs/qwen3
    torchrun --nnodes 2 --node_rank $NODE_RANK --nproc_per_node=8 --master_addr $HEAD_NODE_IP --master_port 29500 \
        recipes/qwen3_fsdp.py --model Qwen/Qwen3-VL-8B-Instruct --data train.jsonl --val-data val.jsonl \
        --batch-size 32 --chunk-size 4 --bf16 --grad-checkpointing --output /shared/runs/qwen3

--batch-size is per rank. FSDP2 runs a collective in every sharded forward, so every rank
must run the same forwards: each rank encodes exactly batch-size x --num-negatives hard
negatives (short rows padded with masked copies of their positive) and evaluation is split
over all ranks. Writes <output>/train_log.jsonl, <output>/metrics.json ({"before", "after"}),
checkpoints under <output>/checkpoints (--resume; shared storage across nodes) and <output>/final.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader

from vembed_blocks import InfoNCE, Matryoshka, get_rank, get_world_size, init_distributed, retrieval_metrics
from vembed_blocks.checkpoint import export_pretrained, latest_checkpoint, load_checkpoint, save_checkpoint
from vembed_blocks.data import TaskBatches, VLMCollator, WeightedTaskSampler, load_records
from vembed_blocks.distributed import mean_over_ranks, shutdown_distributed
from vembed_blocks.embed import embed_items, retrieval_set
from vembed_blocks.gradcache import GradCache
from vembed_blocks.metrics import format_table
from vembed_blocks.parallel import apply_lora, checkpoint_layers, clip_gradients, compile_layers
from vembed_blocks.schedule import warmup_cosine
from vembed_blocks.vlm import VLMSplit, load_vlm_processor, shard_vlm, vlm_embed

log = logging.getLogger("qwen3_fsdp")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF id or local folder of a Qwen3-VL (or Qwen2-VL) model")
    p.add_argument("--data", required=True, help="training file (JSONL/CSV/Parquet)")
    p.add_argument("--val-data", help="validation file for before/after retrieval metrics")
    p.add_argument(
        "--format", choices=["t2i", "i2t", "i2i", "m2i", "t2t"], help="declare the data format (else detected)"
    )
    p.add_argument("--query-instruction", default="Represent the user's input.", help="system prompt of queries")
    p.add_argument("--doc-instruction", help="system prompt of documents (default: the query one)")
    p.add_argument("--max-image-side", type=int, default=1024, help="downscale larger images before the processor")
    p.add_argument("--num-negatives", type=int, default=0, help="hard negatives per row (fixed, see above; 0 = none)")
    p.add_argument("--temperature", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=32, help="rows per rank per step")
    p.add_argument("--chunk-size", type=int, default=0, help="GradCache rows per chunk (0 = off)")
    p.add_argument("--lora", type=int, default=0, help="LoRA rank (0 = full fine-tuning)")
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--mrl-dims", help="Matryoshka dims, e.g. '2048,1024,512,256'")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, help="overrides --epochs")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm (0 = off)")
    p.add_argument("--bf16", action="store_true", help="FSDP2 bf16 parameters (fp32 gradient reduce) + autocast")
    p.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing of every block")
    p.add_argument("--compile", action="store_true", help="torch.compile every block (falls back to eager on failure)")
    p.add_argument(
        "--compile-backend", default="inductor", help="torch.compile backend (e.g. aot_eager to check tracing only)"
    )
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers (decode + processor)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=0, help="retrieval metrics on --val-data every N steps (0 = off)")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0 = at the end only)")
    p.add_argument("--resume", action="store_true", help="continue from <output>/checkpoints")
    p.add_argument("--stop-at", type=int, help="save and exit at this step (split a run across jobs; then --resume)")
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--output", default="runs/qwen3_fsdp")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- pieces of the loop


class FixedNegatives:
    """Give every record exactly ``k`` negatives (padding: copies of its positive) and mask the padding.

    Why: each FSDP2 forward is a collective, so all ranks must encode the same number of
    negative chunks; a ragged count would hang. Padded slots are encoded and then masked out.
    """

    def __init__(self, collator: VLMCollator, k: int) -> None:
        self.collator, self.k, self.warned = collator, k, False

    def __call__(self, records: list) -> dict:
        k = self.k
        if not k and not self.warned and any(r.negatives for r in records):  # once per process (rank, worker)
            self.warned = True
            log.warning("rows have hard negatives but --num-negatives is 0: they are not used (pass --num-negatives K)")
        padded = [dataclasses.replace(r, negatives=(list(r.negatives[:k]) + [r.positive] * k)[:k]) for r in records]
        batch = self.collator(padded)
        if k:
            batch["negatives_mask"] = torch.tensor([[j < len(r.negatives) for j in range(k)] for r in records])
        return batch


def build_model(args: argparse.Namespace, device: torch.device):
    """Load, then checkpointing -> LoRA -> compile -> FSDP2 (the order each wrapper expects)."""
    from transformers import AutoModel

    hf_model = AutoModel.from_pretrained(args.model, dtype=torch.float32).to(device)
    if args.grad_checkpointing:
        checkpoint_layers(hf_model)
    if args.lora:
        hf_model = apply_lora(hf_model, r=args.lora, alpha=args.lora_alpha)
    if args.compile:
        compile_layers(hf_model, backend=args.compile_backend, fallback_to_eager=True)  # failing blocks run eagerly
    hf_model.train()
    # Text decoder layers as FSDP units, the vision tower in the root unit: a rank whose chunk has
    # no image skips it, and a per-block vision unit would wait for an all-gather nobody joins.
    return shard_vlm(hf_model, mixed_precision="bf16" if args.bf16 else None)


def make_loss(args: argparse.Namespace) -> torch.nn.Module:
    loss = InfoNCE(temperature=args.temperature)
    return Matryoshka(loss, [int(d) for d in args.mrl_dims.split(",")]) if args.mrl_dims else loss


def embed_on_all_ranks(items: list, encode, batch_size: int, desc: str) -> torch.Tensor:
    """Every rank embeds an equal slice (same forwards everywhere, as FSDP2 needs); all get all rows."""
    world, rank, n = get_world_size(), get_rank(), len(items)
    per = -(-n // world)
    mine = list(items[rank * per : (rank + 1) * per])
    mine += [items[0]] * (per - len(mine))  # filler rows, dropped below
    emb = embed_items(mine, encode, batch_size, desc)
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, emb)
        emb = torch.cat(parts)
    return emb[:n]


@torch.no_grad()
def evaluate(model, collator: VLMCollator, path: str, args, device) -> dict[str, float]:
    """Embed the unique queries and corpus of ``path`` on all ranks and score retrieval."""
    rs = retrieval_set(load_records(path, format=args.format))
    was_training = model.training
    model.eval()

    def encode(is_query: bool):
        def run(items):
            inputs = {k: v.to(device) for k, v in collator.encode(items, is_query).items()}
            with torch.autocast(device.type, torch.bfloat16, enabled=args.bf16):
                return F.normalize(vlm_embed(model, inputs).float(), dim=-1)

        return run

    q = embed_on_all_ranks(rs.queries, encode(True), args.eval_batch_size, "embed queries")
    d = embed_on_all_ranks(rs.docs, encode(False), args.eval_batch_size, "embed corpus")
    model.train(was_training)
    return retrieval_metrics(q @ d.T, rs.relevant, ks=(1, 5, 10))


# ----------------------------------------------------------------------------- main


def prepare(args: argparse.Namespace) -> tuple[str, str | None]:
    """Check the inputs before any model is loaded; returns (train file, val file)."""
    for path in (args.data, args.val_data):
        if path and not os.path.exists(path):
            raise SystemExit(f"no such file: {path}")
    if args.chunk_size < 0 or args.num_negatives < 0:
        raise SystemExit("--chunk-size and --num-negatives must be >= 0")
    return args.data, args.val_data


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    rank, world, device = init_distributed()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(asctime)s %(message)s")
    torch.manual_seed(args.seed)
    os.makedirs(args.output, exist_ok=True)
    data, val = prepare(args)
    processor = load_vlm_processor(args.model)
    model = build_model(args, device)
    criterion = make_loss(args).to(device)
    collator = VLMCollator(
        processor,
        query_instruction=args.query_instruction,
        doc_instruction=args.doc_instruction,
        max_image_side=args.max_image_side,
    )

    train = load_records(data, format=args.format)
    sampler = WeightedTaskSampler({"train": len(train)}, args.batch_size, seed=args.seed, rank=rank, world_size=world)
    total = args.max_steps or max(1, round(args.epochs * math.ceil(len(train) / (args.batch_size * world))))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(args.warmup_steps, total))
    ckpt_dir = os.path.join(args.output, "checkpoints")
    start = 0
    if args.resume and latest_checkpoint(ckpt_dir) is not None:
        start = load_checkpoint(ckpt_dir, model=model, optimizer=optimizer, sampler=sampler, scheduler=scheduler)
        log.info("resumed from %s at step %d", latest_checkpoint(ckpt_dir), start)

    before_file = os.path.join(args.output, "metrics_before.json")
    if val and (start == 0 or not os.path.exists(before_file)):
        before = evaluate(model, collator, val, args, device)  # every rank: FSDP2 forwards are collectives
        if rank == 0:
            with open(before_file, "w") as f:
                json.dump(before, f)
    if val and rank == 0:
        with open(before_file) as f:
            print(format_table(json.load(f)), flush=True)

    end = min(total, args.stop_at or total)
    batches = TaskBatches({"train": train}, sampler, FixedNegatives(collator, args.num_negatives), steps=end - start)
    # Own generator: creating the iterator draws a seed, which must not advance the global RNG
    # (restored by --resume, and driving dropout) or a resumed run's dropout masks would shift.
    loader = DataLoader(
        batches, batch_size=None, num_workers=args.num_workers, generator=torch.Generator().manual_seed(args.seed)
    )
    log.info(
        "training steps %d -> %d of %d, %d rows/step over %d rank(s)", start, end, total, args.batch_size * world, world
    )

    def evaluate_during(step: int) -> None:  # --eval-every: all ranks embed, rank 0 logs
        metrics = evaluate(model, collator, val, args, device)
        if rank == 0:
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
        total,
        end,
        device,
        evaluate_during if val else None,
    )
    result = {"losses": losses}
    if end < total:
        log.info("stopped at step %d of %d; continue with --resume", end, total)
    else:
        result.update(finish(args, model, processor, collator, val, before_file, device))
    shutdown_distributed()  # after the last collective; safe gloo teardown
    return result


def train_loop(
    args, loader, model, criterion, optimizer, scheduler, sampler, total, end, device, evaluate_during
) -> list[float]:
    """The explicit loop: encode queries, positives, negatives (GradCache if --chunk-size), loss, step, log, save."""
    rank, world = get_rank(), get_world_size()
    # VLM-aware chunks: VLMSplit cuts flat pixel_values by image_grid_thw / mm_token_type_ids.
    gc = GradCache(chunk_size=args.chunk_size, sync_module=model, splitter=VLMSplit) if args.chunk_size else None
    ckpt_dir = os.path.join(args.output, "checkpoints")

    def encode(inputs: dict) -> torch.Tensor:
        inputs = {k: v.to(device) for k, v in inputs.items()}
        with torch.autocast(device.type, torch.bfloat16, enabled=args.bf16):
            if gc is None:
                return vlm_embed(model, inputs).float()
            return gc.encode(lambda **x: vlm_embed(model, x), **inputs).float()

    t0, seen, losses = time.perf_counter(), 0, []
    train_log = open(os.path.join(args.output, "train_log.jsonl"), "a") if rank == 0 else None
    for item in loader:
        step, batch = item["step"] + 1, item["batch"]
        q, p = encode(batch["query"]), encode(batch["positive"])
        extra = {"labels": batch["labels"].to(device)} if "labels" in batch else {}
        if args.num_negatives:  # [B*K] rows in row order -> [B, K, D]; padded slots masked out
            n = encode(batch["negatives"])
            extra.update(
                negatives=n.view(q.shape[0], args.num_negatives, -1), negatives_mask=batch["negatives_mask"].to(device)
            )
        loss = criterion(q, p, **extra)
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
            save_checkpoint(ckpt_dir, model=model, optimizer=optimizer, step=step, sampler=sampler, scheduler=scheduler)
        if evaluate_during and args.eval_every and step % args.eval_every == 0 and step < total:
            evaluate_during(step)
    if train_log:
        train_log.close()
    return losses


def finish(args, model, processor, collator, val, before_file, device) -> dict:
    """Export (LoRA merged; a plain Qwen3VLModel folder + processor) and evaluate after training."""
    final = os.path.join(args.output, "final")
    export_pretrained(model, final, processor=processor)  # a collective: every rank calls it
    log.info("exported to %s", final)
    if not val:
        return {}
    after = evaluate(model, collator, val, args, device)
    if get_rank() != 0:
        return {}
    with open(before_file) as f:
        before = json.load(f)
    with open(os.path.join(args.output, "metrics.json"), "w") as f:
        json.dump({"before": before, "after": after}, f, indent=1)
    print(format_table(before, after), flush=True)
    return {"before": before, "after": after}


if __name__ == "__main__":
    main()
