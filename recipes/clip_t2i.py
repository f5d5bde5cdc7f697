r"""Fine-tune a CLIP / SigLIP dual encoder for retrieval: GradCache, cross-rank negatives, eval, export.

Demo (no --data): renders a toy image-caption set with Pillow, builds a tiny random CLIP, trains
300 steps (15-30 s on 2 CPU cores) and prints retrieval before/after:

    python recipes/clip_t2i.py
    torchrun --nproc_per_node=2 recipes/clip_t2i.py

Your data (JSONL in any seed format, see docs/data.md), one GPU and eight:

    python recipes/clip_t2i.py --model openai/clip-vit-base-patch32 --data train.jsonl \
        --val-data val.jsonl --batch-size 256 --chunk-size 64 --bf16 --output runs/clip
    torchrun --nproc_per_node=8 recipes/clip_t2i.py --model openai/clip-vit-base-patch32 \
        --data train.jsonl --val-data val.jsonl --batch-size 256 --chunk-size 64 --bf16 --output runs/clip

--batch-size is per rank; every query sees the positives (and hard negatives) of all ranks.
Writes <output>/args.json, train_log.jsonl, metrics.json ({"before": ..., "after": ...}),
checkpoints under <output>/checkpoints (resume with --resume) and the model to <output>/final.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from vembed_blocks import InfoNCE, Matryoshka, SigLIP, get_rank, init_distributed
from vembed_blocks.checkpoint import export_pretrained, latest_checkpoint, load_checkpoint, save_checkpoint
from vembed_blocks.data import DualEncoderCollator, TaskLoader, WeightedTaskSampler, load_records
from vembed_blocks.demo import build_tiny_clip, render_demo
from vembed_blocks.distributed import mean_over_ranks, shutdown_distributed
from vembed_blocks.embed import evaluate_retrieval
from vembed_blocks.grad_sync import accumulate_gradients, clip_gradients
from vembed_blocks.gradcache import GradCache
from vembed_blocks.parallel import apply_lora, checkpoint_layers, compile_layers
from vembed_blocks.run_log import RunLog, write_args, write_metrics
from vembed_blocks.schedule import make_scheduler, warmup_steps
from vembed_blocks.towers import (
    ComposedDualEncoder,
    compose_dual_encoder,
    dual_encoder_features,
    load_dual_encoder,
    text_padding,
)
from vembed_blocks.train_args import HelpFormatter, add_common_args, autocast, check_common_args

log = logging.getLogger("clip_t2i")
DATA_HELP = "training file (JSONL/CSV/Parquet); default: the rendered demo set (and a tiny CLIP)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_common_args(
        p, output="runs/clip_t2i", lr=1e-5, batch_size=64, weight_decay=0.1, data_help=DATA_HELP, require_data=False
    )
    p.add_argument("--model", help="HF id or local folder (CLIP/SigLIP); default: a tiny random CLIP (demo)")
    p.add_argument("--vision-model", help="compose a dual encoder: any HF vision backbone (e.g. facebook/dinov2-small)")
    p.add_argument("--text-model", help="... plus any HF text backbone (e.g. bert-base-uncased), with projections")
    p.add_argument("--proj-dim", type=int, default=256, help="composed towers: shared embedding width")
    p.add_argument("--text-pooling", default="mean", help="composed towers: text pooling (mean, cls, last, max, ...)")
    p.add_argument("--format", choices=["t2i", "i2t", "i2i", "t2t"], help="declare the data format (else detected)")
    p.add_argument("--loss", choices=["infonce", "siglip"], default="infonce")
    p.add_argument("--symmetric", action="store_true", help="InfoNCE: also doc->query")
    p.add_argument("--temperature", type=float, help="initial temperature (default: the model's logit_scale)")
    p.add_argument("--demo-quick", action="store_true", help="demo: a smaller set and model (tests)")
    args, _ = p.parse_known_args(argv)
    if args.data is None:  # the demo trains a random model from scratch: its own defaults, explicit flags win
        p.set_defaults(lr=2e-3, max_steps=40 if args.demo_quick else 300)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- model, data, loss, evaluation


@dataclass
class Parts:
    model: nn.Module  # what the loop runs forward
    state: nn.ModuleDict  # everything a checkpoint restores (model + the loss's temperature)
    param_groups: list[dict]
    criterion: nn.Module
    collator: DualEncoderCollator
    processor: object
    splitter: object = None  # how GradCache cuts the inputs into chunks (None: every tensor on dim 0)


def prepare_data(args: argparse.Namespace, rank: int, world: int) -> tuple[str, str | None]:
    """(train file, val file); without --data render the demo set and a tiny CLIP (rank 0)."""
    if args.data is not None:
        return args.data, args.val_data
    demo = os.path.join(args.output, "demo")
    if rank == 0:
        render_demo(demo, per_combo=2 if args.demo_quick else 8, seed=args.seed)
        if args.model is None and args.vision_model is None:
            build_tiny_clip(os.path.join(demo, "model"), args.demo_quick)
    if world > 1:
        torch.distributed.barrier()
    if args.vision_model is None:
        args.model = args.model or os.path.join(demo, "model")
    return os.path.join(demo, "train.jsonl"), args.val_data or os.path.join(demo, "val.jsonl")


def build(args: argparse.Namespace, device: torch.device) -> Parts:
    """The dual encoder (composed towers or a CLIP/SigLIP folder), its collator and the loss."""
    if bool(args.vision_model) != bool(args.text_model):
        raise SystemExit("--vision-model and --text-model go together")
    if args.vision_model and args.lora:
        raise SystemExit("--lora is not supported for composed towers yet; fine-tune them fully")
    if not args.vision_model and args.model is None:
        raise SystemExit("--model is required with --data (an HF id or a local folder)")
    if args.vision_model:
        model, processor = compose_dual_encoder(args.vision_model, args.text_model, args.proj_dim, args.text_pooling)
    else:
        model, processor = load_dual_encoder(args.model)
    criterion = make_loss(args, model.to(device)).to(device)
    if args.grad_checkpointing:
        checkpoint_layers(model)
    if args.lora:
        model = apply_lora(model, r=args.lora, alpha=args.lora_alpha)
    if args.compile:
        compile_layers(model)
    model.train()
    groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    groups.append({"params": list(criterion.parameters()), "weight_decay": 0.0})
    collator = DualEncoderCollator(processor, **text_padding(model))
    return Parts(model, nn.ModuleDict({"model": model, "loss": criterion}), groups, criterion, collator, processor)


def make_loss(args: argparse.Namespace, model: nn.Module) -> nn.Module:
    """InfoNCE or SigLIP whose learnable temperature (and bias) start from the model's own."""
    logit_scale = getattr(model, "logit_scale", None)
    if args.loss == "siglip":
        t = args.temperature or (math.exp(logit_scale.item()) if logit_scale is not None else 10.0)
        bias = getattr(model, "logit_bias", None)
        loss = SigLIP(temperature=t, bias=bias.item() if bias is not None else -10.0, learn=True)
    else:
        t = args.temperature or (math.exp(-logit_scale.item()) if logit_scale is not None else 0.05)
        loss = InfoNCE(temperature=t, learn_temperature=True, symmetric=args.symmetric)
    for name in ("logit_scale", "logit_bias"):  # the loss owns them now; written back by export()
        if isinstance(getattr(model, name, None), nn.Parameter):
            getattr(model, name).requires_grad_(False)
    return Matryoshka(loss, [int(d) for d in args.mrl_dims.split(",")]) if args.mrl_dims else loss


def load_data(args: argparse.Namespace, parts: Parts, path: str, rank: int, world: int) -> tuple[TaskLoader, int]:
    """(batches, rows per epoch): one task, the file's records."""
    train = load_records(path, format=args.format)
    sampler = WeightedTaskSampler({"train": len(train)}, args.batch_size, seed=args.seed, rank=rank, world_size=world)
    loader = TaskLoader({"train": train}, sampler, parts.collator, args.num_workers, args.seed, args.grad_accum_steps)
    return loader, len(train)


def step_loss(args: argparse.Namespace, parts: Parts, batch: dict, gc: GradCache | None, device) -> torch.Tensor:
    """Encode queries, positives and (where the batch has them) hard negatives; the loss over all ranks."""

    def encode(inputs: dict) -> torch.Tensor:
        inputs = {k: v.to(device) for k, v in inputs.items()}
        fn = lambda **x: dual_encoder_features(parts.model, x)
        with autocast(args, device):
            return (fn(**inputs) if gc is None else gc.encode(fn, **inputs)).float()

    extra = {"labels": batch["labels"].to(device)} if "labels" in batch else {}
    if "negatives" in batch:  # the flat real negatives: a candidate pool (SigLIP: negative-only columns)
        extra["negatives"] = encode(batch["negatives"])
    return parts.criterion(encode(batch["query"]), encode(batch["positive"]), **extra)


@torch.no_grad()
def evaluate(args: argparse.Namespace, parts: Parts, path: str, device) -> dict[str, float]:
    """Retrieval metrics of ``path``'s unique queries against its corpus; every rank embeds a share."""

    def encode(items: list, is_query: bool) -> torch.Tensor:
        inputs = {k: v.to(device) for k, v in parts.collator.encode(items, is_query).items()}
        with autocast(args, device):
            return F.normalize(dual_encoder_features(parts.model, inputs).float(), dim=-1)

    parts.model.eval()
    metrics = evaluate_retrieval(load_records(path, format=args.format), encode, args.eval_batch_size)
    parts.model.train()
    return metrics


def export(args: argparse.Namespace, parts: Parts, final: str) -> None:
    """The model with the learned temperature (and SigLIP bias) written back into it; every rank calls it."""
    inner = parts.criterion.loss if isinstance(parts.criterion, Matryoshka) else parts.criterion
    model = parts.model
    with torch.no_grad():
        if isinstance(getattr(model, "logit_scale", None), torch.Tensor):
            model.logit_scale.copy_(inner.log_scale.reshape(model.logit_scale.shape))
        if isinstance(inner, SigLIP) and isinstance(getattr(model, "logit_bias", None), torch.Tensor):
            model.logit_bias.copy_(inner.bias.reshape(model.logit_bias.shape))
    if not isinstance(model, ComposedDualEncoder):
        export_pretrained(model, final, processor=parts.processor)
    elif get_rank() == 0:
        model.save_pretrained(final)  # not one HF architecture: two HF folders + projections
        parts.processor.save_pretrained(final)


# ----------------------------------------------------------------------------- the run (shared by every recipe)


def main(argv: list[str] | None = None) -> dict:
    # <shared: set-up>
    args = parse_args(argv)
    check_common_args(args)
    rank, world, device = init_distributed()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(asctime)s %(message)s")
    torch.manual_seed(args.seed)
    os.makedirs(args.output, exist_ok=True)
    data, val = prepare_data(args, rank, world)
    write_args(args, args.output, args.resume, rank)
    parts = build(args, device)
    loader, rows = load_data(args, parts, data, rank, world)
    total = args.max_steps or max(1, round(args.epochs * rows / (args.batch_size * world * args.grad_accum_steps)))
    optimizer = torch.optim.AdamW(parts.param_groups, lr=args.lr, weight_decay=args.weight_decay)
    warmup = warmup_steps(args.warmup_steps, args.warmup_ratio, total)
    scheduler = make_scheduler(optimizer, args.lr_schedule, warmup, total)
    scaler = torch.amp.GradScaler(device.type, enabled=args.fp16)  # --fp16 loss scaling; else a no-op
    # </shared>
    # <shared: resume, evaluate before>
    ckpt_dir = os.path.join(args.output, "checkpoints")
    start = 0
    if args.resume and latest_checkpoint(ckpt_dir) is not None:
        start = load_checkpoint(
            ckpt_dir, model=parts.state, optimizer=optimizer, sampler=loader, scheduler=scheduler, scaler=scaler
        )
        log.info("resumed from %s at step %d", latest_checkpoint(ckpt_dir), start)
    before, before_file = None, os.path.join(args.output, "metrics_before.json")
    if val and start == 0:  # every rank embeds a share
        before = evaluate(args, parts, val, device)
        if rank == 0:
            with open(before_file, "w") as f:
                json.dump(before, f)
    elif val and os.path.exists(before_file):  # resumed: the first launch's
        with open(before_file) as f:
            before = json.load(f)
    # </shared>
    # <shared: the loop>
    end = min(total, args.stop_at or total)
    log.info("steps %d -> %d of %d, %d rows/step on %d rank(s)", start, end, total, args.batch_size * world, world)
    gc = None if not args.chunk_size else GradCache(args.chunk_size, sync_module=parts.model, splitter=parts.splitter)
    losses = []
    with RunLog(args.output, args.report_to, rank, args.log_every, vars(args)) as run_log:
        for step, batches, _ in loader.steps(end):
            loss = 0.0
            for batch in accumulate_gradients(parts.state, batches):
                micro = step_loss(args, parts, batch, gc, device) / len(batches)
                scaler.scale(micro).backward()  # --fp16: scaled (GradCache carries the scale); else as is
                loss += micro.detach()
            scaler.unscale_(optimizer)
            grad_norm = clip_gradients(parts.state.parameters(), args.max_grad_norm)
            scaler.step(optimizer)  # --fp16: skipped when a gradient is inf/NaN (the same on every rank)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(mean_over_ranks(loss))  # the global batch's loss, not this rank's
            samples = args.batch_size * world * len(batches)
            run_log.log(step, total, samples, loss=losses[-1], lr=scheduler.get_last_lr()[0], grad_norm=grad_norm)
            if (args.save_every and step % args.save_every == 0) or step == end:
                save_checkpoint(
                    ckpt_dir,
                    model=parts.state,
                    optimizer=optimizer,
                    step=step,
                    sampler=loader,
                    scheduler=scheduler,
                    scaler=scaler,
                )
            if val and args.eval_every and step % args.eval_every == 0 and step < total:
                run_log.eval(step, evaluate(args, parts, val, device))
    # </shared>
    # <shared: finish>
    result = {"losses": losses}
    if end < total:
        log.info("stopped at step %d of %d; continue with --resume", end, total)
    else:
        export(args, parts, os.path.join(args.output, "final"))
        log.info("exported to %s", os.path.join(args.output, "final"))
        if val:
            result.update(write_metrics(args.output, before, evaluate(args, parts, val, device), rank))
    shutdown_distributed()
    return result
    # </shared>


if __name__ == "__main__":
    main()
