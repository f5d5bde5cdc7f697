r"""Train a Qwen3-VL-Embedding style model: Qwen3-VL backbone, last-token pooling, FSDP2, GradCache.

Each item becomes a chat ([system: instruction] [user: images + text] + assistant prefix) via the processor's
chat template; its embedding is the hidden state of the last token. Queries are scored against every positive and
hard negative of all ranks (gathered InfoNCE), optionally at Matryoshka widths. Data: T2I/I2T/M2I/T2T/I2I.

Demo (no --data): renders a toy image-caption set, saves a tiny random Qwen3-VL to <output>/demo/model
(loaded with from_pretrained), trains 300 steps (about 20 s on 2 CPU cores), prints retrieval before/after:

    python recipes/qwen3_fsdp.py
    torchrun --nproc_per_node=2 recipes/qwen3_fsdp.py

Your data and weights: one GPU, eight GPUs, and two nodes of eight (run the third command on each node):

    python recipes/qwen3_fsdp.py --model Qwen/Qwen3-VL-2B-Instruct --data train.jsonl --val-data val.jsonl \
        --batch-size 64 --chunk-size 8 --bf16 --grad-checkpointing --lora 32 --output runs/qwen3
    torchrun --nproc_per_node=8 recipes/qwen3_fsdp.py --model Qwen/Qwen3-VL-2B-Instruct --data train.jsonl \
        --val-data val.jsonl --batch-size 64 --chunk-size 8 --bf16 --grad-checkpointing --mrl-dims 2048,1024,512,256 \
        --num-negatives 1 --output runs/qwen3
    torchrun --nnodes 2 --node_rank $NODE_RANK --nproc_per_node=8 --master_addr $HEAD_NODE_IP --master_port 29500 \
        recipes/qwen3_fsdp.py --model Qwen/Qwen3-VL-8B-Instruct --data train.jsonl --val-data val.jsonl \
        --batch-size 32 --chunk-size 4 --bf16 --grad-checkpointing --output /shared/runs/qwen3

Several tasks, one policy each (--tasks: a JSONL/CSV table, a row per task: data, val_data, weight,
batch_size, in_batch_negatives, temperature, query/doc instruction, num_negatives, mrl_dims; see
vembed_blocks/task_table.py): every global batch is one task's; metrics are per task ("<task>/recall@1"). The
demo's two tasks, caption retrieval and colour classification with in-batch negatives off:

    python recipes/qwen3_fsdp.py --demo-tasks

A Qwen3-VL-Embedding --model gets its published set-up as defaults (vembed_blocks/published.py: LoRA r32/alpha32
on q/k/v/o/gate/up/down, bf16, its Matryoshka widths); flags you give win.

--batch-size is per rank. FSDP2 runs a collective in every sharded forward, so every rank
must run the same forwards: each rank encodes exactly batch-size x --num-negatives hard
negatives (short rows padded with masked copies of their positive) and evaluation is split
over all ranks. Writes <output>/args.json, train_log.jsonl, metrics.json ({"before", "after"}),
checkpoints under <output>/checkpoints (--resume; shared storage across nodes) and <output>/final.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from vembed_blocks.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from vembed_blocks.data.collate import FixedNegatives, VLMCollator, scatter_negative_ids
from vembed_blocks.data.guide_inputs import WithGuideInputs
from vembed_blocks.data.loader import training_batches
from vembed_blocks.data.records import load_records
from vembed_blocks.demo import render_demo, render_two_task_demo
from vembed_blocks.demo.vlm import build_demo_qwen3vl
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
from vembed_blocks.input_check import InputCheck
from vembed_blocks.losses import InfoNCE, Matryoshka
from vembed_blocks.model_folders import hub_errors
from vembed_blocks.parallel import apply_lora, checkpoint_layers, compile_layers, shard_model
from vembed_blocks.published import published_defaults
from vembed_blocks.recipe_flags import (
    add_false_negative_args,
    add_masked,
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
from vembed_blocks.task_table import TaskPolicy, read_task_table, task_table_batches
from vembed_blocks.user_errors import report_user_errors
from vembed_blocks.vlm import VLMSplit, ignore_fsdp_view_warning, load_vlm_processor, vlm_embed, vlm_text_blocks

log = logging.getLogger("qwen3_fsdp")
DATA_HELP = "training file (JSONL/CSV/Parquet); default: the rendered demo set (and a tiny Qwen3-VL)"
VAL_PER_TASK = "<each --tasks row's val_data>"  # the run's validation set with --tasks


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = dict(output="runs/qwen3_fsdp", lr=1e-5, batch_size=32, eval_batch_size=32, lora_alpha=32.0)
    p = common_parser(__doc__, **defaults, fsdp=True, data_help=DATA_HELP, require_data=False)
    p.add_argument("--model", help="HF id or folder of a Qwen3-VL (or Qwen2-VL); default: a tiny random one (demo)")
    p.add_argument("--format", choices=["t2i", "i2t", "i2i", "m2i", "t2t", "swift"], help="declare the data format")
    p.add_argument("--query-instruction", default="Represent the user's input.", help="system prompt of queries")
    p.add_argument("--doc-instruction", help="system prompt of documents (default: the query one)")
    p.add_argument("--max-image-side", type=int, default=1024, help="downscale larger images before the processor")
    p.add_argument("--num-negatives", type=int, default=0, help="hard negatives per row (fixed, see above; 0 = none)")
    p.add_argument("--temperature", type=float, default=0.05, help="InfoNCE: logits = cos / T")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager: tracing only)")
    p.add_argument("--tasks", help="a task table (JSONL/CSV, a row per task; see above), instead of --data")
    p.add_argument("--lora-targets", help="LoRA module-name suffixes, comma-separated (default: attention projections)")
    p.add_argument("--demo-quick", action="store_true", help="demo: a smaller set and model (tests)")
    p.add_argument("--demo-tasks", action="store_true", help="demo: two tasks, retrieval and colour classification")
    add_false_negative_args(p, "a Qwen-VL folder or HF id, loaded like --model (unsharded)")
    args, _ = p.parse_known_args(argv)
    p.set_defaults(**published_defaults(args.model))  # a Qwen3-VL-Embedding's published set-up; flags win
    if args.data is None and args.tasks is None:  # the demo trains a random model: its own defaults, flags win
        p.set_defaults(lr=2e-3, max_steps=30 if args.demo_quick else 300)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- model, data, loss, evaluation


@dataclass
class Parts:
    model: nn.Module  # the FSDP2-sharded Qwen-VL: what the loop runs forward
    state: nn.ModuleDict  # everything a checkpoint restores
    param_groups: list[dict]
    criterion: nn.Module
    collator: VLMCollator
    processor: object
    splitter: object = None  # how GradCache cuts the inputs into chunks (None: every tensor on dim 0)
    guide: object = None  # --fn-guide: the frozen guide's embedding function (inputs -> [b, G])
    guide_collator: object = None  # its own processor's inputs of the same rows
    masked: dict = field(default_factory=dict)  # false negatives each rule masked this step (step_loss adds)
    tasks: dict[str, TaskPolicy] = field(default_factory=dict)  # --tasks: each task's policy (criterion: by task)


def prepare_data(args: argparse.Namespace, rank: int, world: int) -> tuple[str, str | None]:
    """(train file, val file), checked before any model is loaded; without --data render the demo set and
    a tiny Qwen3-VL (rank 0)."""
    if args.num_negatives < 0:
        raise SystemExit("--num-negatives must be >= 0")
    if args.data is not None and args.tasks is not None:
        raise SystemExit("give --data (one task) or --tasks (a table of tasks), not both")
    if args.tasks is not None and args.val_data is not None:
        raise SystemExit("--tasks: each task's validation file is the table's val_data column, not --val-data")
    if args.data is not None or args.tasks is not None:
        if args.model is None:
            raise SystemExit(f"--model is required with {'--data' if args.tasks is None else '--tasks'}")
        if args.tasks is None:
            return args.data, args.val_data
        return args.tasks, VAL_PER_TASK if any(t.val_data for t in task_table(args).values()) else None
    demo = os.path.join(args.output, "demo")
    if rank == 0:
        render_demo(demo, per_combo=1 if args.demo_quick else 8, seed=args.seed)
        if args.model is None:
            build_demo_qwen3vl(os.path.join(demo, "model"), args.demo_quick)
        if args.demo_tasks:  # + colour classification (in-batch negatives off) and a table of the two tasks
            widths = () if args.model else (32, 16) if args.demo_quick else (64, 32)  # the demo model's (or none)
            render_two_task_demo(demo, per_combo=1 if args.demo_quick else 8, seed=args.seed, widths=widths)
    if world > 1:
        torch.distributed.barrier()
    args.model = args.model or os.path.join(demo, "model")
    if args.demo_tasks:
        args.tasks = os.path.join(demo, "tasks.jsonl")
        return args.tasks, VAL_PER_TASK
    return os.path.join(demo, "train.jsonl"), args.val_data or os.path.join(demo, "val.jsonl")


def task_table(args: argparse.Namespace) -> dict[str, TaskPolicy]:
    """--tasks read, each column a row leaves out taken from the flags (--batch-size, --temperature, ...)."""
    flags = dict(batch_size=args.batch_size, temperature=args.temperature, num_negatives=args.num_negatives)
    flags.update(query_instruction=args.query_instruction, format=args.format, mrl_dims=tuple(mrl_dims(args.mrl_dims)))
    flags["doc_instruction"] = args.doc_instruction or args.query_instruction  # not the row's query instruction
    return read_task_table(args.tasks, flags)


def build(args: argparse.Namespace, device: torch.device) -> Parts:
    """Load, then checkpointing -> LoRA -> compile -> FSDP2 (the order each wrapper expects); the loss."""
    from transformers import AutoModel

    processor = load_vlm_processor(args.model)  # checks the folder's kind first (--model: a Qwen-VL)
    with hub_errors("--model", args.model):
        model = AutoModel.from_pretrained(args.model, dtype=torch.float32).to(device)
    if args.grad_checkpointing:
        checkpoint_layers(model)
    if args.lora:  # after checkpointing: LoRA wraps the layers checkpointing must still see as blocks
        targets = args.lora_targets.split(",") if args.lora_targets else None  # None: the attention projections
        model = apply_lora(model, r=args.lora, alpha=args.lora_alpha, targets=targets)
    if args.compile:  # last: compiles the checkpointed, LoRA-wrapped blocks (failing blocks run eagerly)
        compile_layers(model, backend=args.compile_backend, fallback_to_eager=True)
    model.train()
    # FSDP2 (a no-op without a process group): a unit per text decoder layer, the vision tower in the root unit. A
    # rank whose chunk has no image skips the tower; as separate units its blocks would wait for an all-gather the
    # ranks with images never join. No extra entry points (forward_methods=()): forward calls get_image_features.
    mixed = "bf16" if args.bf16 else None
    model = shard_model(model, layer_classes=vlm_text_blocks(model), mixed_precision=mixed, forward_methods=())
    if hasattr(model, "set_reduce_scatter_unused_params"):
        model.set_reduce_scatter_unused_params(True)  # a chunk without images: its tower grads are zeros, not missing
    ignore_fsdp_view_warning()  # FSDP2's "returned a view tensor" at every forward: vlm_embed only reads the view
    a = args  # the false-negative rules (--fn-*): checked at parse time
    rules = false_negative_rules(a.fn_margin, a.fn_ratio, a.fn_weight, a.fn_guide, a.fn_guide_margin, a.fn_guide_ratio)
    criterion = contrastive_loss(args.temperature, True, mrl_dims(args.mrl_dims), rules)
    tasks = task_table(args) if args.tasks else {}
    if tasks:  # --tasks: a loss per task (its temperature, in-batch negatives, Matryoshka widths); step_loss picks
        criterion = nn.ModuleDict(
            {n: contrastive_loss(t.temperature, t.in_batch_negatives, t.mrl_dims, rules) for n, t in tasks.items()}
        )
    collator = collator_for(args, processor)
    groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    state = nn.ModuleDict({"model": model, "loss": criterion})
    parts = Parts(model, state, groups, criterion, collator, processor, splitter=VLMSplit)  # flat pixels by image
    parts.masked, parts.tasks = false_negative_counts(args.fn_duplicates, rules), tasks
    if args.fn_guide:  # frozen, unsharded, eval mode: its scores only choose which candidates to drop
        guide_processor = load_vlm_processor(args.fn_guide, flag="--fn-guide")
        with hub_errors("--fn-guide", args.fn_guide):
            guide = AutoModel.from_pretrained(args.fn_guide, dtype=torch.bfloat16 if args.bf16 else torch.float32)
        guide = guide.to(device).eval().requires_grad_(False)
        parts.guide = lambda **x: vlm_embed(guide, x)
        parts.guide_collator = collator_for(args, guide_processor)
    return parts


def contrastive_loss(temperature: float, in_batch_negatives: bool, dims, rules) -> nn.Module:
    """InfoNCE over all ranks' candidates (``in_batch_negatives=False``: a row's own positive and negatives only),
    at nested Matryoshka prefixes when ``dims`` are given."""
    loss = InfoNCE(temperature=temperature, in_batch_negatives=in_batch_negatives, false_negatives=rules)
    return Matryoshka(loss, list(dims)) if dims else loss


def collator_for(args: argparse.Namespace, processor, task: TaskPolicy | None = None) -> VLMCollator:
    """Chats by the task's instructions (without one: the flags')."""
    source = args if task is None else task
    return VLMCollator(processor, source.query_instruction, source.doc_instruction, args.max_image_side)


def collate_for(args: argparse.Namespace, parts: Parts, task: TaskPolicy | None = None):
    """Rows -> inputs with exactly the task's (or --num-negatives) negatives a row, by its instructions."""
    k = args.num_negatives if task is None else task.num_negatives
    collate = FixedNegatives(collator_for(args, parts.processor, task), k)
    if args.fn_guide:  # the guide's own inputs of the same rows, negatives laid out alike
        collate = WithGuideInputs(collate, FixedNegatives(collator_for(args, parts.guide_collator.processor, task), k))
    return collate


def load_data(args: argparse.Namespace, parts: Parts, path: str, rank: int, world: int):
    """(batches, rows per epoch): exactly --num-negatives negatives a row (FSDP2: same forwards). --tasks: each
    task's policy; rows per epoch in --batch-size rows (each task's rows once); no validation loss (None)."""
    if parts.tasks:
        if path != args.tasks:
            return None
        options = dict(seed=args.seed, rank=rank, world_size=world, num_workers=args.num_workers)
        options.update(grad_accum_steps=args.grad_accum_steps, skip_bad=args.skip_bad, columns=args.columns)
        options.update(max_bad_fraction=args.max_bad_fraction, delimiter=args.csv_delimiter)
        loader, rows = task_table_batches(parts.tasks, lambda t: collate_for(args, parts, t), **options)
        per_batch = sum(rows[n] / t.batch_size for n, t in parts.tasks.items() if t.weight > 0)
        return loader, round(per_batch * args.batch_size)
    collate = collate_for(args, parts)
    options = dict(batch_size=args.batch_size, seed=args.seed, rank=rank, world_size=world, format=args.format)
    options.update(num_workers=args.num_workers, grad_accum_steps=args.grad_accum_steps, max_steps=args.max_steps)
    options.update(skip_bad=args.skip_bad, max_bad_fraction=args.max_bad_fraction, skip_bad_shards=args.skip_bad_shards)
    options.update(columns=args.columns, delimiter=args.csv_delimiter, allow_mixed=args.allow_mixed_data)
    return training_batches(path, collate, **options)


def step_loss(args: argparse.Namespace, parts: Parts, batch: dict, gc: GradCache | None, device) -> torch.Tensor:
    """Last-token embeddings of queries, positives and the fixed-count negatives; InfoNCE over all ranks (--tasks:
    the loss of the batch's task)."""

    fn = lambda **x: vlm_embed(parts.model, x)

    def encode(inputs: dict) -> torch.Tensor:  # GradCache: chunks without graphs now, replayed by loss.backward()
        inputs = {k: v.to(device) for k, v in inputs.items()}
        with autocast(args, device):
            return (fn(**inputs) if gc is None else gc.encode(fn, **inputs)).float()

    q, p = encode(batch["query"]), encode(batch["positive"])
    extra = {"labels": batch["labels"].to(device)} if "labels" in batch else {}
    k = batch["negatives_mask"].shape[1] if "negatives" in batch else 0  # the task's (--num-negatives) count
    if k:  # [B*K] rows in row order -> [B, K, D]; padded slots masked out
        n = encode(batch["negatives"]).view(q.shape[0], k, -1)
        extra.update(negatives=n, negatives_mask=batch["negatives_mask"].to(device))
    if args.fn_duplicates:  # content ids (negatives [B, K], -1 on padded slots): candidates equal to the positive
        ids = {k: v.to(device) for k, v in batch["content_ids"].items()}
        if k:
            ids["negatives"] = scatter_negative_ids(ids["negatives"], extra["negatives_mask"])
        extra["content_ids"] = ids
    if parts.guide is not None:  # --fn-guide: the frozen guide's embeddings of the same rows, without gradient
        sides = [k for k in ("query", "positive", "negatives") if k in batch["guide"]]
        extra["guide"] = guide = {k: guide_embed(args, parts, batch["guide"][k], device) for k in sides}
        if "negatives" in guide:  # [B*K, G] in row order -> [B, K, G]
            guide["negatives"] = guide["negatives"].view(q.shape[0], k, -1)
    criterion = parts.criterion[batch["task"]] if "task" in batch else parts.criterion
    loss = criterion(q, p, **extra)
    if parts.model.training:  # a training micro-batch (validation_loss runs in eval mode): this step's counts
        add_masked(parts.masked, criterion, device)  # Matryoshka: its inner loss's
    return loss


@torch.no_grad()
def guide_embed(args: argparse.Namespace, parts: Parts, inputs: dict, device) -> torch.Tensor:
    """The frozen guide's ``[b, G]`` embeddings of one side, --chunk-size rows at a time (bounded memory)."""
    split = VLMSplit(((), {k: v.to(device) for k, v in inputs.items()}))
    rows = args.chunk_size or len(split)
    with autocast(args, device):
        return torch.cat([parts.guide(**split[s : s + rows][1]) for s in range(0, len(split), rows)]).float()


@torch.no_grad()
def evaluate(args: argparse.Namespace, parts: Parts, path: str, device) -> dict[str, float]:
    """Retrieval metrics of ``path`` (and at each --mrl-dims width, "dim<w>/<metric>"); every rank embeds an equal
    share (FSDP2 forwards are collectives). --tasks: each task's val_data, "<task>/<metric>", its instructions."""
    if not parts.tasks:
        return evaluate_file(args, parts, path, parts.collator, args.format, mrl_dims(args.mrl_dims), device)
    out = {}
    for name, t in parts.tasks.items():
        if t.val_data:
            metrics = evaluate_file(
                args, parts, t.val_data, collator_for(args, parts.processor, t), t.format, t.mrl_dims, device
            )
            out.update({f"{name}/{k}": v for k, v in metrics.items() if k != "recall_curve"})
    return out


def evaluate_file(args: argparse.Namespace, parts: Parts, path: str, collator, fmt, widths, device) -> dict:
    """Retrieval metrics of one file's queries against its documents, embedded through ``collator``."""

    fn = lambda **x: vlm_embed(parts.model, x)

    def encode(items: list, is_query: bool) -> torch.Tensor:
        inputs = {k: v.to(device) for k, v in collator.encode(items, is_query).items()}
        with autocast(args, device):
            return F.normalize(fn(**inputs).float(), dim=-1)

    parts.model.eval()
    records = load_records(path, format=fmt, columns=args.columns, delimiter=args.csv_delimiter)
    metrics = evaluate_retrieval_by(records, encode, args.relevance, args.eval_batch_size, curve_k=100, widths=widths)
    parts.model.train()
    return metrics


def export(args: argparse.Namespace, parts: Parts, final: str) -> None:
    """A plain Qwen-VL folder (LoRA merged) + processor + vlm_embedding.json (how it embeds); every rank calls it."""
    export_pretrained(parts.model, final, processor=parts.processor)
    if get_rank() == 0:  # what the folder alone does not say: the encoder block (load_encoder) reads it
        spec = dict(pooling="last", query_instruction=args.query_instruction, doc_instruction=args.doc_instruction)
        if parts.tasks:  # what each task's inputs were told: serve a task's queries with its own instruction
            keys = ("query_instruction", "doc_instruction", "mrl_dims")
            spec["tasks"] = {n: {k: getattr(t, k) for k in keys} for n, t in parts.tasks.items()}
        with open(os.path.join(final, "vlm_embedding.json"), "w") as f:
            json.dump({**spec, "max_image_side": args.max_image_side}, f, indent=1)


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
