r"""Late-interaction retrieval (ColBERT, ColPali / ColQwen): token embeddings, MaxSim, FSDP2, GradCache.

Demo (no --data): text ColBERT on procedural text pairs (a hard negative per row) and a tiny random BERT:

    python recipes/colbert.py
    torchrun --nproc_per_node=2 recipes/colbert.py

Your data and model, one GPU, eight, two nodes:

    python recipes/colbert.py --model bert-base-uncased --data msmarco.jsonl --val-data dev.jsonl \
        --batch-size 128 --chunk-size 32 --dim 128 --output runs/colbert
    torchrun --nproc_per_node=8 recipes/colbert.py --model Qwen/Qwen3-VL-2B-Instruct --data pages.jsonl \
        --val-data pages_val.jsonl --batch-size 32 --chunk-size 4 --lora 32 --bf16 --grad-checkpointing
    torchrun --nnodes 2 --node_rank $NODE_RANK --nproc_per_node=8 --master_addr $HEAD_NODE_IP --master_port 29500 \
        recipes/colbert.py --model Qwen/Qwen3-VL-2B-Instruct --data pages.jsonl --batch-size 32 --chunk-size 4 --bf16

Token vectors (last hidden states, projected to --dim) score by MaxSim, trained by InfoNCE over MaxSim against
every document and hard negative of all ranks. --encoder text (BERT-like, T2T data) or vlm (Qwen-VL, T2I/M2I/I2I);
auto: vlm if the config has a vision_config. Outputs (final/: HF folder + colbert.json): docs/recipes/colbert.md.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from vembed_blocks.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from vembed_blocks.colbert import ColBERT, maxsim_in_blocks, save_colbert_head
from vembed_blocks.data.collate import FixedNegatives, TextCollator, VLMCollator, scatter_negative_ids
from vembed_blocks.data.guide_inputs import WithGuideInputs
from vembed_blocks.data.loader import TaskLoader, training_batches
from vembed_blocks.data.records import load_records
from vembed_blocks.demo.text import prepare_text_demo
from vembed_blocks.distributed import (
    average_gradients,
    get_rank,
    init_distributed,
    mean_over_ranks,
    pad_dim,
    shutdown_distributed,
)
from vembed_blocks.embed import evaluate_retrieval_by
from vembed_blocks.export import export_pretrained
from vembed_blocks.grad_sync import clip_gradients, defer_gradient_sync
from vembed_blocks.gradcache import GradCache
from vembed_blocks.gradcache_split import RowSplit
from vembed_blocks.input_check import InputCheck
from vembed_blocks.losses import Matryoshka
from vembed_blocks.model_folders import check_model_arg, hub_errors
from vembed_blocks.parallel import apply_lora, checkpoint_layers, compile_layers
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
from vembed_blocks.text_encoder import load_text_encoder, text_features
from vembed_blocks.user_errors import report_user_errors
from vembed_blocks.vlm import VLMSplit, load_vlm_processor, shard_vlm, vlm_embed, vlm_token_embeddings

log = logging.getLogger("colbert")
DATA_HELP = "training file (JSONL/CSV/Parquet); default: the demo text pairs (and a tiny BERT)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    shared = dict(output="runs/colbert", lr=1e-5, batch_size=32, eval_batch_size=32, lora_alpha=32.0, fsdp=True)
    p = common_parser(__doc__, **shared, data_help=DATA_HELP, require_data=False)
    p.add_argument("--model", help="HF id or local folder: a BERT-like model or a Qwen-VL model; default: demo BERT")
    p.add_argument("--format", choices=["t2i", "i2t", "i2i", "m2i", "t2t", "swift"], help="declare the data format")
    p.add_argument("--encoder", choices=["auto", "text", "vlm"], default="auto", help="auto: vlm if a vision_config")
    p.add_argument("--dim", type=int, default=128, help="linear projection of every token to this width (0 = none)")
    p.add_argument("--proj-lr", type=float, help="learning rate of the new projection (default: 10 x --lr)")
    p.add_argument("--query-instruction", help="text: query prefix (e.g. '[Q] '); vlm: system prompt of queries")
    p.add_argument("--doc-instruction", help="text: document prefix; vlm: system prompt of documents")
    p.add_argument("--max-length", type=int, default=256, help="text: tokens per query/document")
    p.add_argument("--max-image-side", type=int, default=1024, help="vlm: downscale larger images before the processor")
    p.add_argument("--num-negatives", type=int, default=0, help="hard negatives per row (fixed: equal forwards)")
    p.add_argument("--temperature", type=float, default=0.05, help="logits = MaxSim / T")
    p.add_argument("--demo-quick", action="store_true", help="demo: a smaller set and model (tests)")
    add_false_negative_args(p, "single-vector: text, an HF or sentence-transformers folder; vlm, a Qwen-VL")
    args, _ = p.parse_known_args(argv)
    if args.data is None:  # the demo trains a random model from scratch: a larger step, a narrow projection
        p.set_defaults(lr=1e-3, max_steps=20 if args.demo_quick else 60, batch_size=32, dim=32, num_negatives=1)
    elif args.model is None:
        p.error("--model is required with --data (an HF id or a local folder)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- model, data, loss, evaluation


@dataclass
class Parts:
    model: nn.Module  # the FSDP2-sharded encoder
    state: nn.ModuleDict  # everything a checkpoint restores (encoder + projection)
    param_groups: list[dict]
    criterion: nn.Module
    collator: TextCollator | VLMCollator
    processor: object
    proj: nn.Linear | None  # tokens -> --dim (outside the sharded model; its gradient is averaged by the loop)
    splitter: object = None  # how GradCache cuts the inputs into chunks (None: every tensor on dim 0)
    guide: object = None  # --fn-guide: the frozen guide's single-vector embedding function (inputs -> [b, G])
    guide_collator: object = None  # its own tokenizer's / processor's inputs of the same rows
    masked: dict = field(default_factory=dict)  # false negatives each rule masked this step (step_loss adds)


def prepare_data(args: argparse.Namespace, rank: int, world: int) -> tuple[str, str | None]:
    """(train file, val file), checked before any model is loaded; without --data the demo's text pairs (rank 0
    writes them) and, without --model, a tiny random BERT."""
    if min(args.num_negatives, args.dim) < 0:
        raise SystemExit("--num-negatives and --dim must be >= 0")
    if args.data:
        return args.data, args.val_data
    demo = os.path.join(args.output, "demo")
    made = prepare_text_demo(
        demo, quick=args.demo_quick, seed=args.seed, rank=rank, world=world, build_model=args.model is None
    )
    args.model = args.model or made["model"]
    return made["train"], args.val_data or made["val"]


def build(args: argparse.Namespace, device: torch.device) -> Parts:
    """The sharded encoder (--encoder text | vlm), the token projection, the collator and the MaxSim loss."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    kind = check_model_arg("--model", args.model, {"text", "vlm", "colbert"}, hub=True)  # before any download
    with hub_errors("--model", args.model):  # a hub id that fails to load: one line, not HF's traceback
        if args.encoder == "auto":
            vlm = kind == "vlm" or (kind is None and hasattr(AutoConfig.from_pretrained(args.model), "vision_config"))
            args.encoder = "vlm" if vlm else "text"
        if args.encoder == "vlm":
            processor = load_vlm_processor(args.model)
            collator = VLMCollator(processor, args.query_instruction, args.doc_instruction, args.max_image_side)
        else:
            processor = AutoTokenizer.from_pretrained(args.model)
            collator = TextCollator(processor, args.max_length, args.query_instruction, args.doc_instruction)
        model = AutoModel.from_pretrained(args.model, dtype=torch.float32).to(device)
    if getattr(model, "pooler", None) is not None:  # BERT's [CLS] pooler: unused by token outputs, so frozen
        model.pooler.requires_grad_(False)
    width = model.config.get_text_config().hidden_size
    proj = nn.Linear(width, args.dim, bias=False).to(device) if args.dim else None  # same init on every rank (seeded)
    if args.grad_checkpointing:
        checkpoint_layers(model)
    if args.lora:  # after checkpointing: LoRA wraps the layers checkpointing must still see as blocks
        model = apply_lora(model, r=args.lora, alpha=args.lora_alpha)
    if args.compile:  # last: compiles the checkpointed, LoRA-wrapped blocks
        compile_layers(model)
    model.train()
    model = shard_vlm(model, mixed_precision="bf16" if args.bf16 else None)  # a VLM's vision tower in the root unit
    a = args  # the false-negative rules (--fn-*): checked at parse time
    rules = false_negative_rules(a.fn_margin, a.fn_ratio, a.fn_weight, a.fn_guide, a.fn_guide_margin, a.fn_guide_ratio)
    criterion = ColBERT(temperature=args.temperature, false_negatives=rules)
    if args.mrl_dims:  # MaxSim over nested prefixes of every token vector
        criterion = Matryoshka(criterion, mrl_dims(args.mrl_dims))
    groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    if proj is not None:  # a fresh layer: a larger step than the pretrained encoder
        groups.append({"params": list(proj.parameters()), "lr": args.proj_lr or 10 * args.lr})
    state = nn.ModuleDict({"model": model, **({"proj": proj} if proj is not None else {})})
    splitter = VLMSplit if args.encoder == "vlm" else None  # VLMSplit: flat pixel_values cut by image
    parts = Parts(model, state, groups, criterion, collator, processor, proj, splitter)
    parts.masked = false_negative_counts(args.fn_duplicates, rules)
    parts.guide, parts.guide_collator = load_guide(args, device) if args.fn_guide else (None, None)
    return parts


def load_guide(args: argparse.Namespace, device: torch.device) -> tuple[object, object]:
    """--fn-guide, frozen, eval mode, unsharded: (its single-vector embedding function, its collator)."""
    from transformers import AutoModel

    if args.encoder == "vlm":
        processor = load_vlm_processor(args.fn_guide, flag="--fn-guide")
        collator = VLMCollator(processor, args.query_instruction, args.doc_instruction, args.max_image_side)
        with hub_errors("--fn-guide", args.fn_guide):
            guide = AutoModel.from_pretrained(args.fn_guide, dtype=torch.bfloat16 if args.bf16 else torch.float32)
        fn = lambda **x: vlm_embed(guide, x)
    else:
        guide, collator, cfg = load_text_encoder(args.fn_guide)
        fn = lambda **x: text_features(guide, x, cfg.pooling, normalize=False)
    guide.to(device).eval().requires_grad_(False)
    return fn, collator


def load_data(args: argparse.Namespace, parts: Parts, path: str, rank: int, world: int) -> tuple[TaskLoader, int]:
    """(batches, rows per epoch): one task; exactly --num-negatives negatives a row (FSDP2: same forwards)."""
    options = dict(batch_size=args.batch_size, seed=args.seed, rank=rank, world_size=world, format=args.format)
    options.update(num_workers=args.num_workers, grad_accum_steps=args.grad_accum_steps, max_steps=args.max_steps)
    options.update(skip_bad=args.skip_bad, max_bad_fraction=args.max_bad_fraction, skip_bad_shards=args.skip_bad_shards)
    options.update(columns=args.columns, delimiter=args.csv_delimiter, allow_mixed=args.allow_mixed_data)
    collate = FixedNegatives(parts.collator, args.num_negatives)
    if args.fn_guide:  # the guide's own inputs of the same rows, negatives laid out alike
        collate = WithGuideInputs(collate, FixedNegatives(parts.guide_collator, args.num_negatives))
    return training_batches(path, collate, **options)


def token_embeddings(args: argparse.Namespace, parts: Parts, inputs: dict) -> torch.Tensor:
    """``[b, L, dim]`` token vectors of one collated side (L = its padded length)."""
    if args.encoder == "vlm":
        tokens, _ = vlm_token_embeddings(parts.model, inputs, parts.proj)
    else:
        tokens = parts.model(**inputs).last_hidden_state
        tokens = parts.proj(tokens) if parts.proj is not None else tokens
    return pad_dim(tokens, 1, inputs["attention_mask"].shape[1])


def step_loss(args: argparse.Namespace, parts: Parts, batch: dict, gc: GradCache | None, device) -> torch.Tensor:
    """Token vectors of queries, documents and the fixed-count negatives; InfoNCE over MaxSim, all ranks."""

    fn = lambda **x: token_embeddings(args, parts, x)

    def encode(inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:  # GradCache: chunks now, replayed by backward
        inputs = {k: v.to(device) for k, v in inputs.items()}
        with autocast(args, device):
            tokens = (fn(**inputs) if gc is None else gc.encode(fn, **inputs)).float()
        return tokens, inputs["attention_mask"].bool()

    (q, qm), (d, dm) = encode(batch["query"]), encode(batch["positive"])
    extra = {}
    if args.num_negatives:  # [B*K, Ln, dim] in row order -> [B, K, Ln, dim]; a padded slot's token mask is all False
        n, nm = encode(batch["negatives"])
        b, k = q.shape[0], args.num_negatives
        nm = nm.view(b, k, -1) & batch["negatives_mask"].to(device)[..., None]
        extra = {"negatives": n.view(b, k, n.shape[1], -1), "negatives_mask": nm}
    if args.fn_duplicates:  # content ids (negatives [B, K], -1 on padded slots): candidates equal to the positive
        ids = {k: v.to(device) for k, v in batch["content_ids"].items()}
        if args.num_negatives:
            ids["negatives"] = scatter_negative_ids(ids["negatives"], batch["negatives_mask"])
        extra["content_ids"] = ids
    if parts.guide is not None:  # --fn-guide: the frozen guide's single vectors of the same rows, without gradient
        sides = [k for k in ("query", "positive", "negatives") if k in batch["guide"]]
        extra["guide"] = guide = {k: guide_embed(args, parts, batch["guide"][k], device) for k in sides}
        if "negatives" in guide:  # [B*K, G] in row order -> [B, K, G]
            guide["negatives"] = guide["negatives"].view(q.shape[0], args.num_negatives, -1)
    loss = parts.criterion(q, qm, d, dm, **extra)
    if parts.model.training:  # a training micro-batch (validation_loss runs in eval mode): this step's counts
        add_masked(parts.masked, parts.criterion, device)  # Matryoshka: its inner loss's
    return loss


@torch.no_grad()
def guide_embed(args: argparse.Namespace, parts: Parts, inputs: dict, device) -> torch.Tensor:
    """The frozen guide's ``[b, G]`` embeddings of one side, --chunk-size rows at a time (bounded memory)."""
    split = (parts.splitter or RowSplit)(((), {k: v.to(device) for k, v in inputs.items()}))
    rows = args.chunk_size or len(split)
    with autocast(args, device):
        return torch.cat([parts.guide(**split[s : s + rows][1]) for s in range(0, len(split), rows)]).float()


@torch.no_grad()
def evaluate(args: argparse.Namespace, parts: Parts, path: str, device) -> dict[str, float]:
    """MaxSim of every query against the whole corpus (in blocks of documents); every rank embeds a share."""

    fn = lambda **x: token_embeddings(args, parts, x)

    def encode(items: list, is_query: bool) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = {k: v.to(device) for k, v in parts.collator.encode(items, is_query).items()}
        with autocast(args, device):
            tokens = fn(**inputs).float()
        return F.normalize(tokens, dim=-1), inputs["attention_mask"].bool()

    parts.model.eval()
    records, score = (
        load_records(path, format=args.format, columns=args.columns, delimiter=args.csv_delimiter),
        lambda q, d: maxsim_in_blocks(*q, *d),
    )
    metrics = evaluate_retrieval_by(records, encode, args.relevance, args.eval_batch_size, score, curve_k=100)
    parts.model.train()
    return metrics


def export(args: argparse.Namespace, parts: Parts, final: str) -> None:
    """The encoder as an HF folder (LoRA merged) + the projection + colbert.json; every rank calls it."""
    export_pretrained(parts.model, final, processor=parts.processor)
    if get_rank() == 0:
        spec = dict(query_instruction=args.query_instruction, doc_instruction=args.doc_instruction)
        spec.update(max_length=args.max_length, max_image_side=args.max_image_side)  # the encoder block reads all
        save_colbert_head(final, parts.proj, encoder=args.encoder, dim=args.dim, **spec)


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
