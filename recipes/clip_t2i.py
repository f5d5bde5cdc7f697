"""Fine-tune a CLIP / SigLIP dual encoder for retrieval: GradCache, cross-rank negatives, eval, export.

Demo (no --data): renders a toy image-caption dataset with Pillow, builds a tiny random CLIP,
trains a few minutes on CPU and prints retrieval before/after:

    python recipes/clip_t2i.py

Your data (JSONL in any seed format, see docs/data.md), one GPU and eight:

    python recipes/clip_t2i.py --model openai/clip-vit-base-patch32 --data train.jsonl \
        --val-data val.jsonl --batch-size 256 --chunk-size 64 --bf16 --output runs/clip
    torchrun --nproc_per_node=8 recipes/clip_t2i.py --model openai/clip-vit-base-patch32 \
        --data train.jsonl --val-data val.jsonl --batch-size 256 --chunk-size 64 --bf16 --output runs/clip

--batch-size is per rank; every query sees the positives (and hard negatives) of all ranks.
Writes <output>/metrics.json ({"before": ..., "after": ...}), checkpoints under
<output>/checkpoints (resume with --resume) and the fine-tuned model to <output>/final.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from vembed_blocks import InfoNCE, Matryoshka, SigLIP, get_rank, get_world_size, init_distributed, retrieval_metrics
from vembed_blocks.checkpoint import export_pretrained, latest_checkpoint, load_checkpoint, save_checkpoint
from vembed_blocks.data import DualEncoderCollator, TaskBatches, WeightedTaskSampler, load_records
from vembed_blocks.demo import build_tiny_clip, render_demo
from vembed_blocks.distributed import average_gradients, mean_over_ranks, shutdown_distributed
from vembed_blocks.embed import embed_items, retrieval_set
from vembed_blocks.gradcache import GradCache
from vembed_blocks.metrics import format_table
from vembed_blocks.parallel import (
    apply_lora,
    checkpoint_layers,
    clip_gradients,
    compile_layers,
    one_gradient_sync,
    wrap_ddp,
)
from vembed_blocks.schedule import warmup_cosine
from vembed_blocks.towers import ComposedDualEncoder, compose_dual_encoder, dual_encoder_features, load_dual_encoder

log = logging.getLogger("clip_t2i")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF id or local folder (CLIP/SigLIP); default: a tiny random CLIP (demo)")
    p.add_argument(
        "--vision-model", help="compose a dual encoder: any HF vision backbone (e.g. facebook/dinov2-small) ..."
    )
    p.add_argument(
        "--text-model", help="... plus any HF text backbone (e.g. bert-base-uncased), with linear projections"
    )
    p.add_argument("--proj-dim", type=int, default=256, help="composed towers: shared embedding width")
    p.add_argument(
        "--text-pooling", default="mean", help="composed towers: text pooling (mean, cls, last, max, weighted_mean)"
    )
    p.add_argument("--data", help="training file (JSONL/CSV/Parquet); default: the rendered demo set")
    p.add_argument("--val-data", help="validation file for before/after retrieval metrics")
    p.add_argument("--format", choices=["t2i", "i2t", "i2i", "t2t"], help="declare the data format (else detected)")
    p.add_argument("--loss", choices=["infonce", "siglip"], default="infonce")
    p.add_argument("--symmetric", action="store_true", help="InfoNCE: also doc->query")
    p.add_argument("--temperature", type=float, help="initial temperature (default: the model's logit_scale)")
    p.add_argument("--batch-size", type=int, default=64, help="rows per rank per step")
    p.add_argument("--chunk-size", type=int, default=0, help="GradCache rows per chunk (0 = off)")
    p.add_argument("--lora", type=int, default=0, help="LoRA rank (0 = full fine-tuning)")
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--mrl-dims", help="Matryoshka dims, e.g. '512,256,128'")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, help="overrides --epochs")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm (0 = off)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the encoders")
    p.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing of every block")
    p.add_argument("--compile", action="store_true", help="torch.compile every block in place")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers (decode + processor)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=0, help="retrieval metrics on --val-data every N steps (0 = off)")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0 = at the end only)")
    p.add_argument("--resume", action="store_true", help="continue from <output>/checkpoints")
    p.add_argument("--stop-at", type=int, help="save and exit at this step (split a run across jobs; then --resume)")
    p.add_argument("--eval-batch-size", type=int, default=128)
    p.add_argument("--output", default="runs/clip_t2i")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--demo-quick", action="store_true", help="demo: a smaller set and model (tests)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- pieces of the loop


def build_model(args: argparse.Namespace) -> tuple[nn.Module, object]:
    """(model, processor): composed towers from --vision-model/--text-model, else the --model folder/id."""
    if bool(args.vision_model) != bool(args.text_model):
        raise SystemExit("--vision-model and --text-model go together")
    if args.vision_model:
        if args.lora:
            raise SystemExit("--lora is not supported for composed towers yet; fine-tune them fully")
        return compose_dual_encoder(args.vision_model, args.text_model, args.proj_dim, args.text_pooling)
    if args.model is None:
        raise SystemExit("--model is required with --data (an HF id or a local folder)")
    return load_dual_encoder(args.model)


def make_loss(args: argparse.Namespace, hf_model: nn.Module) -> nn.Module:
    """InfoNCE or SigLIP whose learnable temperature (and bias) start from the model's own."""
    logit_scale = getattr(hf_model, "logit_scale", None)
    if args.loss == "siglip":
        t = args.temperature or (math.exp(logit_scale.item()) if logit_scale is not None else 10.0)
        bias = getattr(hf_model, "logit_bias", None)
        loss = SigLIP(temperature=t, bias=bias.item() if bias is not None else -10.0, learn=True)
    else:
        t = args.temperature or (math.exp(-logit_scale.item()) if logit_scale is not None else 0.05)
        loss = InfoNCE(temperature=t, learn_temperature=True, symmetric=args.symmetric)
    # The loss owns scale and bias now; frozen in the model so DDP never waits for their gradients.
    for name in ("logit_scale", "logit_bias"):
        if isinstance(getattr(hf_model, name, None), nn.Parameter):
            getattr(hf_model, name).requires_grad_(False)
    if args.mrl_dims:
        return Matryoshka(loss, [int(d) for d in args.mrl_dims.split(",")])
    return loss


def copy_scale_into_model(loss: nn.Module, hf_model: nn.Module) -> None:
    """Write the learned temperature (and SigLIP bias) back into the model before export."""
    inner = loss.loss if isinstance(loss, Matryoshka) else loss
    with torch.no_grad():
        if isinstance(getattr(hf_model, "logit_scale", None), torch.Tensor):
            hf_model.logit_scale.copy_(inner.log_scale.reshape(hf_model.logit_scale.shape))
        if isinstance(inner, SigLIP) and isinstance(getattr(hf_model, "logit_bias", None), torch.Tensor):
            hf_model.logit_bias.copy_(inner.bias.reshape(hf_model.logit_bias.shape))


@torch.no_grad()
def evaluate(hf_model: nn.Module, collator: DualEncoderCollator, path: str, args, device) -> dict[str, float]:
    """Embed the unique queries and corpus of ``path`` and score retrieval (rank 0 only)."""
    rs = retrieval_set(load_records(path, format=args.format))
    was_training = hf_model.training
    hf_model.eval()

    def encode(is_query: bool):
        def run(items):
            inputs = {k: v.to(device) for k, v in collator.encode(items, is_query).items()}
            with torch.autocast(device.type, torch.bfloat16, enabled=args.bf16):
                return F.normalize(dual_encoder_features(hf_model, inputs).float(), dim=-1)

        return run

    q = embed_items(rs.queries, encode(True), args.eval_batch_size, "embed queries")
    d = embed_items(rs.docs, encode(False), args.eval_batch_size, "embed corpus")
    hf_model.train(was_training)
    return retrieval_metrics(q @ d.T, rs.relevant, ks=(1, 5, 10))


# ----------------------------------------------------------------------------- main


def prepare_demo(args: argparse.Namespace, rank: int, world: int) -> tuple[str, str | None]:
    """Return (train file, val file); with no --data render the demo set (rank 0) and pick its defaults."""
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
    if args.lr == 1e-5:  # from scratch, not fine-tuning
        args.lr = 2e-3
    args.max_steps = args.max_steps or (40 if args.demo_quick else 300)
    return os.path.join(demo, "train.jsonl"), args.val_data or os.path.join(demo, "val.jsonl")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    rank, world, device = init_distributed()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(asctime)s %(message)s")
    torch.manual_seed(args.seed)
    os.makedirs(args.output, exist_ok=True)
    data, val = prepare_demo(args, rank, world)
    hf_model, processor = build_model(args)
    hf_model.to(device)
    criterion = make_loss(args, hf_model).to(device)
    if args.grad_checkpointing:
        checkpoint_layers(hf_model)
    if args.lora:
        hf_model = apply_lora(hf_model, r=args.lora, alpha=args.lora_alpha)
    if args.compile:
        compile_layers(hf_model)
    hf_model.train()
    # One tower per forward: parameters of the other tower are legitimately unused.
    model = wrap_ddp(hf_model, find_unused_parameters=True)
    siglip = "siglip" in type(hf_model).__name__.lower()  # SigLIP was trained on max_length=64 padding
    collator = DualEncoderCollator(processor, max_length=64 if siglip else 77, padding="max_length" if siglip else True)

    train = load_records(data, format=args.format)
    sampler = WeightedTaskSampler({"train": len(train)}, args.batch_size, seed=args.seed, rank=rank, world_size=world)
    total = args.max_steps or max(1, round(args.epochs * math.ceil(len(train) / (args.batch_size * world))))
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in hf_model.parameters() if p.requires_grad]},
            {"params": list(criterion.parameters()), "weight_decay": 0.0},
        ],
        lr=args.lr,
        weight_decay=args.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(args.warmup_steps, total))
    state = nn.ModuleDict({"model": hf_model, "loss": criterion})  # everything a checkpoint restores
    ckpt_dir = os.path.join(args.output, "checkpoints")
    start = 0
    if args.resume and latest_checkpoint(ckpt_dir) is not None:
        start = load_checkpoint(ckpt_dir, model=state, optimizer=optimizer, sampler=sampler, scheduler=scheduler)
        log.info("resumed from %s at step %d", latest_checkpoint(ckpt_dir), start)

    before_file = os.path.join(args.output, "metrics_before.json")
    if val and rank == 0 and (start == 0 or not os.path.exists(before_file)):
        with open(before_file, "w") as f:
            json.dump(evaluate(hf_model, collator, val, args, device), f)
    if val and rank == 0:
        with open(before_file) as f:
            print(format_table(json.load(f)), flush=True)

    end = min(total, args.stop_at or total)
    batches = TaskBatches({"train": train}, sampler, collator, steps=end - start)
    # Own generator: creating the iterator would otherwise draw from the global RNG, and a
    # resumed run would then replay different dropout masks than the uninterrupted one.
    loader = DataLoader(
        batches, batch_size=None, num_workers=args.num_workers, generator=torch.Generator().manual_seed(args.seed)
    )
    log.info(
        "training steps %d -> %d of %d, %d rows/step over %d rank(s)", start, end, total, args.batch_size * world, world
    )

    def evaluate_during(step: int) -> None:  # --eval-every: rank 0 scores; the others wait at the next collective
        # noqa below: main() deletes hf_model before shutdown, after the last call of this closure
        if val and rank == 0:
            metrics = evaluate(hf_model, collator, val, args, device)  # noqa: F821
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
        args, loader, model, criterion, optimizer, scheduler, sampler, state, total, end, device, evaluate_during
    )

    result = {"losses": losses}
    if end < total:
        log.info("stopped at step %d of %d; continue with --resume", end, total)
    else:
        result.update(finish(args, model, hf_model, criterion, processor, collator, val, before_file, device))
    del model, hf_model, state  # the DDP wrapper must go before the process group (see shutdown_distributed)
    shutdown_distributed()
    return result


def train_loop(
    args, loader, model, criterion, optimizer, scheduler, sampler, state, total, end, device, evaluate_during
) -> list[float]:
    """The explicit loop: encode both sides (GradCache if --chunk-size), loss, step, log, save."""
    rank, world = get_rank(), get_world_size()
    gc = GradCache(chunk_size=args.chunk_size, sync_module=model) if args.chunk_size else None
    ckpt_dir = os.path.join(args.output, "checkpoints")

    def encode(inputs: dict) -> torch.Tensor:
        inputs = {k: v.to(device) for k, v in inputs.items()}
        with torch.autocast(device.type, torch.bfloat16, enabled=args.bf16):
            if gc is None:
                return dual_encoder_features(model, inputs).float()
            return gc.encode(lambda **x: dual_encoder_features(model, x), **inputs).float()

    t0, seen, losses = time.perf_counter(), 0, []
    train_log = open(os.path.join(args.output, "train_log.jsonl"), "a") if rank == 0 else None
    for item in loader:
        step, batch = item["step"] + 1, item["batch"]
        with one_gradient_sync(model):  # several forwards, one gradient all-reduce (parallel.one_gradient_sync)
            q, p = encode(batch["query"]), encode(batch["positive"])
            extra = {"labels": batch["labels"].to(device)} if "labels" in batch else {}
            if "negatives" in batch:  # the flat real negatives: a candidate pool (SigLIP: negative-only columns)
                extra["negatives"] = encode(batch["negatives"])
            loss = criterion(q, p, **extra)
            loss.backward()
        average_gradients(criterion.parameters())  # DDP does not see the loss's own parameters
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


def finish(args, model, hf_model, criterion, processor, collator, val, before_file, device) -> dict:
    """Export the model (learned temperature folded back in) and evaluate after training."""
    copy_scale_into_model(criterion, hf_model)
    final = os.path.join(args.output, "final")
    if isinstance(hf_model, ComposedDualEncoder):  # not one HF architecture: two HF folders + projections
        if get_rank() == 0:
            hf_model.save_pretrained(final)
            processor.save_pretrained(final)
    else:
        export_pretrained(model, final, processor=processor)
    log.info("exported to %s", final)
    if not val or get_rank() != 0:
        return {}
    with open(before_file) as f:
        before = json.load(f)
    after = evaluate(hf_model, collator, val, args, device)
    with open(os.path.join(args.output, "metrics.json"), "w") as f:
        json.dump({"before": before, "after": after}, f, indent=1)
    print(format_table(before, after), flush=True)
    return {"before": before, "after": after}


if __name__ == "__main__":
    main()
