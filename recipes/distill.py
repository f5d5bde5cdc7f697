r"""Distil a teacher's query-document similarity structure into a text student (Distill: KL or MSE).

Demo (no --data): text pairs, a tiny random BERT student, an ideal teacher (--teacher-embeddings); retrieval:

    python recipes/distill.py
    torchrun --nproc_per_node=2 recipes/distill.py

Your data and models, one GPU, eight, two nodes:
    python recipes/distill.py --model BAAI/bge-small-en-v1.5 --teacher BAAI/bge-large-en-v1.5 --data train.jsonl
    python recipes/evaluate.py --model BAAI/bge-large-en-v1.5 --data train.jsonl --top-k 0 --output runs/teacher
    torchrun --nproc_per_node=8 recipes/distill.py --model small-model --teacher-embeddings runs/teacher \
        --data train.jsonl --batch-size 128 --chunk-size 32 --bf16
    torchrun --nnodes 2 --node_rank $NODE_RANK --nproc_per_node=8 --master_addr $HEAD_NODE_IP --master_port 29500 \
        recipes/distill.py --model small-model --teacher-embeddings runs/teacher --data train.jsonl --bf16

Queries are scored against every rank's positives (and negatives) by student and teacher: live (--teacher, frozen)
or precomputed (--teacher-embeddings DIR: teacher.safetensors "query", "doc" [R, Dt], row i = record i of --data,
or evaluate.py's files, by text). Writes args.json, logs, metrics.json, report.md, checkpoints/, final/.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
from dataclasses import dataclass

import torch
import torch.nn as nn

from vembed_blocks import text_encoder
from vembed_blocks.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from vembed_blocks.data.collate import TextCollator
from vembed_blocks.data.loader import TaskLoader, file_fingerprint, task_loader
from vembed_blocks.data.records import load_records
from vembed_blocks.demo.text import prepare_text_demo
from vembed_blocks.distributed import (
    average_gradients,
    gather_with_grad,
    init_distributed,
    mean_over_ranks,
    shutdown_distributed,
)
from vembed_blocks.embed import evaluate_retrieval_by
from vembed_blocks.grad_sync import clip_gradients, defer_gradient_sync
from vembed_blocks.gradcache import GradCache
from vembed_blocks.input_check import InputCheck
from vembed_blocks.losses import Distill, Matryoshka
from vembed_blocks.parallel import apply_lora, checkpoint_layers, compile_layers
from vembed_blocks.pooling import POOL_METHODS
from vembed_blocks.recipe_flags import common_parser, masked_counts, mrl_dims
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
from vembed_blocks.teacher_store import NumberedRecords, TeacherStore
from vembed_blocks.text_encoder import export_text_encoder, load_text_encoder, text_features, unit_text_encoder
from vembed_blocks.user_errors import report_user_errors

log = logging.getLogger("distill")
DATA_HELP = "training file (JSONL/CSV/Parquet); default: the demo text pairs (a tiny BERT, an ideal teacher)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = common_parser(__doc__, output="runs/distill", lr=2e-5, batch_size=64, data_help=DATA_HELP, require_data=False)
    p.add_argument("--model", help="the student: HF id or local folder (HF or sentence-transformers); default: demo")
    p.add_argument("--teacher", help="live teacher: HF id or local folder (its own tokenizer and pooling)")
    p.add_argument("--teacher-embeddings", help="precomputed teacher embeddings folder (see above)")
    p.add_argument("--kind", choices=["kl", "mse"], default="kl")
    p.add_argument("--temperature", type=float, default=0.05, help="KL temperature on cosine scores (in [-1, 1])")
    p.add_argument("--pooling", choices=POOL_METHODS, help="student pooling; default: the folder's, else mean")
    p.add_argument("--max-length", type=int, help="student token cap; default: the folder's max_seq_length, else 512")
    p.add_argument("--query-prefix", help="student query prefix; default: the folder's 'query' prompt")
    p.add_argument("--doc-prefix", help="student document prefix; default: the folder's 'document' prompt")
    p.add_argument("--demo-quick", action="store_true", help="demo: a smaller set and model (tests)")
    args, _ = p.parse_known_args(argv)
    if args.data is None:  # the demo trains a random student from scratch: a larger step than a fine-tune
        p.set_defaults(lr=1e-3, max_steps=20 if args.demo_quick else 60, batch_size=32)
    elif args.model is None:
        p.error("--model is required with --data (an HF id or a local folder)")
    args = p.parse_args(argv)
    if (args.teacher and args.teacher_embeddings) or (args.data and not (args.teacher or args.teacher_embeddings)):
        p.error("give exactly one of --teacher and --teacher-embeddings (the demo's default: its ideal teacher)")
    return args


# ----------------------------------------------------------------------------- model, data, loss, evaluation


@dataclass
class Parts:
    model: nn.Module  # the student: what the loop trains
    state: nn.ModuleDict  # everything a checkpoint restores
    param_groups: list[dict]
    criterion: nn.Module  # Distill, or Matryoshka over the student's widths (the teacher is never cut)
    collator: TextCollator
    cfg: text_encoder.TextEncoderConfig
    teacher: tuple[nn.Module, text_encoder.TextEncoderConfig] | None  # live teacher; None: precomputed embeddings
    teacher_input: object  # the teacher's collator, or a TeacherStore
    splitter: object = None  # how GradCache cuts the inputs into chunks (None: every tensor on dim 0)


def collate(student: TextCollator, teacher: TextCollator | TeacherStore, records: list) -> dict:
    """Student inputs, plus the teacher's inputs (live) or its embeddings (precomputed)."""
    if isinstance(teacher, TeacherStore) and teacher.aligned:  # no teacher embedding for the hard negatives
        records = [dataclasses.replace(r, negatives=[]) for r in records]
    batch = {"student": student(records)}
    batch["teacher"] = teacher(records) if isinstance(teacher, TextCollator) else None
    batch["teacher_emb"] = teacher(records) if isinstance(teacher, TeacherStore) else None
    return batch


def prepare_data(args: argparse.Namespace, rank: int, world: int) -> tuple[str, str | None]:
    """(train file, val file) as given, else the demo's (rank 0 writes them) as --data/--val-data: text pairs, a tiny
    random BERT student without --model, the ideal teacher's embeddings without --teacher(-embeddings)."""
    if not args.data:  # so load_data tells the training file from the validation one
        wants_teacher = not (args.teacher or args.teacher_embeddings)
        made = prepare_text_demo(
            os.path.join(args.output, "demo"),
            quick=args.demo_quick,
            seed=args.seed,
            rank=rank,
            world=world,
            build_model=args.model is None,
            teacher=wants_teacher,
        )
        args.model = args.model or made["model"]
        if wants_teacher:
            args.teacher_embeddings = made["teacher"]
        args.data, args.val_data = made["train"], args.val_data or made["val"]
    return args.data, args.val_data


def build(args: argparse.Namespace, device: torch.device) -> Parts:
    """The student (its folder's pooling / length / prompts, flags override), the teacher, and the loss."""
    overrides = {k: getattr(args, k) for k in ("pooling", "max_length", "query_prefix", "doc_prefix")}
    student, collator, cfg = load_text_encoder(args.model, **overrides)
    student.to(device)
    for p in getattr(student, "pooler", nn.Identity()).parameters():  # BERT's pooler head: pooling never uses it
        p.requires_grad_(False)
    teacher, teacher_input = None, None
    if args.teacher_embeddings:
        teacher_input = TeacherStore(args.teacher_embeddings)
    else:
        t_model, teacher_input, t_cfg = load_text_encoder(args.teacher, flag="--teacher")
        t_model.to(device).eval().requires_grad_(False)  # frozen: no dropout, no gradient, never in the optimizer
        teacher = (t_model, t_cfg)
    if args.grad_checkpointing:
        checkpoint_layers(student)
    if args.lora:  # after checkpointing: LoRA wraps the layers checkpointing must still see as blocks
        student = apply_lora(student, r=args.lora, alpha=args.lora_alpha)
    if args.compile:  # last: compiles the checkpointed, LoRA-wrapped blocks
        compile_layers(student)
    student.train()
    criterion = Distill(temperature=args.temperature, kind=args.kind)
    if args.mrl_dims:  # the loss over nested prefixes of the student's embedding (the teacher's stays whole)
        criterion = Matryoshka(criterion, mrl_dims(args.mrl_dims))
    groups = [{"params": [p for p in student.parameters() if p.requires_grad]}]
    state = nn.ModuleDict({"model": student})
    return Parts(student, state, groups, criterion, collator, cfg, teacher, teacher_input)


def load_data(args: argparse.Namespace, parts: Parts, path: str, rank: int, world: int) -> tuple[TaskLoader, int]:
    """(batches, rows per epoch): numbered records (row-aligned teacher embeddings are found by number)."""
    if path != args.data and parts.teacher is None:  # precomputed teacher embeddings cover --data only
        return None
    tasks = {
        "train": NumberedRecords(load_records(path, format="t2t", columns=args.columns, delimiter=args.csv_delimiter))
    }
    options = dict(batch_size=args.batch_size, seed=args.seed, rank=rank, world_size=world, skip_bad=args.skip_bad)
    options.update(num_workers=args.num_workers, grad_accum_steps=args.grad_accum_steps)
    options["identity"] = {"train": {**file_fingerprint(path), "rows": len(tasks["train"])}}  # a resume: the same file
    return task_loader(tasks, functools.partial(collate, parts.collator, parts.teacher_input), **options)


def step_loss(args: argparse.Namespace, parts: Parts, batch: dict, gc: GradCache | None, device) -> torch.Tensor:
    """Student (GradCache if --chunk-size) and teacher embed queries and docs; Distill over every rank's docs."""

    fn = lambda **x: text_features(parts.model, x, parts.cfg.pooling, normalize=False)  # Distill normalises

    def encode(inputs: dict) -> torch.Tensor:  # GradCache: chunks without graphs now, replayed by loss.backward()
        inputs = {k: v.to(device) for k, v in inputs.items()}
        with autocast(args, device):
            return (fn(**inputs) if gc is None else gc.encode(fn, **inputs)).float()

    @torch.no_grad()
    def encode_teacher(inputs: dict) -> torch.Tensor:  # frozen: one plain forward
        t_model, t_cfg = parts.teacher
        inputs = {k: v.to(device) for k, v in inputs.items()}
        with autocast(args, device):
            return text_features(t_model, inputs, t_cfg.pooling, t_cfg.normalize).float()

    def docs(side: dict, enc) -> torch.Tensor:  # positives, then the flat hard negatives (the store's order too)
        return torch.cat([enc(side["positive"])] + ([enc(side["negatives"])] if "negatives" in side else []))

    sq, sd = encode(batch["student"]["query"]), docs(batch["student"], encode)
    if parts.teacher is not None:
        tq, td = encode_teacher(batch["teacher"]["query"]), docs(batch["teacher"], encode_teacher)
    else:
        tq, td = (t.to(device) for t in batch["teacher_emb"])
    # Candidates: every rank's docs (ragged counts are fine); rows: this rank's queries.
    return parts.criterion(sq, gather_with_grad(sd), tq, gather_with_grad(td))


@torch.no_grad()
def evaluate(args: argparse.Namespace, parts: Parts, path: str, device) -> dict[str, float]:
    """Cosine retrieval of ``path``'s unique positives (+ negatives) for its unique queries, by the student."""
    parts.model.eval()
    encode = unit_text_encoder(parts.model, parts.collator, parts.cfg, args.bf16)
    records = load_records(path, format="t2t", columns=args.columns, delimiter=args.csv_delimiter)
    widths = mrl_dims(args.mrl_dims)  # also the metrics at each Matryoshka width ("dim<w>/<metric>")
    metrics = evaluate_retrieval_by(records, encode, args.relevance, args.eval_batch_size, curve_k=100, widths=widths)
    parts.model.train()
    return metrics


def export(args: argparse.Namespace, parts: Parts, final: str) -> None:
    """The student as an HF folder that is also a sentence-transformers folder."""
    export_text_encoder(parts.model, final, parts.collator, parts.cfg)


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
