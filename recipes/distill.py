"""Distil a teacher's query-document similarity structure into a text student (Distill: KL or MSE).

    python recipes/distill.py --model sentence-transformers/all-MiniLM-L6-v2 --teacher BAAI/bge-large-en-v1.5 \
        --data train.jsonl --val-data val.jsonl --output runs/distill
    torchrun --nproc_per_node=8 recipes/distill.py --model small-model --teacher-embeddings runs/teacher \
        --data train.jsonl --batch-size 128 --chunk-size 32 --bf16

Each query of a rank is scored against the positives (and hard negatives) of every rank by student
and teacher (widths, tokenizers, pooling may differ). Teacher: live (--teacher MODEL: frozen, eval
mode, no gradient, same batch) or precomputed (--teacher-embeddings DIR): DIR/teacher.safetensors
with "query" and "doc" [R, Dt], row i = record i of --data (hard negatives then unused), or the
files recipes/evaluate.py writes (looked up by text). Writes train_log.jsonl, metrics.json, checkpoints
(--resume) and final/ (HF + sentence-transformers folder). Details: docs/recipes/distill.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from vembed_blocks import Distill, get_rank, get_world_size, init_distributed, retrieval_metrics
from vembed_blocks.checkpoint import export_pretrained, latest_checkpoint, load_checkpoint, save_checkpoint
from vembed_blocks.data import TaskBatches, TextCollator, WeightedTaskSampler, load_records
from vembed_blocks.distributed import gather_with_grad, mean_over_ranks, shutdown_distributed
from vembed_blocks.embed import retrieval_set
from vembed_blocks.gradcache import GradCache
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

log = logging.getLogger("distill")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", required=True, help="the student: HF id or local folder (plain HF or sentence-transformers)"
    )
    p.add_argument("--teacher", help="live teacher: HF id or local folder (its own tokenizer and pooling)")
    p.add_argument("--teacher-embeddings", help="precomputed teacher embeddings folder (see above)")
    p.add_argument("--data", required=True, help="training file (JSONL/CSV/Parquet), T2T rows")
    p.add_argument("--val-data", help="validation file for before/after retrieval metrics of the student")
    p.add_argument("--kind", choices=["kl", "mse"], default="kl")
    p.add_argument("--temperature", type=float, default=0.05, help="KL temperature on cosine scores (in [-1, 1])")
    p.add_argument("--pooling", choices=POOL_METHODS, help="student pooling; default: the folder's, else mean")
    p.add_argument("--max-length", type=int, help="student token cap; default: the folder's max_seq_length, else 512")
    p.add_argument("--query-prefix", help="student query prefix; default: the folder's 'query' prompt")
    p.add_argument("--doc-prefix", help="student document prefix; default: the folder's 'document' prompt")
    p.add_argument("--batch-size", type=int, default=64, help="rows per rank per step")
    p.add_argument("--chunk-size", type=int, default=0, help="GradCache rows per chunk for the student (0 = off)")
    p.add_argument("--lora", type=int, default=0, help="LoRA rank (0 = full fine-tuning)")
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--mrl-dims", help="Matryoshka dims of the student, e.g. '384,256,128' (the teacher is never cut)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, help="overrides --epochs")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm (0 = off)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for student and teacher")
    p.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing of every student block")
    p.add_argument("--compile", action="store_true", help="torch.compile every student block in place")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers (tokenisation)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=0, help="retrieval metrics on --val-data every N steps (0 = off)")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0 = at the end only)")
    p.add_argument("--resume", action="store_true", help="continue from <output>/checkpoints")
    p.add_argument("--stop-at", type=int, help="save and exit at this step (split a run across jobs; then --resume)")
    p.add_argument("--eval-batch-size", type=int, default=128)
    p.add_argument("--output", default="runs/distill")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if (args.teacher is None) == (args.teacher_embeddings is None):
        p.error("give exactly one of --teacher and --teacher-embeddings")
    return args


# ----------------------------------------------------------------------------- pieces of the loop


class Numbered:
    """``records[i]`` with ``extra["row"] = i``: row-aligned teacher embeddings are found by it."""

    def __init__(self, records) -> None:
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        rec = self.records[i]
        return dataclasses.replace(rec, extra={**rec.extra, "row": int(i)})


class TeacherStore:
    """Precomputed teacher embeddings: ``store(records) -> (query[B, Dt], doc[B + M, Dt])``.

    Docs are the B positives, then the M hard negatives in the collator's (row-major) order.
    """

    def __init__(self, folder: str) -> None:
        self.aligned = os.path.exists(os.path.join(folder, "teacher.safetensors"))
        if self.aligned:
            t = load_file(os.path.join(folder, "teacher.safetensors"))
            self.query, self.doc = t["query"], t["doc"]
            return
        self.query = load_file(os.path.join(folder, "queries.safetensors"))["embeddings"]
        self.doc = load_file(os.path.join(folder, "corpus.safetensors"))["embeddings"]
        with open(os.path.join(folder, "items.json")) as f:
            items = json.load(f)
        self.row_of = {side: {it["text"]: i for i, it in enumerate(items[side])} for side in ("queries", "corpus")}

    def _rows(self, side: str, pairs: list) -> list[int]:
        missing = [(r.source, it.text) for r, it in pairs if it.text not in self.row_of[side]]
        if missing:
            raise KeyError(
                f"{missing[0][0]}: {missing[0][1]!r} is not in the teacher embeddings ({len(missing)} missing)"
            )
        return [self.row_of[side][it.text] for _, it in pairs]

    def __call__(self, records: list) -> tuple[torch.Tensor, torch.Tensor]:
        if self.aligned:
            rows = [r.extra["row"] for r in records]
            return self.query[rows], self.doc[rows]
        docs = [(r, r.positive) for r in records] + [(r, n) for r in records for n in r.negatives]
        return self.query[self._rows("queries", [(r, r.query) for r in records])], self.doc[self._rows("corpus", docs)]


def collate(student: TextCollator, teacher: TextCollator | TeacherStore, records: list) -> dict:
    """Student inputs, plus the teacher's inputs (live) or its embeddings (precomputed)."""
    if isinstance(teacher, TeacherStore) and teacher.aligned:  # no teacher embedding for the hard negatives
        records = [dataclasses.replace(r, negatives=[]) for r in records]
    batch = {"student": student(records)}
    batch["teacher"] = teacher(records) if isinstance(teacher, TextCollator) else None
    batch["teacher_emb"] = teacher(records) if isinstance(teacher, TeacherStore) else None
    return batch


def evaluate(model: nn.Module, collator: TextCollator, cfg, path: str, args) -> dict[str, float]:
    """Cosine retrieval of the unique positives (+ negatives) of ``path`` for its unique queries."""
    rs = retrieval_set(load_records(path, format="t2t"))
    q = embed_texts(model, collator, cfg, [i.text for i in rs.queries], True, args.eval_batch_size, args.bf16)
    d = embed_texts(model, collator, cfg, [i.text for i in rs.docs], False, args.eval_batch_size, args.bf16)
    return retrieval_metrics(F.normalize(q, dim=-1) @ F.normalize(d, dim=-1).T, rs.relevant, ks=(1, 5, 10))


# ----------------------------------------------------------------------------- main


def prepare(args: argparse.Namespace, device: torch.device):
    """(student, student collator, student cfg, teacher (model, cfg) or None, teacher collator or store)."""
    student, collator, cfg = load_text_encoder(
        args.model,
        pooling=args.pooling,
        max_length=args.max_length,
        query_prefix=args.query_prefix,
        doc_prefix=args.doc_prefix,
    )
    for p in getattr(student, "pooler", nn.Identity()).parameters():  # BERT's pooler head: pooling never uses it
        p.requires_grad_(False)  # (a parameter with no gradient gets no optimizer state, which resume would miss)
    if args.teacher_embeddings:
        return student.to(device), collator, cfg, None, TeacherStore(args.teacher_embeddings)
    teacher, t_collator, t_cfg = load_text_encoder(args.teacher)
    teacher.to(device).eval().requires_grad_(False)  # frozen: no dropout, no gradient, never in the optimizer
    return student.to(device), collator, cfg, (teacher, t_cfg), t_collator


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    rank, world, device = init_distributed()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(asctime)s %(message)s")
    torch.manual_seed(args.seed)
    os.makedirs(args.output, exist_ok=True)
    hf_model, collator, cfg, teacher, teacher_input = prepare(args, device)
    if args.grad_checkpointing:
        checkpoint_layers(hf_model)
    if args.lora:
        hf_model = apply_lora(hf_model, r=args.lora, alpha=args.lora_alpha)
    if args.compile:
        compile_layers(hf_model)
    hf_model.train()
    model = wrap_ddp(hf_model)
    criterion = Distill(temperature=args.temperature, kind=args.kind)

    train = Numbered(load_records(args.data, format="t2t"))
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
    batches = TaskBatches(
        {"train": train}, sampler, functools.partial(collate, collator, teacher_input), steps=end - start
    )
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
        teacher,
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
    del model, hf_model, teacher  # the DDP wrapper must go before the process group (see shutdown_distributed)
    shutdown_distributed()
    return result


def train_loop(
    args,
    loader,
    model,
    teacher,
    criterion,
    optimizer,
    scheduler,
    sampler,
    state,
    cfg,
    total,
    end,
    device,
    evaluate_during,
) -> list[float]:
    """The explicit loop: student (GradCache if --chunk-size) and teacher embed the batch, Distill, step, log, save."""
    rank, world = get_rank(), get_world_size()
    gc = GradCache(chunk_size=args.chunk_size, sync_module=model) if args.chunk_size else None
    ckpt_dir = os.path.join(args.output, "checkpoints")
    dims = [int(d) for d in args.mrl_dims.split(",")] if args.mrl_dims else [None]

    def encode(inputs: dict) -> torch.Tensor:
        inputs = {k: v.to(device) for k, v in inputs.items()}
        fn = lambda **x: text_features(model, x, cfg.pooling, normalize=False)  # noqa: E731 (Distill normalises)
        with torch.autocast(device.type, torch.bfloat16, enabled=args.bf16):
            return (fn(**inputs) if gc is None else gc.encode(fn, **inputs)).float()

    @torch.no_grad()
    def encode_teacher(inputs: dict) -> torch.Tensor:
        t_model, t_cfg = teacher
        with torch.autocast(device.type, torch.bfloat16, enabled=args.bf16):
            return text_features(
                t_model, {k: v.to(device) for k, v in inputs.items()}, t_cfg.pooling, t_cfg.normalize
            ).float()

    def docs(side: dict, enc) -> torch.Tensor:  # positives, then the flat hard negatives (the store's order too)
        return torch.cat([enc(side["positive"])] + ([enc(side["negatives"])] if "negatives" in side else []))

    t0, seen, losses = time.perf_counter(), 0, []
    train_log = open(os.path.join(args.output, "train_log.jsonl"), "a") if rank == 0 else None
    for item in loader:
        step, batch = item["step"] + 1, item["batch"]
        with one_gradient_sync(model):  # several forwards, one gradient all-reduce (parallel.one_gradient_sync)
            sq, sd = encode(batch["student"]["query"]), docs(batch["student"], encode)
            if teacher is not None:
                tq, td = encode_teacher(batch["teacher"]["query"]), docs(batch["teacher"], encode_teacher)
            else:
                tq, td = (t.to(device) for t in batch["teacher_emb"])
            sd, td = (
                gather_with_grad(sd),
                gather_with_grad(td),
            )  # candidates: every rank's docs; rows: this rank's queries
            loss = sum(criterion(sq[:, :d], sd[:, :d], tq, td) for d in dims)
            loss.backward()
        clip_gradients([p for g in optimizer.param_groups for p in g["params"]], args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(mean_over_ranks(loss))  # the global batch's loss, not rank 0's
        seen += sq.shape[0] * world
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
    """Export the student as an HF + sentence-transformers folder and evaluate it after training."""
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
