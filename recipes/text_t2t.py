r"""Fine-tune a text bi-encoder (BERT, MiniLM, BGE, Qwen3-Embedding) with InfoNCE, CoSENT or Triplet.

Demo (no --data): text pairs with hard negatives and labels, a tiny random BERT (a sentence-transformers folder):

    python recipes/text_t2t.py
    torchrun --nproc_per_node=2 recipes/text_t2t.py

Your data (rows {"query", "positive", "negatives"?, "label"?, "score"?}), one GPU, eight, two nodes:

    python recipes/text_t2t.py --model sentence-transformers/all-MiniLM-L6-v2 --data train.jsonl --val-data val.jsonl
    torchrun --nproc_per_node=8 recipes/text_t2t.py --model BAAI/bge-base-en-v1.5 --data train.jsonl \
        --val-data val.jsonl --mine-negatives 4 --mine-margin 0.05 --batch-size 128 --chunk-size 32 --bf16
    torchrun --nnodes 2 --node_rank $NODE_RANK --nproc_per_node=8 --master_addr $HEAD_NODE_IP --master_port 29500 \
        recipes/text_t2t.py --model BAAI/bge-base-en-v1.5 --data train.jsonl --batch-size 128 --chunk-size 32 --bf16

--model: a plain HF folder/id (mean pooling, L2-normalised) or a sentence-transformers folder (its pooling,
normalisation, length, prompts). CoSENT reads each pair's gold score from "score" (labels are ints or strings).
--mine-negatives K: mine K negatives per row with the model as loaded, train on <output>/mined.jsonl. Writes
args.json, logs, metrics.json, report.md, checkpoints/, final/ (HF + sentence-transformers).
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from vembed_blocks import text_encoder
from vembed_blocks.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from vembed_blocks.data.collate import TextCollator, WithScores, scatter_negatives
from vembed_blocks.data.guide_inputs import WithGuideInputs
from vembed_blocks.data.length_batches import lengths_for
from vembed_blocks.data.loader import TaskLoader, training_batches
from vembed_blocks.data.records import load_records
from vembed_blocks.demo.text import prepare_text_demo
from vembed_blocks.distributed import average_gradients, init_distributed, mean_over_ranks, shutdown_distributed
from vembed_blocks.embed import evaluate_retrieval_by
from vembed_blocks.grad_sync import clip_gradients, defer_gradient_sync
from vembed_blocks.gradcache import GradCache
from vembed_blocks.gradcache_split import RowSplit
from vembed_blocks.input_check import InputCheck
from vembed_blocks.length_chunks import LengthSplit, encode_in_length_chunks
from vembed_blocks.losses import CoSENT, InfoNCE, Matryoshka, Triplet
from vembed_blocks.mining import write_mined_file
from vembed_blocks.parallel import apply_lora, checkpoint_layers, compile_layers
from vembed_blocks.pooling import POOL_METHODS
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
from vembed_blocks.text_encoder import export_text_encoder, load_text_encoder, text_features, unit_text_encoder
from vembed_blocks.user_errors import report_user_errors

log = logging.getLogger("text_t2t")
DATA_HELP = "training file (JSONL/CSV/Parquet); default: the demo text pairs (and a tiny BERT)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = common_parser(__doc__, output="runs/text_t2t", lr=2e-5, batch_size=64, data_help=DATA_HELP, require_data=False)
    p.add_argument("--model", help="HF id or local folder (plain HF or sentence-transformers); default: demo BERT")
    p.add_argument("--loss", choices=["infonce", "cosent", "triplet"], default="infonce")
    p.add_argument("--temperature", type=float, default=0.05, help="InfoNCE: logits = cos / T")
    p.add_argument("--symmetric", action="store_true", help="InfoNCE: also doc->query")
    p.add_argument("--margin", type=float, default=0.2, help="Triplet margin (cosine distance)")
    p.add_argument("--pooling", choices=POOL_METHODS, help="default: the folder's 1_Pooling, else mean")
    p.add_argument("--max-length", type=int, help="token cap; default: the folder's max_seq_length, else 512")
    p.add_argument("--query-prefix", help="prepended to queries; default: the folder's 'query' prompt")
    p.add_argument("--doc-prefix", help="prepended to documents; default: the folder's 'document' prompt")
    p.add_argument("--mine-negatives", type=int, default=0, help="mine K hard negatives per row before training")
    p.add_argument("--mine-margin", type=float, help="skip candidates scoring above (positive - margin)")
    p.add_argument("--mine-ratio", type=float, help="skip candidates scoring above ratio * positive")
    a = p.add_argument
    a("--mine-range", type=int, nargs=2, metavar=("N", "M"), help="mine from ranks N..M-1 (drawn with --seed)")
    p.add_argument("--demo-quick", action="store_true", help="demo: a smaller set and model (tests)")
    add_padding_args(p)  # --trim-padding (on), --trim-chunk-size, --token-budget
    add_false_negative_args(p, "a text model folder or HF id (plain HF or sentence-transformers), like --model")
    args, _ = p.parse_known_args(argv)
    if args.data is None:  # the demo trains a random model from scratch: a larger step than a fine-tune
        p.set_defaults(lr=1e-3, max_steps=20 if args.demo_quick else 60, batch_size=32)
    elif args.model is None:
        p.error("--model is required with --data (an HF id or a local folder)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- model, data, loss, evaluation


@dataclass
class Parts:
    model: nn.Module  # what the loop runs forward
    state: nn.ModuleDict  # everything a checkpoint restores
    param_groups: list[dict]
    criterion: nn.Module
    collator: TextCollator
    cfg: text_encoder.TextEncoderConfig  # pooling, normalisation, max length of the folder (or the flags)
    splitter: object = None  # how GradCache cuts the inputs into chunks (None: every tensor on dim 0)
    guide: object = None  # --fn-guide: the frozen guide's embedding function (inputs -> [b, G])
    guide_collator: object = None  # its own tokenizer's inputs of the same rows
    masked: dict = field(default_factory=dict)  # false negatives each rule masked this step (step_loss adds)


def prepare_data(args: argparse.Namespace, rank: int, world: int) -> tuple[str, str | None]:
    """(train file, val file) as given (mining happens in load_data), else the demo's (rank 0 writes) as --data:
    text pairs and, without --model, a tiny random BERT saved as a sentence-transformers folder."""
    if not args.data:  # so load_data tells the training file (mined) from the validation one
        demo = os.path.join(args.output, "demo")
        made = prepare_text_demo(
            demo,
            quick=args.demo_quick,
            seed=args.seed,
            rank=rank,
            world=world,
            build_model=args.model is None,
            sentence_transformers=True,
        )
        args.model = args.model or made["model"]
        args.data, args.val_data = made["train"], args.val_data or made["val"]
    return args.data, args.val_data


def load_encoder(args: argparse.Namespace) -> tuple[nn.Module, TextCollator, text_encoder.TextEncoderConfig]:
    """(model, collator, cfg): the folder's pooling / normalisation / length / prompts, overridden by the flags."""
    overrides = {k: getattr(args, k) for k in ("pooling", "max_length", "query_prefix", "doc_prefix")}
    return load_text_encoder(args.model, **overrides)


def build(args: argparse.Namespace, device: torch.device) -> Parts:
    """The encoder with its folder's pooling / normalisation / length / prompts (flags override), and the loss."""
    model, collator, cfg = load_encoder(args)
    model.to(device)
    for p in getattr(model, "pooler", nn.Identity()).parameters():  # BERT's pooler head: pooling never uses it
        p.requires_grad_(False)
    if args.grad_checkpointing:
        checkpoint_layers(model)
    if args.lora:  # after checkpointing: LoRA wraps the layers checkpointing must still see as blocks
        model = apply_lora(model, r=args.lora, alpha=args.lora_alpha)
    if args.compile:  # last: compiles the checkpointed, LoRA-wrapped blocks
        compile_layers(model)
    model.train()
    a = args  # the false-negative rules (--fn-*): checked at parse time
    rules = false_negative_rules(a.fn_margin, a.fn_ratio, a.fn_weight, a.fn_guide, a.fn_guide_margin, a.fn_guide_ratio)
    if (rules or args.fn_duplicates) and args.loss != "infonce":
        raise SystemExit("the --fn-* false-negative rules need --loss infonce")
    if args.loss == "cosent":
        criterion = CoSENT()
    elif args.loss == "triplet":
        criterion = Triplet(margin=args.margin)
    else:
        criterion = InfoNCE(temperature=args.temperature, symmetric=args.symmetric, false_negatives=rules)
    if args.mrl_dims:  # the loss over nested prefixes of the embedding
        criterion = Matryoshka(criterion, mrl_dims(args.mrl_dims))
    groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    splitter = LengthSplit if args.trim_padding else None  # exact: the pooling reads attention_mask
    state = nn.ModuleDict({"model": model, "loss": criterion})
    parts = Parts(model, state, groups, criterion, collator, cfg, splitter)
    parts.masked = false_negative_counts(args.fn_duplicates, rules)
    if args.fn_guide:  # frozen, eval mode: its scores only choose which candidates to drop
        guide, parts.guide_collator, guide_cfg = load_text_encoder(args.fn_guide)
        guide = guide.to(device).eval().requires_grad_(False)
        parts.guide = lambda **x: text_features(guide, x, guide_cfg.pooling, normalize=False)
    return parts


def load_data(args: argparse.Namespace, parts: Parts, path: str, rank: int, world: int) -> tuple[TaskLoader, int]:
    """(batches, rows per epoch); with --mine-negatives, first a copy of --data with mined negatives."""
    if args.mine_negatives and path == args.data:  # not for the validation batches
        mined = os.path.join(args.output, "mined.jsonl")
        if not (args.resume and os.path.exists(mined)):  # resume: the negatives of the first launch
            parts.model.eval()
            write_mined_file(
                load_records(path, format="t2t", columns=args.columns, delimiter=args.csv_delimiter),
                unit_text_encoder(parts.model, parts.collator, parts.cfg, args.bf16),
                mined,
                args.mine_negatives,
                args.mine_margin,
                args.mine_ratio,
                args.eval_batch_size,
                rank_range=tuple(args.mine_range) if args.mine_range else None,
                seed=args.seed,
            )
            parts.model.train()
            log.info("mined %d negatives per row -> %s", args.mine_negatives, mined)
        path = mined
    options = dict(batch_size=args.batch_size, seed=args.seed, rank=rank, world_size=world, format="t2t")
    options.update(num_workers=args.num_workers, grad_accum_steps=args.grad_accum_steps, max_steps=args.max_steps)
    options.update(skip_bad=args.skip_bad, max_bad_fraction=args.max_bad_fraction, skip_bad_shards=args.skip_bad_shards)
    options.update(columns=args.columns, delimiter=args.csv_delimiter, allow_mixed=args.allow_mixed_data)
    if args.token_budget:  # rows of similar length filling the budget per rank (docs/data.md), not batch_size rows
        options.update(token_budget=args.token_budget, row_length=lengths_for(parts.collator))
    collate = WithGuideInputs(parts.collator, parts.guide_collator) if args.fn_guide else parts.collator
    loader, rows = training_batches(path, WithScores(collate), **options)
    if args.token_budget:  # the shared loop counts an epoch in --batch-size rows per rank: a pass in those units
        rows = loader.sampler.batches_per_pass(0) * args.batch_size * world
    return loader, rows


def step_loss(args: argparse.Namespace, parts: Parts, batch: dict, gc: GradCache | None, device) -> torch.Tensor:
    """Encode queries, documents and (where the batch has them) hard negatives; the chosen loss."""

    fn = lambda **x: text_features(parts.model, x, parts.cfg.pooling, normalize=False)  # the losses normalise

    def encode(inputs: dict) -> torch.Tensor:  # GradCache: chunks without graphs now, replayed by loss.backward()
        inputs = {k: v.to(device) for k, v in inputs.items()}
        with autocast(args, device):
            if gc is not None:
                return gc.encode(fn, **inputs).float()
            if args.trim_padding:  # length-sorted chunks cut to their longest row, graphs kept
                return encode_in_length_chunks(fn, inputs, args.trim_chunk_size).float()
            return fn(**inputs).float()

    q, p = encode(batch["query"]), encode(batch["positive"])
    neg = encode(batch["negatives"]) if "negatives" in batch else None
    if args.loss == "cosent":
        if "scores" not in batch:
            raise ValueError("--loss cosent needs a numeric 'score' on every row")
        return parts.criterion(q, p, scores=batch["scores"].to(device))
    if args.loss == "triplet":
        if neg is None:
            return parts.criterion(q, p)
        mask = batch["negatives_mask"].to(device)
        return parts.criterion(q, p, scatter_negatives(neg, mask), negatives_mask=mask)
    labels = batch.get("labels")
    extra = {"labels": labels.to(device)} if labels is not None and not labels.is_floating_point() else {}
    if args.fn_duplicates:  # content ids ([M] negatives, like the pool): candidates equal to the positive drop
        extra["content_ids"] = {k: v.to(device) for k, v in batch["content_ids"].items()}
    if parts.guide is not None:  # --fn-guide: the frozen guide's embeddings of the same rows, without gradient
        sides = [k for k in ("query", "positive", "negatives") if k in batch["guide"]]
        extra["guide"] = {k: guide_embed(args, parts, batch["guide"][k], device) for k in sides}
    loss = parts.criterion(q, p, negatives=neg, **extra)
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
    """Cosine retrieval of ``path``'s unique positives (+ negatives) for its unique queries; all ranks embed."""
    parts.model.eval()
    encode = unit_text_encoder(parts.model, parts.collator, parts.cfg, args.bf16)
    records = load_records(path, format="t2t", columns=args.columns, delimiter=args.csv_delimiter)
    widths = mrl_dims(args.mrl_dims)  # also the metrics at each Matryoshka width ("dim<w>/<metric>")
    metrics = evaluate_retrieval_by(records, encode, args.relevance, args.eval_batch_size, curve_k=100, widths=widths)
    parts.model.train()
    return metrics


def export(args: argparse.Namespace, parts: Parts, final: str) -> None:
    """An HF folder that is also a sentence-transformers folder (pooling, normalisation, prompts)."""
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
