r"""Fine-tune the Qwen-Image(-Edit) diffusion transformer on stored prompt embeddings (seed 004, step 2).

Demo (no --data): a tiny random Qwen-Image-Edit folder, rendered edit rows (0-2 source images) stored in-process by
extract_embeds.py under <output>/demo; 300 steps, 18 s (2 ranks: 45 s) on 2 CPU cores; prints the loss curve:

    python recipes/edit_sft.py
    torchrun --nproc_per_node=2 recipes/edit_sft.py

Your stores (--data: a task per subdirectory, extract_embeds.py's output for the folder), 1 GPU, 8, 2 nodes:

    python recipes/edit_sft.py --model /path/to/Qwen-Image-Edit-2509 --data meta/ --bf16 --grad-checkpointing
    torchrun --nproc_per_node=8 recipes/edit_sft.py --model /path/to/Qwen-Image-Edit-2509 --data meta/ \
        --train-data-weights "dataset_a=0.5,dataset_b=1.2,dataset_c=1.0" --train-src-img-num-weights "0=1,1=1,2=1,3=0" \
        --batch-size 1 --image-sample-size 512 --max-steps 512 --lr 2e-5 --lr-schedule constant --warmup-steps 100 \
        --checkpointing-steps 100 --grad-checkpointing --bf16 --adam-weight-decay 3e-2 --max-grad-norm 0.05 \
        --uniform-sampling --trainable-modules . --vae-mini-batch 1 --output runs/edit
    torchrun --nnodes 2 --node_rank $NODE_RANK --nproc_per_node=8 --master_addr $HEAD --master_port 29500 \
        recipes/edit_sft.py ...same flags... --output /shared/runs/edit
Writes args.json, train_log.jsonl, metrics.json (--val-data flow loss), checkpoints/, final/ (docs/recipes/edit_sft.md).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import runpy
from argparse import SUPPRESS
from dataclasses import dataclass

import torch
import torch.nn as nn

from vembed_blocks.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from vembed_blocks.data.loader import task_loader
from vembed_blocks.demo.edit import prepare_edit_demo
from vembed_blocks.distributed import (
    average_gradients,
    get_rank,
    get_world_size,
    init_distributed,
    mean_over_ranks,
    shutdown_distributed,
)
from vembed_blocks.edit import flow_matching as fm
from vembed_blocks.edit.rows import PROMPT_SIDE, edit_sampler_options, load_edit_tasks, rank_share, row_latents
from vembed_blocks.grad_sync import clip_gradients, defer_gradient_sync
from vembed_blocks.gradcache import GradCache
from vembed_blocks.input_check import InputCheck
from vembed_blocks.model_folders import check_model_arg, hub_errors
from vembed_blocks.parallel import checkpoint_layers, compile_layers, shard_model
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

log = logging.getLogger("edit_sft")
DATA_HELP = "directory of task subdirectories, each an embedding store (seed's --train_data_meta_dir); default: demo"
EXTRACT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "extract_embeds.py")  # the demo's step 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = common_parser(__doc__, output="runs/edit_sft", lr=2e-5, batch_size=1, weight_decay=3e-2, data_help=DATA_HELP,
                      fsdp=True, require_data=False, records=False)  # fmt: skip
    # The seed's names for two shared flags: same dest, so either spelling works.
    p.add_argument("--adam-weight-decay", dest="weight_decay", type=float, default=SUPPRESS, help="= --weight-decay")
    p.add_argument("--checkpointing-steps", dest="save_every", type=int, default=SUPPRESS, help="= --save-every")
    p.add_argument("--model", help="a Qwen-Image(-Edit) diffusers folder (transformer/, vae/, ...); default: demo")
    p.add_argument("--train-data-weights", help='task weights, e.g. "dataset_a=0.5,dataset_b=1.2" (default: by size)')
    p.add_argument("--train-src-img-num-weights", help='weights per number of source images, e.g. "0=1,1=1,2=1,3=0"')
    p.add_argument("--image-sample-size", type=int, default=512, help="images resized (aspect kept) to ~N*N pixels")
    p.add_argument("--vae-mini-batch", type=int, default=1, help="images per VAE encode call")
    p.add_argument("--uniform-sampling", action="store_true", help="uniform timesteps, stratified over ranks")
    p.add_argument("--weighting-scheme", choices=fm.WEIGHTINGS, default="none", help="timestep density / loss weight")
    p.add_argument("--trainable-modules", nargs="+", default=["."], help="regexes over parameter names; rest frozen")
    p.add_argument("--prompt-side", default=PROMPT_SIDE, help="the stores' side holding the prompt embeddings")
    p.add_argument("--val-timesteps", default="250,500,750", help="evaluate: sigma-table indices of the noise levels")
    p.add_argument("--export-components", choices=["link", "none"], default="link", help="final/: link the rest")
    p.add_argument("--demo-quick", action="store_true", help="demo: fewer rows, smaller images, fewer steps (tests)")
    args, _ = p.parse_known_args(argv)
    if args.data is None:  # the demo: a random transformer trained from scratch on tiny images takes a larger step
        quick = args.demo_quick  # than a fine-tune; every parameter trains; explicit flags win
        p.set_defaults(lr=2e-3, max_steps=12 if quick else 300, batch_size=2, weight_decay=0.0, lr_schedule="constant")
        p.set_defaults(warmup_steps=2 if quick else 10, image_sample_size=32 if quick else 48, num_workers=0)
        p.set_defaults(log_every=4 if quick else 25, eval_every=0 if quick else 100)
        p.set_defaults(train_src_img_num_weights="0=1,1=1,2=1")  # the source counts drawn evenly
    elif args.model is None:
        p.error("--model is required with --data (a Qwen-Image(-Edit) diffusers folder)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- model, data, loss, evaluation


@dataclass
class Parts:
    model: nn.Module  # the FSDP2-sharded QwenImageTransformer2DModel: what the loop runs forward
    state: nn.ModuleDict  # everything a checkpoint restores (the transformer; the VAE is frozen)
    param_groups: list[dict]
    vae: nn.Module
    sigmas: torch.Tensor  # [T] training sigma table, descending
    collator: object = None  # none: rows are stored prompt embeddings + images decoded in the loop


def prepare_data(args: argparse.Namespace, rank: int, world: int) -> tuple[str, str | None]:
    """(task root, val task root), checked before any model is loaded."""
    if args.chunk_size or args.lora:
        raise SystemExit("edit_sft trains without --chunk-size (one forward per row) and without --lora")
    if args.data is None:  # the demo: a tiny folder, rendered rows, extract_embeds.py in-process (step 1)
        args.data, args.val_data = demo_stores(args, rank, world)
    return args.data, args.val_data


def demo_stores(args: argparse.Namespace, rank: int, world: int) -> tuple[str, str]:
    """(task root, val task root) of the demo under <output>/demo: rank 0 writes the tiny Qwen-Image-Edit folder
    (unless --model) and renders the rows; every rank then runs extract_embeds.py's main (it keeps this process
    group) into the stores, the val one unless --val-data. A fresh run first drops an earlier demo's stores."""
    if "OMP_NUM_THREADS" not in os.environ:
        # This model's ops are too small to split: on 2 cores shared with other jobs, 2 intra-op threads made
        # the whole demo 7x slower (93 s against 13 s). torchrun sets 1 already; an explicit setting wins.
        torch.set_num_threads(1)
    demo = os.path.join(args.output, "demo")
    made = prepare_edit_demo(demo, quick=args.demo_quick, seed=args.seed, rank=rank, world=world,
                             build_model=args.model is None, fresh=not args.resume)  # fmt: skip
    args.model = args.model or made["model"]
    extract = runpy.run_path(EXTRACT)["main"]
    for split in ("train", "val") if not args.val_data else ("train",):
        rows, store = made[f"{split}_rows"], made[f"{split}_store"]
        extract(["--data", rows, "--model", args.model, "--output", store, "--seed", str(args.seed)])
    return os.path.dirname(made["train_store"]), args.val_data or os.path.dirname(made["val_store"])


def build(args: argparse.Namespace, device: torch.device) -> Parts:
    """Transformer (frozen outside --trainable-modules) -> checkpointing -> compile -> FSDP2; frozen VAE; sigmas."""
    try:
        from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    except ImportError as e:
        raise ImportError('edit_sft needs diffusers: pip install "vembed-blocks[edit]"') from e
    check_model_arg("--model", args.model, "diffusers")  # a wrong folder: one line naming what it is
    with hub_errors("--model", args.model):
        model = QwenImageTransformer2DModel.from_pretrained(
            args.model, subfolder="transformer", torch_dtype=torch.float32
        )
    for name, p in model.named_parameters():
        p.requires_grad_(any(re.search(r, name) for r in args.trainable_modules))
    if not any(p.requires_grad for p in model.parameters()):
        raise SystemExit(f"--trainable-modules {args.trainable_modules} match no parameter of the transformer")
    model = model.to(device)
    if args.grad_checkpointing:
        checkpoint_layers(model)
    if args.compile:  # after checkpointing: compiles the checkpointed blocks
        compile_layers(model)
    model.train()
    # FSDP2 (a no-op without a process group): one unit per transformer block (its _no_split_modules), then the root
    model = shard_model(model, mixed_precision="bf16" if args.bf16 else None)
    vae = AutoencoderKLQwenImage.from_pretrained(args.model, subfolder="vae").to(device).eval().requires_grad_(False)
    sigmas = fm.scheduler_sigma_table(FlowMatchEulerDiscreteScheduler.load_config(args.model, subfolder="scheduler"))
    torch.manual_seed(args.seed * 1000 + get_rank())  # each rank its own noise; checkpoints keep every rank's RNG
    groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    return Parts(model, nn.ModuleDict({"model": model}), groups, vae, sigmas)


def load_data(args: argparse.Namespace, parts: Parts, path: str, rank: int, world: int):
    """(batches, rows per epoch): the weighted, source-count-grouped draw over the task stores."""
    tasks = load_edit_tasks(path, args.image_sample_size, args.prompt_side, parts.model.config.joint_attention_dim)
    options = edit_sampler_options(tasks, args.train_data_weights, args.train_src_img_num_weights)
    options.update(batch_size=args.batch_size, seed=args.seed, rank=rank, world_size=world)
    options.update(num_workers=args.num_workers, grad_accum_steps=args.grad_accum_steps, skip_bad=args.skip_bad)
    return task_loader(tasks, list, **options)


def row_loss(args, parts: Parts, row: dict, latents: list, index: torch.Tensor, device, rng=None) -> torch.Tensor:
    """Flow-matching loss of one row at sigma-table ``index`` ``[1]``: target latents ``latents[0]`` noised,
    source latents ``latents[1:]`` clean (each ``[C, 1, h, w]``), the prompt ``[L, D]`` as the text."""
    with autocast(args, device):
        return fm.edit_row_loss(parts.model, latents, row["prompt"], parts.sigmas[index], args.weighting_scheme, rng)


def step_loss(args: argparse.Namespace, parts: Parts, batch: list, gc: GradCache | None, device) -> torch.Tensor:
    """Mean flow-matching loss of this rank's rows, one forward each; a timestep per row (--uniform-sampling:
    stratified over ranks, else the --weighting-scheme density)."""
    latents = row_latents(parts.vae, batch, args.vae_mini_batch, autocast(args, device))
    n, uniform, density = len(batch), args.uniform_sampling, args.weighting_scheme
    index = fm.training_timestep_indices(n, len(parts.sigmas), uniform, density, get_rank(), get_world_size())
    rows = enumerate(zip(batch, latents))
    return sum(row_loss(args, parts, row, z, index[i : i + 1], device) for i, (row, z) in rows) / n


@torch.no_grad()
def evaluate(args: argparse.Namespace, parts: Parts, path: str, device) -> dict[str, float]:
    """Mean flow-matching loss over every record of ``path``'s tasks at each --val-timesteps index, noise seeded by
    the record's position: the same inputs for any model state. Every rank runs an equal number of forwards."""
    tasks = load_edit_tasks(path, args.image_sample_size, args.prompt_side, parts.model.config.joint_attention_dim)
    total, world = torch.zeros(2, dtype=torch.float64), get_world_size()
    parts.model.eval()
    for k, row, counted in rank_share(tasks, get_rank(), world):  # as many forwards on every rank (FSDP2)
        latents = row_latents(parts.vae, [row], args.vae_mini_batch, autocast(args, device))[0]
        for level in map(int, args.val_timesteps.split(",")):
            noise = torch.Generator().manual_seed(args.seed + 7919 * k + level)
            loss = row_loss(args, parts, row, latents, torch.tensor([level]), device, noise)
            total += torch.tensor([float(loss), 1.0]) * counted
    parts.model.train()
    if world > 1:
        torch.distributed.all_reduce(total)
    return {"flow_loss": float(total[0] / total[1])}


def export(args: argparse.Namespace, parts: Parts, final: str) -> None:
    """``final/transformer`` (diffusers format: ``from_pretrained`` loads it) and the base folder's other entries
    linked or copied (--export-components), so ``final`` is a pipeline folder. A collective."""
    from diffusers import QwenImageTransformer2DModel
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_model_state_dict(parts.model, options=options)  # a collective: rank 0 gets every tensor, others {}
    if get_rank() == 0:
        with torch.device("meta"):  # the gathered tensors are assigned, not copied
            fresh = QwenImageTransformer2DModel.from_config(parts.model.config)
        fresh.load_state_dict({k: v.to(torch.bfloat16) if args.bf16 else v for k, v in full.items()}, assign=True)
        fresh.save_pretrained(os.path.join(final, "transformer"), safe_serialization=True)
        for name in sorted(set(os.listdir(args.model)) - {"transformer"}) if args.export_components == "link" else []:
            if not os.path.lexists(dst := os.path.join(final, name)):
                os.symlink(os.path.abspath(os.path.join(args.model, name)), dst)
    if get_world_size() > 1:
        torch.distributed.barrier()


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
