r"""Fine-tune a CLIP / SigLIP dual encoder for retrieval: GradCache, cross-rank negatives, eval, export.

Demo (no --data): renders a toy image-caption set with Pillow, builds a tiny random CLIP, trains
300 steps (15-30 s on 2 CPU cores) and prints retrieval before/after:

    python recipes/clip_t2i.py
    torchrun --nproc_per_node=2 recipes/clip_t2i.py

Your data (JSONL/CSV/Parquet in a seed format, or shards: docs/data.md): one GPU, eight, two nodes; image-only:

    python recipes/clip_t2i.py --model openai/clip-vit-base-patch32 --data train.jsonl --val-data val.jsonl \
        --batch-size 256 --chunk-size 64 --bf16 --output runs/clip
    torchrun --nproc_per_node=8 recipes/clip_t2i.py ...same flags...
    torchrun --nnodes 2 --node_rank $NODE_RANK --nproc_per_node=8 --master_addr $HEAD --master_port 29500 \
        recipes/clip_t2i.py ...same flags... --output /shared/runs/clip
    python recipes/clip_t2i.py --vision-model facebook/dinov2-small --format i2i --data pairs.jsonl --output runs/sku

--batch-size is per rank; every query sees the positives (and hard negatives) of all ranks.
Writes <output>/args.json, train_log.jsonl, metrics.json ({"before": ..., "after": ...}),
checkpoints under <output>/checkpoints (resume with --resume) and the model to <output>/final.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from vembed_blocks import towers
from vembed_blocks.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from vembed_blocks.data.collate import DualEncoderCollator
from vembed_blocks.data.guide_inputs import WithGuideInputs
from vembed_blocks.data.loader import training_batches
from vembed_blocks.data.records import load_records
from vembed_blocks.demo import build_tiny_clip, render_demo
from vembed_blocks.distributed import (
    average_gradients,
    get_rank,
    init_distributed,
    mean_over_ranks,
    shutdown_distributed,
)
from vembed_blocks.embed import evaluate_retrieval_by
from vembed_blocks.export import export_pretrained
from vembed_blocks.grad_sync import clip_gradients, defer_gradient_sync
from vembed_blocks.gradcache import GradCache
from vembed_blocks.gradcache_split import RowSplit
from vembed_blocks.input_check import InputCheck
from vembed_blocks.length_chunks import LengthSplit, encode_in_length_chunks
from vembed_blocks.losses import Matryoshka
from vembed_blocks.parallel import apply_lora, checkpoint_layers, compile_layers
from vembed_blocks.recipe_flags import (
    add_false_negative_args,
    add_masked,
    add_padding_args,
    common_parser,
    false_negative_counts,
    false_negative_rules,
    masked_counts,
    mrl_dims,
)
from vembed_blocks.report import write_report
from vembed_blocks.run_log import (
    RunLog,
    claim_run_folder,
    read_metrics_before,
    save_metrics_before,
    write_args,
    write_metrics,
)
from vembed_blocks.schedule import make_scheduler, warmup_steps
from vembed_blocks.step_guard import StepGuard
from vembed_blocks.user_errors import report_user_errors

log = logging.getLogger("clip_t2i")
DATA_HELP = "training file (JSONL/CSV/Parquet); default: the rendered demo set (and a tiny CLIP)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = common_parser(
        __doc__,
        output="runs/clip_t2i",
        lr=1e-5,
        batch_size=64,
        weight_decay=0.1,
        data_help=DATA_HELP,
        require_data=False,
    )
    p.add_argument("--model", help="HF id or local folder (CLIP/SigLIP); default: a tiny random CLIP (demo)")
    p.add_argument("--vision-model", help="a HF vision backbone (e.g. facebook/dinov2-small); alone: image-only (i2i)")
    p.add_argument("--text-model", help="with --vision-model: a HF text backbone (e.g. bert-base-uncased): towers")
    p.add_argument("--proj-dim", type=int, default=256, help="composed towers: shared embedding width")
    p.add_argument("--text-pooling", default="mean", help="composed towers: text pooling (mean, cls, last, max, ...)")
    p.add_argument("--format", choices=["t2i", "i2t", "i2i", "t2t"], help="declare the data format (else detected)")
    p.add_argument("--loss", choices=["infonce", "siglip"], default="infonce")
    p.add_argument("--symmetric", action="store_true", help="InfoNCE: also doc->query")
    temperature = "initial T: logits = cos / T for both losses (SigLIP's t = 1/T); default: the model's own"
    p.add_argument("--temperature", type=float, help=temperature)
    p.add_argument("--demo-quick", action="store_true", help="demo: a smaller set and model (tests)")
    add_padding_args(p, token_budget=False)  # --trim-padding (on: CLIP and composed towers), --trim-chunk-size
    add_false_negative_args(p, "a CLIP/SigLIP folder or HF id (default family: another --model)")
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
    guide: object = None  # --fn-guide: the frozen guide's embedding function (inputs -> [b, G])
    guide_collator: object = None  # its own processor's inputs of the same rows
    masked: dict = field(default_factory=dict)  # false negatives each rule masked this step (step_loss adds)


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
    if args.text_model and not args.vision_model:
        raise SystemExit("--text-model needs --vision-model (composed towers)")
    if args.vision_model and not args.text_model and args.format != "i2i":
        raise SystemExit("--vision-model without --text-model trains an image-only encoder: pass --format i2i")
    if args.vision_model and args.lora:
        raise SystemExit("--lora is not supported for composed towers yet; fine-tune them fully")
    if not args.vision_model and args.model is None:
        raise SystemExit("--model is required with --data (an HF id or a local folder)")
    if args.vision_model:
        model, processor = towers.compose_dual_encoder(
            args.vision_model, args.text_model, args.proj_dim, args.text_pooling
        )
    else:
        model, processor = towers.load_dual_encoder(args.model)
    a = args  # the false-negative rules (--fn-*): checked at parse time
    rules = false_negative_rules(a.fn_margin, a.fn_ratio, a.fn_weight, a.fn_guide, a.fn_guide_margin, a.fn_guide_ratio)
    criterion = towers.contrastive_loss_for(model.to(device), args.loss, args.temperature, args.symmetric, rules)
    if args.mrl_dims:  # the loss over nested prefixes of the embedding
        criterion = Matryoshka(criterion, mrl_dims(args.mrl_dims))
    criterion = criterion.to(device)
    if args.grad_checkpointing:
        checkpoint_layers(model)
    if args.lora:  # after checkpointing: LoRA wraps the layers checkpointing must still see as blocks
        model = apply_lora(model, r=args.lora, alpha=args.lora_alpha)
    if args.compile:  # last: compiles the checkpointed, LoRA-wrapped blocks
        compile_layers(model)
    model.train()
    groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    groups.append({"params": list(criterion.parameters()), "weight_decay": 0.0})
    padding = towers.text_padding(model)
    collator = DualEncoderCollator(processor, **padding)
    trim = args.trim_padding and padding["padding"] is True  # SigLIP pools position -1 of max_length padding
    state = nn.ModuleDict({"model": model, "loss": criterion})
    parts = Parts(model, state, groups, criterion, collator, processor, LengthSplit if trim else None)
    parts.masked = false_negative_counts(args.fn_duplicates, rules)
    if args.fn_guide:  # frozen, eval mode: its scores only choose which candidates to drop
        guide, guide_processor = towers.load_dual_encoder(args.fn_guide)
        guide = guide.to(device).eval().requires_grad_(False)
        parts.guide = lambda **x: towers.dual_encoder_features(guide, x)
        parts.guide_collator = DualEncoderCollator(guide_processor, **towers.text_padding(guide))
    return parts


def load_data(args: argparse.Namespace, parts: Parts, path: str, rank: int, world: int):
    """(batches, rows per epoch): one task, the file's records; or shards, streamed (--max-steps)."""
    options = dict(batch_size=args.batch_size, seed=args.seed, rank=rank, world_size=world, format=args.format)
    options.update(num_workers=args.num_workers, grad_accum_steps=args.grad_accum_steps, max_steps=args.max_steps)
    options.update(skip_bad=args.skip_bad, max_bad_fraction=args.max_bad_fraction, skip_bad_shards=args.skip_bad_shards)
    options.update(columns=args.columns, delimiter=args.csv_delimiter, allow_mixed=args.allow_mixed_data)
    collate = WithGuideInputs(parts.collator, parts.guide_collator) if args.fn_guide else parts.collator
    return training_batches(path, collate, **options)


def step_loss(args: argparse.Namespace, parts: Parts, batch: dict, gc: GradCache | None, device) -> torch.Tensor:
    """Encode queries, positives and (where the batch has them) hard negatives; the loss over all ranks."""

    fn = lambda **x: towers.dual_encoder_features(parts.model, x)

    def encode(inputs: dict) -> torch.Tensor:  # GradCache: chunks without graphs now, replayed by loss.backward()
        inputs = {k: v.to(device) for k, v in inputs.items()}
        with autocast(args, device):
            if gc is not None:
                return gc.encode(fn, **inputs).float()
            if parts.splitter is LengthSplit and "pixel_values" not in inputs:  # text: sorted chunks, graphs kept
                return encode_in_length_chunks(fn, inputs, args.trim_chunk_size).float()
            return fn(**inputs).float()

    extra = {"labels": batch["labels"].to(device)} if "labels" in batch else {}
    if "negatives" in batch:  # the flat real negatives: a candidate pool (SigLIP: negative-only columns)
        extra["negatives"] = encode(batch["negatives"])
    if args.fn_duplicates:  # content ids ([M] negatives, like the pool): candidates equal to the positive drop
        extra["content_ids"] = {k: v.to(device) for k, v in batch["content_ids"].items()}
    if parts.guide is not None:  # --fn-guide: the frozen guide's embeddings of the same rows, without gradient
        sides = [k for k in ("query", "positive", "negatives") if k in batch["guide"]]
        extra["guide"] = {k: guide_embed(args, parts, batch["guide"][k], device) for k in sides}
    loss = parts.criterion(encode(batch["query"]), encode(batch["positive"]), **extra)
    if parts.model.training:  # a training micro-batch (validation_loss runs in eval mode): this step's counts
        add_masked(parts.masked, parts.criterion, device)  # Matryoshka: its inner loss's
    return loss


@torch.no_grad()
def guide_embed(args: argparse.Namespace, parts: Parts, inputs: dict, device) -> torch.Tensor:
    """The frozen guide's ``[b, G]`` embeddings of one side, --chunk-size rows at a time (bounded memory)."""
    split = RowSplit(((), {k: v.to(device) for k, v in inputs.items()}))
    rows = args.chunk_size or len(split)
    with autocast(args, device):
        return torch.cat([parts.guide(**split[s : s + rows][1]) for s in range(0, len(split), rows)]).float()


@torch.no_grad()
def evaluate(args: argparse.Namespace, parts: Parts, path: str, device) -> dict[str, float]:
    """Retrieval metrics of ``path``'s unique queries against its corpus; every rank embeds a share."""

    fn = lambda **x: towers.dual_encoder_features(parts.model, x)

    def encode(items: list, is_query: bool) -> torch.Tensor:
        inputs = {k: v.to(device) for k, v in parts.collator.encode(items, is_query).items()}
        with autocast(args, device):
            return F.normalize(fn(**inputs).float(), dim=-1)

    parts.model.eval()
    records = load_records(path, format=args.format, columns=args.columns, delimiter=args.csv_delimiter)
    widths = mrl_dims(args.mrl_dims)  # also the metrics at each Matryoshka width ("dim<w>/<metric>")
    metrics = evaluate_retrieval_by(records, encode, args.relevance, args.eval_batch_size, curve_k=100, widths=widths)
    parts.model.train()
    return metrics


def export(args: argparse.Namespace, parts: Parts, final: str) -> None:
    """The model with the learned temperature (and SigLIP bias) written back into it; every rank calls it."""
    model = parts.model
    towers.write_temperature_back(model, parts.criterion)
    if not isinstance(model, towers.ComposedDualEncoder):
        export_pretrained(model, final, processor=parts.processor)
    elif get_rank() == 0:
        model.save_pretrained(final)  # not one HF architecture: two HF folders + projections
        parts.processor.save_pretrained(final)


# ----------------------------------------------------------------------------- the run (shared by every recipe)


# <shared: helpers>
def autocast(args: argparse.Namespace, device: torch.device) -> torch.autocast:
    """The autocast the flags ask for: bf16 (--bf16), fp16 (--fp16) or off."""
    dtype = torch.float16 if args.fp16 else torch.bfloat16
    return torch.autocast(device.type, dtype, enabled=args.bf16 or args.fp16)


@torch.no_grad()
def validation_loss(args: argparse.Namespace, parts, path: str, rank: int, world: int, device) -> dict[str, float]:
    """{"loss": step_loss over one pass of ``path``'s batches}, beside the retrieval metrics (--eval-every); {} where
    load_data says the loss is undefined. Eval mode, no GradCache; the RNG restored after, so a run that evaluates
    draws the same training noise as one resumed from the checkpoint saved just before the evaluation."""
    made = load_data(args, parts, path, rank, world)  # built afresh: every evaluation sees the same batches
    if made is None:
        return {}
    loader, rows = made
    steps = max(1, rows // (args.batch_size * world * args.grad_accum_steps))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        parts.model.eval()
        losses = [step_loss(args, parts, b, None, device).float() for _, micro, _ in loader.steps(steps) for b in micro]
        parts.model.train()
    return {"loss": mean_over_ranks(torch.stack(losses).mean())}


# </shared>


def main(argv: list[str] | None = None) -> dict:
    # <shared: set-up>
    args = parse_args(argv)  # the shared flags checked too
    rank, world, device = init_distributed()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(asctime)s %(message)s")
    torch.manual_seed(args.seed)
    inputs = [value for name, value in vars(args).items() if name != "output"]  # paths the run must not overwrite
    overwrite = args.overwrite or args.data is None  # the demo renders its own data: running it again starts afresh
    claim_run_folder(args.output, resume=args.resume, overwrite=overwrite, inputs=inputs, rank=rank)
    os.makedirs(args.output, exist_ok=True)
    data, val = prepare_data(args, rank, world)
    parts = build(args, device)
    loader, rows = load_data(args, parts, data, rank, world)
    total = args.max_steps or max(1, round(args.epochs * rows / (args.batch_size * world * args.grad_accum_steps)))
    optimizer = torch.optim.AdamW(parts.param_groups, lr=args.lr, weight_decay=args.weight_decay)
    warmup = warmup_steps(args.warmup_steps, args.warmup_ratio, total)
    scheduler = make_scheduler(optimizer, args.lr_schedule, warmup, total)
    scaler = torch.amp.GradScaler(device.type, enabled=args.fp16)  # --fp16 loss scaling; else a no-op
    guard = StepGuard(args.max_bad_steps, args.max_bad_fraction)  # a non-finite step is skipped on every rank
    input_check = InputCheck(parts.collator, strict=not args.ignore_input_check)  # the first batches' content
    # </shared>
    # <shared: resume, evaluate before>
    ckpt_dir, ckpt = os.path.join(args.output, "checkpoints"), dict(model=parts.state, optimizer=optimizer)
    ckpt.update(sampler=loader, scheduler=scheduler, scaler=scaler, extra_state={"guard": guard})  # all it restores
    start = load_checkpoint(ckpt_dir, **ckpt) if args.resume and latest_checkpoint(ckpt_dir) else 0  # or refused
    write_args(vars(args), args.output, args.resume, rank)  # after the resume checks: a refused one changes nothing
    if start:
        log.info("resumed from %s at step %d", latest_checkpoint(ckpt_dir), start)
    elif args.resume:
        log.warning("--resume: no checkpoint in %s yet, so this run starts at step 0", ckpt_dir)
    before = None
    if val and start == 0:
        before = save_metrics_before(args.output, evaluate(args, parts, val, device), rank)
    elif val:  # a resumed run reports the first launch's "before"
        before = read_metrics_before(args.output)
    # </shared>
    # <shared: the loop>
    end = min(total, args.stop_at or total)
    log.info("steps %d -> %d of %d, %d rows/step on %d rank(s)", start, end, total, args.batch_size * world, world)
    gc = None if not args.chunk_size else GradCache(args.chunk_size, sync_module=parts.model, splitter=parts.splitter)
    losses = []
    with RunLog(args.output, args.report_to, rank, args.log_every, vars(args)) as run_log:
        for step, batches, streams in loader.steps(end):
            input_check.see(batches)  # agreed by every rank: unknown tokens, empty texts, one-colour images
            loss = 0.0
            for batch in defer_gradient_sync(parts.state, batches):  # FSDP2/DDP sync on the last micro-batch only
                micro = step_loss(args, parts, batch, gc, device) / len(batches)
                scaler.scale(micro).backward()  # --fp16: scaled (GradCache carries the scale); else as is
                loss += micro.detach()
            average_gradients(p for p in parts.state.parameters() if p.requires_grad)  # plain grads: one all-reduce
            scaler.unscale_(optimizer)
            grad_norm = clip_gradients(parts.state.parameters(), args.max_grad_norm)  # NaN/inf: clips nothing
            samples = loader.step_rows  # this step's rows over all ranks (a token budget varies them)
            if guard.check(step, loss, grad_norm, rows=samples, bad_rows=loader.bad_rows):  # agreed by every rank
                scaler.step(optimizer)  # else skipped: a NaN on one rank would reach every weight
            scaler.update()  # --fp16: an inf/NaN gradient lowers the loss scale
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(mean_over_ranks(loss))  # the global batch's loss, not this rank's
            lr = scheduler.get_last_lr()[0]
            extra = dict(grad_norm=grad_norm, task=" ".join(streams), **guard.counts(), **masked_counts(parts, world))
            run_log.log(step, total, samples, loss=losses[-1], lr=lr, **extra)
            if (args.save_every and step % args.save_every == 0) or step == end:
                save_checkpoint(ckpt_dir, step=step, **ckpt)
            if val and args.eval_every and step % args.eval_every == 0 and step < total:
                val_loss = validation_loss(args, parts, val, rank, world, device)  # {} where undefined
                run_log.eval(step, {**evaluate(args, parts, val, device), **val_loss})
    # </shared>
    # <shared: finish>
    health = {**guard.counts(), "read_skipped": loader.read_skipped, "bad_shards": loader.bad_shards}
    log.info("health: %s", ", ".join(f"{k} {v}" for k, v in health.items()))  # what the run skipped, if anything
    result = {"losses": losses, "health": health}
    if end < total:
        log.info("stopped at step %d of %d; continue with --resume", end, total)
    else:
        export(args, parts, os.path.join(args.output, "final"))
        log.info("exported to %s", os.path.join(args.output, "final"))
        if val:
            result.update(write_metrics(args.output, before, evaluate(args, parts, val, device), rank, health))
    if rank == 0:  # report.md (+ PNG plots with the report extra) from the run folder's files
        log.info("report: %s", write_report(args.output))
    shutdown_distributed()
    return result
    # </shared>


if __name__ == "__main__":
    with report_user_errors():  # a mistake in flags, files or rows: one line (--debug: the traceback)
        main()
