r"""Train a retrieval head on stored embeddings, mixing tasks by weight: an adapter over a frozen embedding model.

Each subdirectory of --data is a task written by `recipes/extract_embeds.py`; a small MLP per side (`FusionHead`)
maps the frozen embeddings into one space, trained with InfoNCE against every rank's targets: a domain or
composed-retrieval adapter for a frozen embedder (say an 8B VLM) at the price of an MLP. Every global batch is one
task (and number of source images). Seed 004's step 2 (the edit model itself) is `recipes/edit_sft.py`.

Demo (no --data): extract_embeds.py's demo in-process (edit rows with 0-2 source images, a tiny random Qwen3-VL)
into <output>/demo/meta/edit, image pairs into .../pairs; trains on both, prints per-task retrieval before/after:

    python recipes/multitask.py
    torchrun --nproc_per_node=2 recipes/multitask.py

Your stores, one GPU and eight:

    python recipes/multitask.py --data meta/ --train-data-weights "dataset_a=0.5,dataset_b=1.2" \
        --train-src-img-num-weights "0=1,1=1,2=1,3=0" --batch-size 256 --max-steps 2000 --output runs/head
    torchrun --nproc_per_node=8 recipes/multitask.py --data meta/ ... (same flags)

Evaluation (--val-data, default --data): per task, its first --eval-rows queries each retrieve their own target
among those rows' targets. Writes args.json, logs, metrics.json, report.md, checkpoints/ and final/ (FusionHead).
"""

from __future__ import annotations

import argparse
import logging
import os
import runpy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from vembed_blocks.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from vembed_blocks.data.embed_store import EmbedStore, collate_embeddings
from vembed_blocks.data.loader import task_loader
from vembed_blocks.data.sampler import parse_group_weights, parse_weights
from vembed_blocks.demo import render_image_pairs
from vembed_blocks.distributed import (
    average_gradients,
    get_rank,
    init_distributed,
    mean_over_ranks,
    shutdown_distributed,
)
from vembed_blocks.fusion_head import FusionHead, pooled
from vembed_blocks.grad_sync import clip_gradients, defer_gradient_sync
from vembed_blocks.gradcache import GradCache
from vembed_blocks.input_check import InputCheck
from vembed_blocks.losses import InfoNCE
from vembed_blocks.metrics import retrieval_metrics
from vembed_blocks.parallel import apply_lora, checkpoint_layers, compile_layers
from vembed_blocks.recipe_flags import common_parser, masked_counts
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

log = logging.getLogger("multitask")
DATA_HELP = "directory whose subdirectories are tasks (extract_embeds.py outputs); default: the demo's tasks"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = dict(output="runs/multitask", lr=1e-3, batch_size=256, weight_decay=0.03, data_help=DATA_HELP)
    p = common_parser(__doc__, **defaults, require_data=False, records=False)
    p.set_defaults(lr_schedule="constant")  # the seed's constant_with_warmup
    p.add_argument("--train-data-weights", help='task weights, e.g. "a=0.5,b=1.2"; others left out (default: by size)')
    p.add_argument("--train-src-img-num-weights", help='weights per number of source images, e.g. "0=1,1=1,2=1,3=0"')
    p.add_argument("--hidden", type=int, default=1024, help="hidden width of each side's MLP")
    p.add_argument("--dim", type=int, default=512, help="output embedding width")
    p.add_argument("--temperature", type=float, default=0.05, help="InfoNCE: logits = cos / T")
    p.add_argument("--symmetric", action="store_true", help="InfoNCE: also doc->query")
    p.add_argument("--eval-rows", type=int, default=512, help="rows per task for the retrieval check")
    p.add_argument("--demo-quick", action="store_true", help="demo: fewer rows and a smaller model (tests)")
    args, _ = p.parse_known_args(argv)
    if args.data is None:  # the demo's tasks are small: small batches (no row twice in one), explicit flags win
        p.set_defaults(
            batch_size=16, max_steps=60 if args.demo_quick else 1000, train_src_img_num_weights="0=1,1=1,2=1"
        )
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- model, data, loss, evaluation


@dataclass
class Parts:
    model: FusionHead  # what the loop runs forward (and exports)
    state: nn.ModuleDict  # everything a checkpoint restores
    param_groups: list[dict]
    criterion: nn.Module
    tasks: dict[str, EmbedStore]
    splitter: object = None  # how GradCache cuts the inputs into chunks (None: every tensor on dim 0)
    collator: object = None  # none: the rows are stored embeddings (no tokenizer, no images)


def load_tasks(root: str) -> dict[str, EmbedStore]:
    """Every subdirectory of ``root`` with an index is one task's store (all of one embedding width)."""
    dirs = [os.path.join(root, name) for name in sorted(os.listdir(root)) if os.path.isdir(os.path.join(root, name))]
    tasks = {os.path.basename(d): EmbedStore(d) for d in dirs if any(f.startswith("index-") for f in os.listdir(d))}
    if not tasks:
        raise SystemExit(f"{root} has no task subdirectories written by extract_embeds.py")
    dims = {name: (s[0]["query"].shape[-1], s[0]["positive"].shape[-1]) for name, s in tasks.items()}
    if len(set(dims.values())) > 1:
        raise SystemExit(f"tasks have different embedding widths (query, doc): {dims}; extract them with one model")
    return tasks


def prepare_data(args: argparse.Namespace, rank: int, world: int) -> tuple[str, str | None]:
    """(task root, evaluation root: --val-data, else the training tasks' first --eval-rows rows)."""
    args.data = args.data or demo_tasks(args, rank, world)  # no --data: the demo's tasks
    return args.data, args.val_data or args.data


def demo_tasks(args: argparse.Namespace, rank: int, world: int) -> str:
    """``<output>/demo/meta``: task ``edit`` (extract_embeds.py's demo) and ``pairs`` (image pairs, same model)."""
    extract = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "extract_embeds.py"))
    demo, meta = os.path.join(args.output, "demo"), os.path.join(args.output, "demo", "meta")
    if rank == 0:  # before the edit extraction: its barrier (after its own rendering) publishes these files too
        render_image_pairs(demo, per_combo=1 if args.demo_quick else 2, seed=args.seed)
    extract["main"](["--output", f"{meta}/edit", "--seed", str(args.seed), *["--demo-quick"] * args.demo_quick])
    pairs = ["--data", f"{demo}/pairs.jsonl", "--output", f"{meta}/pairs"]
    extract["main"]([*pairs, "--model", f"{meta}/edit/demo/model"])  # the same model: one embedding space
    torch.manual_seed(args.seed)  # the head starts equal on every rank, whatever the extraction drew
    return meta


def build(args: argparse.Namespace, device: torch.device) -> Parts:
    """The tasks' stores, the head sized by their widths, and InfoNCE over every rank's targets."""
    tasks = load_tasks(args.data)
    log.info("tasks: %s", ", ".join(f"{n} ({len(s)} rows)" for n, s in tasks.items()))
    first = next(iter(tasks.values()))[0]
    head = FusionHead(first["query"].shape[-1], first["positive"].shape[-1], args.hidden, args.dim).to(device)
    if args.grad_checkpointing:
        checkpoint_layers(head)
    if args.lora:  # after checkpointing: LoRA wraps the layers checkpointing must still see as blocks
        head = apply_lora(head, r=args.lora, alpha=args.lora_alpha)
    if args.compile:  # last: compiles the checkpointed, LoRA-wrapped blocks
        compile_layers(head)
    head.train()
    criterion = InfoNCE(temperature=args.temperature, symmetric=args.symmetric, gather=True)
    return Parts(head, nn.ModuleDict({"model": head}), [{"params": list(head.parameters())}], criterion, tasks)


def load_data(args: argparse.Namespace, parts: Parts, path: str, rank: int, world: int):
    """(batches, rows per epoch): tasks drawn by --train-data-weights, then by --train-src-img-num-weights."""
    options, tasks = {}, parts.tasks if path == args.data else load_tasks(path)
    if args.train_data_weights:
        options["weights"] = parse_weights(args.train_data_weights, "train data weights")
    if args.train_src_img_num_weights:
        options["group_weights"] = parse_group_weights(args.train_src_img_num_weights)
        edit = {name: s.groups.tolist() for name, s in tasks.items() if len(s.groups) and s.groups.min() >= 0}
        if not edit:
            raise SystemExit("--train-src-img-num-weights: no task records a number of source images (edit format)")
        options["group_of"] = edit
    options.update(batch_size=args.batch_size, seed=args.seed, rank=rank, world_size=world)
    options.update(num_workers=args.num_workers, grad_accum_steps=args.grad_accum_steps, skip_bad=args.skip_bad)
    return task_loader(tasks, collate_embeddings, **options)


def step_loss(args: argparse.Namespace, parts: Parts, batch: dict, gc: GradCache | None, device) -> torch.Tensor:
    """The head on both sides; InfoNCE of this rank's queries against every rank's targets."""

    def encode(side: nn.Module, x: torch.Tensor) -> torch.Tensor:  # GradCache (--chunk-size): replayed by backward()
        with autocast(args, device):
            return (side(x) if gc is None else gc.encode(side, x)).float()

    batch = {k: v.to(device) for k, v in batch.items()}
    q, d = encode(parts.model.query, pooled(batch, "query")), encode(parts.model.doc, pooled(batch, "positive"))
    return parts.criterion(q, d)


@torch.no_grad()
def evaluate(args: argparse.Namespace, parts: Parts, path: str, device) -> dict[str, float]:
    """``"<task>/<metric>"``: each of a task's first --eval-rows queries retrieves its target among theirs.

    Small by design (rows x rows per task), so every rank computes it whole."""
    parts.model.eval()
    out = {}
    for name, store in (parts.tasks if path == args.data else load_tasks(path)).items():
        batch = collate_embeddings([store[i] for i in range(min(args.eval_rows, len(store)))])
        q, d = parts.model(pooled(batch, "query").to(device), pooled(batch, "positive").to(device))
        scores = F.normalize(q.float(), dim=-1) @ F.normalize(d.float(), dim=-1).T
        metrics = retrieval_metrics(scores.cpu(), [{i} for i in range(len(q))], ks=(1, 5))
        out.update({f"{name}/{k}": v for k, v in metrics.items()})
    parts.model.train()
    return out


def export(args: argparse.Namespace, parts: Parts, final: str) -> None:
    """The head as config.json + model.safetensors (rank 0)."""
    if get_rank() == 0:
        parts.model.save_pretrained(final)


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
