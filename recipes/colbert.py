"""Late-interaction retrieval (ColBERT, ColPali / ColQwen): token embeddings, MaxSim, FSDP2, GradCache.

Every token keeps its own vector (the encoder's last hidden states through an optional linear
projection to --dim, 128 as in ColBERT); a query scores a document by MaxSim (each query
token's best match among the document's tokens, averaged over query tokens). Training:
InfoNCE over MaxSim against every document and hard negative of all ranks (`ColBERT` loss);
evaluation: `maxsim` of every query against the whole corpus. --encoder (default: from the
config, a vision_config means vlm): text = a BERT-like model + tokenizer (T2T data, ColBERT);
vlm = a Qwen-VL model + processor (T2I/M2I/I2I data, document images: ColQwen).

    python recipes/colbert.py --model bert-base-uncased --data msmarco.jsonl --val-data dev.jsonl \
        --batch-size 128 --chunk-size 32 --dim 128 --output runs/colbert
    torchrun --nproc_per_node=8 recipes/colbert.py --model Qwen/Qwen3-VL-2B-Instruct --data pages.jsonl \
        --val-data pages_val.jsonl --batch-size 32 --chunk-size 4 --lora 32 --bf16 --grad-checkpointing \
        --output runs/colqwen
    torchrun --nnodes 2 --node_rank $NODE_RANK --nproc_per_node=8 --master_addr $HEAD_NODE_IP --master_port 29500 \
        recipes/colbert.py --model Qwen/Qwen3-VL-2B-Instruct --data pages.jsonl --batch-size 32 --chunk-size 4 \
        --bf16 --output /shared/runs/colqwen

GradCache with token outputs: chunks are row slices of a collated side, already padded to the
side's longest row, so every chunk returns [b, L, dim] with the same L (padded to L explicitly
too, should an encoder drop padding); the token mask is the side's attention_mask. Writes
<output>/train_log.jsonl, metrics.json, checkpoints/ (--resume) and final/: the encoder as an HF
folder + colbert_projection.safetensors + colbert.json (how to rebuild the token vectors).
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
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from vembed_blocks import ColBERT, Matryoshka, get_rank, get_world_size, init_distributed, retrieval_metrics
from vembed_blocks.checkpoint import export_pretrained, latest_checkpoint, load_checkpoint, save_checkpoint
from vembed_blocks.colbert import maxsim
from vembed_blocks.data import TaskBatches, TextCollator, VLMCollator, WeightedTaskSampler, load_records
from vembed_blocks.distributed import average_gradients, mean_over_ranks, pad_dim, shutdown_distributed
from vembed_blocks.embed import retrieval_set
from vembed_blocks.gradcache import GradCache
from vembed_blocks.metrics import format_table
from vembed_blocks.parallel import apply_lora, checkpoint_layers, clip_gradients, compile_layers
from vembed_blocks.schedule import warmup_cosine
from vembed_blocks.vlm import VLMSplit, load_vlm_processor, shard_vlm, vlm_token_embeddings

log = logging.getLogger("colbert")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF id or local folder: a BERT-like text encoder or a Qwen-VL model")
    p.add_argument("--data", required=True, help="training file (JSONL/CSV/Parquet)")
    p.add_argument("--val-data", help="validation file for before/after MaxSim retrieval metrics")
    p.add_argument(
        "--format", choices=["t2i", "i2t", "i2i", "m2i", "t2t"], help="declare the data format (else detected)"
    )
    p.add_argument(
        "--encoder", choices=["auto", "text", "vlm"], default="auto", help="auto: vlm if the config has a vision_config"
    )
    p.add_argument("--dim", type=int, default=128, help="linear projection of every token to this width (0 = none)")
    p.add_argument("--query-instruction", help="text: query prefix (e.g. '[Q] '); vlm: system prompt of queries")
    p.add_argument("--doc-instruction", help="text: document prefix; vlm: system prompt of documents")
    p.add_argument("--max-length", type=int, default=256, help="text: tokens per query/document")
    p.add_argument("--max-image-side", type=int, default=1024, help="vlm: downscale larger images before the processor")
    p.add_argument(
        "--num-negatives", type=int, default=0, help="hard negatives per row (fixed: FSDP2 needs equal forwards)"
    )
    p.add_argument("--temperature", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=32, help="rows per rank per step")
    p.add_argument("--chunk-size", type=int, default=0, help="GradCache rows per chunk (0 = off)")
    p.add_argument("--lora", type=int, default=0, help="LoRA rank (0 = full fine-tuning)")
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--mrl-dims", help="Matryoshka token dims, e.g. '128,64,32'")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, help="overrides --epochs")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--proj-lr", type=float, help="learning rate of the new projection (default: 10 x --lr)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm (0 = off)")
    p.add_argument("--bf16", action="store_true", help="FSDP2 bf16 parameters (fp32 gradient reduce) + autocast")
    p.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing of every block")
    p.add_argument("--compile", action="store_true", help="torch.compile every block in place")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers (decode + processor)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=0, help="MaxSim metrics on --val-data every N steps (0 = off)")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0 = at the end only)")
    p.add_argument("--resume", action="store_true", help="continue from <output>/checkpoints")
    p.add_argument("--stop-at", type=int, help="save and exit at this step (split a run across jobs; then --resume)")
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--output", default="runs/colbert")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- pieces of the loop


class FixedNegatives:
    """Exactly ``k`` negatives per record (padding: copies of its positive, masked out): every rank
    then runs the same number of encoder forwards, which FSDP2's collectives require."""

    def __init__(self, collator, k: int) -> None:
        self.collator, self.k, self.warned = collator, k, False

    def __call__(self, records: list) -> dict:
        k = self.k
        if not k and not self.warned and any(r.negatives for r in records):  # once per process (rank, worker)
            self.warned = True
            log.warning("rows have hard negatives but --num-negatives is 0: they are not used (pass --num-negatives K)")
        batch = self.collator(
            [dataclasses.replace(r, negatives=(list(r.negatives[:k]) + [r.positive] * k)[:k]) for r in records]
        )
        if k:
            batch["negatives_mask"] = torch.tensor([[j < len(r.negatives) for j in range(k)] for r in records])
        return batch


def build_encoder(args: argparse.Namespace, device: torch.device):
    """(sharded model, projection or None, collator, processor) for --encoder text | vlm."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    if args.encoder == "auto":
        args.encoder = "vlm" if hasattr(AutoConfig.from_pretrained(args.model), "vision_config") else "text"
    if args.encoder == "vlm":
        processor = load_vlm_processor(args.model)
        collator = VLMCollator(
            processor,
            query_instruction=args.query_instruction,
            doc_instruction=args.doc_instruction,
            max_image_side=args.max_image_side,
        )
    else:
        processor = AutoTokenizer.from_pretrained(args.model)
        collator = TextCollator(processor, args.max_length, args.query_instruction, args.doc_instruction)
    hf_model = AutoModel.from_pretrained(args.model, dtype=torch.float32).to(device)
    if getattr(hf_model, "pooler", None) is not None:  # BERT's [CLS] pooler: unused by token outputs, so frozen
        hf_model.pooler.requires_grad_(False)
    width = hf_model.config.get_text_config().hidden_size
    proj = nn.Linear(width, args.dim, bias=False).to(device) if args.dim else None  # same init on every rank (seeded)
    if args.grad_checkpointing:
        checkpoint_layers(hf_model)
    if args.lora:
        hf_model = apply_lora(hf_model, r=args.lora, alpha=args.lora_alpha)
    if args.compile:
        compile_layers(hf_model)
    hf_model.train()
    # Text blocks as FSDP units; a VLM's vision tower stays in the root unit (see shard_vlm).
    model = shard_vlm(hf_model, mixed_precision="bf16" if args.bf16 else None)
    return model, proj, collator, processor


def token_embeddings(args, model, proj, inputs: dict) -> torch.Tensor:
    """``[b, L, dim]`` token vectors of one collated side (L = its padded length)."""
    if args.encoder == "vlm":
        tokens, _ = vlm_token_embeddings(model, inputs, proj)
    else:
        tokens = model(**inputs).last_hidden_state
        tokens = proj(tokens) if proj is not None else tokens
    return pad_dim(tokens, 1, inputs["attention_mask"].shape[1])


def make_loss(args: argparse.Namespace) -> nn.Module:
    loss = ColBERT(temperature=args.temperature)
    return Matryoshka(loss, [int(d) for d in args.mrl_dims.split(",")]) if args.mrl_dims else loss


@torch.no_grad()
def embed_tokens(args, model, proj, collator, items: list, is_query: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit token vectors ``[n, L, dim]`` + mask ``[n, L]`` of ``items``: each rank an equal slice
    (FSDP2: same forwards everywhere), batches padded to one L, then exchanged between ranks."""
    world, rank, n = get_world_size(), get_rank(), len(items)
    per = -(-n // world)
    mine = list(items[rank * per : (rank + 1) * per])
    mine += [items[0]] * (per - len(mine))  # filler rows, dropped below
    parts = []
    for i in range(0, per, args.eval_batch_size):
        chunk = mine[i : i + args.eval_batch_size]
        inputs = {k: v.to(device) for k, v in collator.encode(chunk, is_query).items()}
        with torch.autocast(device.type, torch.bfloat16, enabled=args.bf16):
            tokens = token_embeddings(args, model, proj, inputs)
        parts.append((F.normalize(tokens.float(), dim=-1).cpu(), inputs["attention_mask"].bool().cpu()))
    if world > 1:
        everyone = [None] * world
        dist.all_gather_object(everyone, parts)
        parts = [p for rank_parts in everyone for p in rank_parts]
    length = max(t.shape[1] for t, _ in parts)
    tokens = torch.cat([pad_dim(t, 1, length) for t, _ in parts])[:n]
    return tokens, torch.cat([pad_dim(m, 1, length) for _, m in parts])[:n]


def evaluate(args, model, proj, collator, path: str, device) -> dict[str, float]:
    """MaxSim of every query against the whole corpus (in blocks of documents), then retrieval metrics."""
    rs = retrieval_set(load_records(path, format=args.format))
    was_training = model.training
    model.eval()
    q, qm = embed_tokens(args, model, proj, collator, rs.queries, True, device)
    d, dm = embed_tokens(args, model, proj, collator, rs.docs, False, device)
    model.train(was_training)
    block = max(1, 2**24 // max(1, len(q) * q.shape[1] * d.shape[1]))  # bound the [Q, n, Lq, Ld] similarities
    scores = torch.cat([maxsim(q, qm, d[i : i + block], dm[i : i + block]) for i in range(0, len(d), block)], dim=1)
    return retrieval_metrics(scores, rs.relevant, ks=(1, 5, 10))


# ----------------------------------------------------------------------------- main


def prepare(args: argparse.Namespace) -> tuple[str, str | None]:
    """Check the inputs before any model is loaded; returns (train file, val file)."""
    missing = [p for p in (args.data, args.val_data) if p and not os.path.exists(p)]
    if missing or min(args.chunk_size, args.num_negatives, args.dim) < 0:
        raise SystemExit(
            f"no such file: {missing[0]}" if missing else "--chunk-size, --num-negatives, --dim must be >= 0"
        )
    return args.data, args.val_data


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    rank, world, device = init_distributed()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(asctime)s %(message)s")
    torch.manual_seed(args.seed)
    os.makedirs(args.output, exist_ok=True)
    data, val = prepare(args)
    model, proj, collator, processor = build_encoder(args, device)
    criterion = make_loss(args)

    train = load_records(data, format=args.format)
    sampler = WeightedTaskSampler({"train": len(train)}, args.batch_size, seed=args.seed, rank=rank, world_size=world)
    total = args.max_steps or max(1, round(args.epochs * math.ceil(len(train) / (args.batch_size * world))))
    groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    if proj is not None:  # a fresh layer: a larger step than the pretrained encoder
        groups.append({"params": list(proj.parameters()), "lr": args.proj_lr or 10 * args.lr})
    optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(args.warmup_steps, total))
    state = nn.ModuleDict(
        {"model": model, **({"proj": proj} if proj is not None else {})}
    )  # what a checkpoint restores
    ckpt_dir = os.path.join(args.output, "checkpoints")
    start = 0
    if args.resume and latest_checkpoint(ckpt_dir) is not None:
        start = load_checkpoint(ckpt_dir, model=state, optimizer=optimizer, sampler=sampler, scheduler=scheduler)
        log.info("resumed from %s at step %d", latest_checkpoint(ckpt_dir), start)

    before_file = os.path.join(args.output, "metrics_before.json")
    if val and (start == 0 or not os.path.exists(before_file)):
        before = evaluate(args, model, proj, collator, val, device)  # every rank: FSDP2 forwards are collectives
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
        "%s encoder; training steps %d -> %d of %d, %d rows/step over %d rank(s)",
        args.encoder,
        start,
        end,
        total,
        args.batch_size * world,
        world,
    )

    def evaluate_during(step: int) -> None:  # --eval-every: all ranks embed, rank 0 logs
        metrics = evaluate(args, model, proj, collator, val, device)
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
        proj,
        criterion,
        optimizer,
        scheduler,
        sampler,
        state,
        total,
        end,
        device,
        evaluate_during if val else None,
    )
    result = {"losses": losses}
    if end < total:
        log.info("stopped at step %d of %d; continue with --resume", end, total)
    else:
        result.update(finish(args, model, proj, processor, collator, val, before_file, device))
    shutdown_distributed()  # after the last collective; safe gloo teardown
    return result


def train_loop(
    args, loader, model, proj, criterion, optimizer, scheduler, sampler, state, total, end, device, evaluate_during
) -> list[float]:
    """The explicit loop: token embeddings of queries, documents, negatives (GradCache if --chunk-size), MaxSim loss."""
    rank, world = get_rank(), get_world_size()
    splitter = VLMSplit if args.encoder == "vlm" else None  # VLMSplit: flat pixel_values cut by image
    gc = GradCache(chunk_size=args.chunk_size, sync_module=model, splitter=splitter) if args.chunk_size else None
    ckpt_dir = os.path.join(args.output, "checkpoints")

    def encode(inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = {k: v.to(device) for k, v in inputs.items()}
        fn = lambda **x: token_embeddings(args, model, proj, x)  # noqa: E731
        with torch.autocast(device.type, torch.bfloat16, enabled=args.bf16):
            tokens = fn(**inputs) if gc is None else gc.encode(fn, **inputs)
        return tokens.float(), inputs["attention_mask"].bool()

    t0, seen, losses = time.perf_counter(), 0, []
    train_log = open(os.path.join(args.output, "train_log.jsonl"), "a") if rank == 0 else None
    for item in loader:
        step, batch = item["step"] + 1, item["batch"]
        (q, qm), (d, dm) = encode(batch["query"]), encode(batch["positive"])
        extra = {}
        if (
            args.num_negatives
        ):  # [B*K, Ln, dim] in row order -> [B, K, Ln, dim]; a padded slot's token mask is all False
            n, nm = encode(batch["negatives"])
            b, k = q.shape[0], args.num_negatives
            nm = nm.view(b, k, -1) & batch["negatives_mask"].to(device)[..., None]
            extra = {"negatives": n.view(b, k, n.shape[1], -1), "negatives_mask": nm}
        loss = criterion(q, qm, d, dm, **extra)
        loss.backward()
        if proj is not None:
            average_gradients(proj.parameters())  # FSDP does not see the projection (outside the model)
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
        if evaluate_during and args.eval_every and step % args.eval_every == 0 and step < total:
            evaluate_during(step)
    if train_log:
        train_log.close()
    return losses


def finish(args, model, proj, processor, collator, val, before_file, device) -> dict:
    """Export the encoder (HF folder, LoRA merged) + the projection, and evaluate after training."""
    final = os.path.join(args.output, "final")
    export_pretrained(model, final, processor=processor)  # a collective: every rank calls it
    if get_rank() == 0:
        if proj is not None:
            save_file(
                {"weight": proj.weight.detach().float().cpu().contiguous()},
                os.path.join(final, "colbert_projection.safetensors"),
            )
        with open(os.path.join(final, "colbert.json"), "w") as f:
            json.dump(
                {
                    "encoder": args.encoder,
                    "dim": args.dim,
                    "tokens": "last_hidden_state",
                    "normalize": True,
                    "query_instruction": args.query_instruction,
                    "doc_instruction": args.doc_instruction,
                },
                f,
                indent=1,
            )
    log.info("exported to %s", final)
    if not val:
        return {}
    after = evaluate(args, model, proj, collator, val, device)
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
