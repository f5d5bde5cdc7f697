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
import random
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from vembed_blocks import InfoNCE, Matryoshka, SigLIP, get_rank, get_world_size, init_distributed, retrieval_metrics
from vembed_blocks.checkpoint import export_pretrained, latest_checkpoint, load_checkpoint, save_checkpoint
from vembed_blocks.data import DualEncoderCollator, IndexedRecords, TaskBatches, WeightedTaskSampler, read_records
from vembed_blocks.distributed import average_gradients
from vembed_blocks.embed import embed_items, retrieval_set
from vembed_blocks.gradcache import GradCache
from vembed_blocks.parallel import apply_lora, wrap_ddp
from vembed_blocks.towers import dual_encoder_features

log = logging.getLogger("clip_t2i")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF id or local folder (CLIP/SigLIP); default: a tiny random CLIP (demo)")
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
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the encoders")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers (decode + processor)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0 = at the end only)")
    p.add_argument("--resume", action="store_true", help="continue from <output>/checkpoints")
    p.add_argument("--stop-at", type=int, help="save and exit at this step (split a run across jobs; then --resume)")
    p.add_argument("--eval-batch-size", type=int, default=128)
    p.add_argument("--output", default="runs/clip_t2i")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--demo-quick", action="store_true", help="demo: a smaller set and model (tests)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- demo data and model

SHAPES = ["circle", "square", "triangle", "cross"]
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220),
           "yellow": (230, 210, 40), "purple": (150, 60, 190), "white": (245, 245, 245)}  # fmt: skip
POSITIONS = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73), "center": (0.5, 0.5)}
TEMPLATES = ["a {c} {s} on the {p}", "a photo of a {c} {s} at the {p}", "{c} {s}, {p}", "there is a {c} {s} to the {p}"]


def render_demo(out_dir: str, per_combo: int, seed: int) -> tuple[str, str]:
    """Render shapes x colours x positions; train: ``per_combo`` images each, val: one new one each."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    os.makedirs(os.path.join(out_dir, "img"), exist_ok=True)
    files = {}
    for split, n in (("train", per_combo), ("val", 1)):
        rows = []
        for s in SHAPES:
            for c, rgb in COLOURS.items():
                for pos, (cx, cy) in POSITIONS.items():
                    for k in range(n):
                        size, grey = 48, rng.randint(60, 120)
                        img = Image.new("RGB", (size, size), (grey, grey, grey))
                        x, y, r = cx * size + rng.uniform(-3, 3), cy * size + rng.uniform(-3, 3), rng.uniform(6, 9)
                        draw, box = ImageDraw.Draw(img), [x - r, y - r, x + r, y + r]
                        if s == "circle":
                            draw.ellipse(box, fill=rgb)
                        elif s == "square":
                            draw.rectangle(box, fill=rgb)
                        elif s == "triangle":
                            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=rgb)
                        else:
                            draw.rectangle([x - r, y - r / 3, x + r, y + r / 3], fill=rgb)
                            draw.rectangle([x - r / 3, y - r, x + r / 3, y + r], fill=rgb)
                        name = f"img/{split}_{s}_{c}_{pos}_{k}.png"
                        img.save(os.path.join(out_dir, name))
                        caption = rng.choice(TEMPLATES).format(c=c, s=s, p=pos)
                        rows.append({"query": caption, "positive": name})
        rng.shuffle(rows)
        files[split] = os.path.join(out_dir, f"{split}.jsonl")
        with open(files[split], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return files["train"], files["val"]


def build_tiny_clip(out_dir: str, quick: bool) -> str:
    """A random CLIP with a word-level tokenizer over the demo vocabulary, saved as an HF folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, PreTrainedTokenizerFast
    from transformers.models.clip import CLIPImageProcessorPil

    words = sorted({w for t in TEMPLATES for w in t.replace(",", " ").split() if "{" not in w}
                   | set(SHAPES) | set(COLOURS) | set(POSITIONS) | {","})  # fmt: skip
    vocab = {"[PAD]": 0, "[UNK]": 1, "[BOS]": 2, "[EOS]": 3, **{w: i + 4 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="[BOS] $A [EOS]", special_tokens=[("[BOS]", 2), ("[EOS]", 3)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
                                        eos_token="[EOS]", model_max_length=16)  # fmt: skip
    images = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    width, layers = (32, 1) if quick else (64, 2)
    tower = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers, num_attention_heads=4)
    config = CLIPConfig(
        text_config=dict(tower, vocab_size=len(vocab), max_position_embeddings=16, bos_token_id=2, eos_token_id=3, pad_token_id=0),
        vision_config=dict(tower, image_size=32, patch_size=8),
        projection_dim=width,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(out_dir)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(out_dir)
    return out_dir


# ----------------------------------------------------------------------------- pieces of the loop


def load_records(path: str, fmt: str | None):
    """JSONL: random access without holding the file in memory; CSV/Parquet: a list."""
    options = {"format": fmt} if fmt else {}
    return IndexedRecords(path, **options) if path.endswith((".jsonl", ".json")) else list(read_records(path, **options))


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


def lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return f


@torch.no_grad()
def evaluate(hf_model: nn.Module, collator: DualEncoderCollator, path: str, args, device) -> dict[str, float]:
    """Embed the unique queries and corpus of ``path`` and score retrieval (rank 0 only)."""
    rs = retrieval_set(load_records(path, args.format))
    was_training = hf_model.training
    hf_model.eval()

    def encode(is_query: bool):
        def run(items):
            inputs = {k: v.to(device) for k, v in collator.encode(items, [path] * len(items), is_query).items()}
            with torch.autocast(device.type, torch.bfloat16, enabled=args.bf16):
                return F.normalize(dual_encoder_features(hf_model, inputs).float(), dim=-1)
        return run

    q = embed_items(rs.queries, encode(True), args.eval_batch_size, "embed queries")
    d = embed_items(rs.docs, encode(False), args.eval_batch_size, "embed corpus")
    hf_model.train(was_training)
    return retrieval_metrics(q @ d.T, rs.relevant, ks=(1, 5, 10))


def print_table(before: dict[str, float], after: dict[str, float] | None = None) -> None:
    names = ["recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10"]
    lines = [f"{'metric':<10} {'before':>8}" + (f" {'after':>8}" if after else "")]
    for n in names:
        lines.append(f"{n:<10} {before[n]:>8.4f}" + (f" {after[n]:>8.4f}" if after else ""))
    print("\n".join(lines), flush=True)


# ----------------------------------------------------------------------------- main


def prepare_demo(args: argparse.Namespace, rank: int, world: int) -> tuple[str, str | None]:
    """Return (train file, val file); with no --data render the demo set (rank 0) and pick its defaults."""
    if args.data is not None:
        return args.data, args.val_data
    demo = os.path.join(args.output, "demo")
    if rank == 0:
        render_demo(demo, per_combo=2 if args.demo_quick else 8, seed=args.seed)
        if args.model is None:
            build_tiny_clip(os.path.join(demo, "model"), args.demo_quick)
    if world > 1:
        torch.distributed.barrier()
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
    if args.model is None:
        raise SystemExit("--model is required with --data (an HF id or a local folder)")

    from transformers import AutoModel, AutoProcessor

    processor = AutoProcessor.from_pretrained(args.model)
    hf_model = AutoModel.from_pretrained(args.model).to(device)
    criterion = make_loss(args, hf_model).to(device)
    if args.lora:
        hf_model = apply_lora(hf_model, r=args.lora, alpha=args.lora_alpha)
    hf_model.train()
    # One tower per forward: parameters of the other tower are legitimately unused.
    model = wrap_ddp(hf_model, find_unused_parameters=True)
    siglip = "siglip" in type(hf_model).__name__.lower()  # SigLIP was trained on max_length=64 padding
    collator = DualEncoderCollator(processor, max_length=64 if siglip else 77, padding="max_length" if siglip else True)

    train = load_records(data, args.format)
    sampler = WeightedTaskSampler({"train": len(train)}, args.batch_size, seed=args.seed, rank=rank, world_size=world)
    total = args.max_steps or max(1, round(args.epochs * math.ceil(len(train) / (args.batch_size * world))))
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in hf_model.parameters() if p.requires_grad]},
         {"params": list(criterion.parameters()), "weight_decay": 0.0}],
        lr=args.lr, weight_decay=args.weight_decay,
    )  # fmt: skip
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.warmup_steps, total))
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
            print_table(json.load(f))

    end = min(total, args.stop_at or total)
    batches = TaskBatches({"train": train}, sampler, collator, steps=end - start)
    loader = DataLoader(batches, batch_size=None, num_workers=args.num_workers)
    log.info("training steps %d -> %d of %d, %d rows/step over %d rank(s)", start, end, total, args.batch_size * world, world)
    losses = train_loop(args, loader, model, criterion, optimizer, scheduler, sampler, state, total, end, device)

    result = {"losses": losses}
    if end < total:
        log.info("stopped at step %d of %d; continue with --resume", end, total)
    else:
        result.update(finish(args, model, hf_model, criterion, processor, collator, val, before_file, device))
    if world > 1:
        torch.distributed.destroy_process_group()
    return result


def train_loop(args, loader, model, criterion, optimizer, scheduler, sampler, state, total, end, device) -> list[float]:
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
        q, p = encode(batch["query"]), encode(batch["positive"])
        extra = {"labels": batch["labels"].to(device)} if "labels" in batch else {}
        if "negatives" in batch and args.loss == "infonce":  # the flat real negatives are a candidate pool
            extra["negatives"] = encode(batch["negatives"])
        loss = criterion(q, p, **extra)
        loss.backward()
        average_gradients(criterion.parameters())  # DDP does not see the loss's own parameters
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        seen += q.shape[0] * world
        if train_log:
            train_log.write(json.dumps({"step": step, "loss": losses[-1], "lr": scheduler.get_last_lr()[0]}) + "\n")
            train_log.flush()
        if step % args.log_every == 0 or step == end:
            rate = seen / (time.perf_counter() - t0)
            log.info("step %d/%d  loss %.4f  lr %.2e  %.1f samples/s", step, total, losses[-1], scheduler.get_last_lr()[0], rate)
        if (args.save_every and step % args.save_every == 0) or step == end:
            sampler.load_state_dict(item["sampler_state"])  # the state after the batch just trained on
            save_checkpoint(ckpt_dir, model=state, optimizer=optimizer, step=step, sampler=sampler, scheduler=scheduler)
    if train_log:
        train_log.close()
    return losses


def finish(args, model, hf_model, criterion, processor, collator, val, before_file, device) -> dict:
    """Export the model (learned temperature folded back in) and evaluate after training."""
    copy_scale_into_model(criterion, hf_model)
    final = os.path.join(args.output, "final")
    export_pretrained(model, final, processor=processor)
    log.info("exported to %s", final)
    if not val or get_rank() != 0:
        return {}
    with open(before_file) as f:
        before = json.load(f)
    after = evaluate(hf_model, collator, val, args, device)
    with open(os.path.join(args.output, "metrics.json"), "w") as f:
        json.dump({"before": before, "after": after}, f, indent=1)
    print_table(before, after)
    return {"before": before, "after": after}


if __name__ == "__main__":
    main()
