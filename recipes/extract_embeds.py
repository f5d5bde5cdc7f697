r"""Extract embeddings offline (seed 004, step 1): a JSONL in any seed format -> one task directory.

A VLM (Qwen3-VL: the query is the source image(s) + instruction in one chat, the document is
the target image; last-token or per-token hidden states) or a dual encoder (CLIP/SigLIP) is
run once over the data; `recipes/multitask.py` then trains on the stored vectors.

Demo (no --data): renders edit rows with 0, 1 and 2 source images (<output>/demo/edits.jsonl),
saves a tiny random Qwen3-VL to <output>/demo/model (loaded with from_pretrained), extracts them
into <output> (a few seconds on 2 CPU cores) and prints the store's summary:

    python recipes/extract_embeds.py
    torchrun --nproc_per_node=2 recipes/extract_embeds.py

Your data and weights, one GPU and eight:

    python recipes/extract_embeds.py --data edits.jsonl --model Qwen/Qwen3-VL-2B-Instruct \
        --output meta/dataset_a --batch-size 16 --image-sample-size 512 --bf16
    torchrun --nproc_per_node=8 recipes/extract_embeds.py --data edits.jsonl --model ... --output meta/dataset_a

A Qwen-Image-Edit diffusers folder (model_index.json, text_encoder/, processor/, tokenizer/, ...)
stores instead, per record, the prompt embeddings its pipeline computes (diffusers' own
encode_prompt: template, "Picture N:" placeholders, dropped prefix, hidden layer), as one
per-token side "prompt_embeds"; --t2i-mode stores what QwenImagePipeline computes. The
diffusion transformer trains on them (recipes/edit_sft.py).

    torchrun --nproc_per_node=8 recipes/extract_embeds.py --data edits.jsonl \
        --model /path/to/Qwen-Image-Edit-2509 --output meta/dataset_a --batch-size 4 --bf16

Rank r embeds records r, r+W, r+2W, ... (edit rows count twice when they have an inverse
record) in shards of --shard-size records. Output (see docs/embed_store.md)::

    <output>/meta.json  index-<rank>.jsonl  shard-<rank>-<k>.safetensors

Resumable: a shard is written to a temp name and renamed, and its index lines are appended
only after the rename, so rerunning the same command skips finished shards and never
duplicates a record (--stop-after-shards N stops each rank after N new shards).
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import numpy as np
import torch

from vembed_blocks.data.collate import DualEncoderCollator, VLMCollator
from vembed_blocks.data.embed_store import EmbedStore, EmbedWriter, ensure_meta
from vembed_blocks.data.images import load_images
from vembed_blocks.data.records import read_records
from vembed_blocks.demo import render_edit_demo
from vembed_blocks.demo.vlm import build_demo_extractor
from vembed_blocks.distributed import init_distributed, shutdown_distributed
from vembed_blocks.edit.prompts import check_source_count, is_diffusers_folder, load_prompt_pipeline, prompt_embeds
from vembed_blocks.model_folders import check_model_arg, hub_errors
from vembed_blocks.towers import dual_encoder_features, load_dual_encoder, text_padding
from vembed_blocks.user_errors import report_user_errors
from vembed_blocks.vlm import load_vlm_processor, vlm_embed, vlm_token_embeddings

log = logging.getLogger("extract_embeds")
QUERY_INSTRUCTION = "Represent the user's input."
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data", help="input file (JSONL/CSV/Parquet) in any seed format, incl. the edit format; default: demo rows"
    )
    p.add_argument(
        "--model",
        help="HF id or folder: a VLM (Qwen3-VL), a dual encoder (CLIP/SigLIP), or a Qwen-Image(-Edit) diffusers folder"
        "; default: a tiny random Qwen3-VL (demo)",
    )
    p.add_argument("--output", default="runs/extract_embeds", help="the task directory to write (one per dataset)")
    p.add_argument("--demo-quick", action="store_true", help="demo: fewer rows and a smaller model (tests)")
    p.add_argument("--batch-size", type=int, default=4, help="records per forward pass")
    p.add_argument("--shard-size", type=int, default=1024, help="records per shard file (the unit of resumption)")
    p.add_argument("--t2i-mode", action="store_true", help="edit rows: text -> image (drop source images, no inverse)")
    p.add_argument("--disable-inverse", action="store_true", help="edit rows: no inverse (target -> source) records")
    p.add_argument("--language", choices=["en", "cn"], default="en", help="edit rows: instruction or instruction_cn")
    p.add_argument(
        "--field",
        action="append",
        default=[],
        metavar="NAME=COLUMN",
        help="input column names, e.g. --field source_image=src --field target_image=tgt",
    )
    p.add_argument(
        "--format",
        choices=["t2i", "i2t", "i2i", "m2i", "t2t", "edit", "swift"],
        help="declare the format (else detected)",
    )
    p.add_argument(
        "--image-sample-size",
        type=int,
        default=512,
        help="cap on the longest image side before the processor (diffusers folder: 0 = no cap)",
    )
    p.add_argument(
        "--per-token", action="store_true", help="store every token's hidden state (VLM), not the last token"
    )
    p.add_argument("--query-instruction", default=QUERY_INSTRUCTION, help="VLM system prompt, query side")
    p.add_argument("--doc-instruction", default=None, help="VLM system prompt, document side (default: the query one)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="storage dtype")
    p.add_argument(
        "--bf16", action="store_true", help="bf16 autocast for the model (diffusers folder: text encoder in bf16)"
    )
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) bad rows instead of stopping")
    p.add_argument(
        "--stop-after-shards", type=int, help="each rank stops after writing N new shards (rerun to continue)"
    )
    p.add_argument("--log-every", type=int, default=10, help="log progress every N shards")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--debug", action="store_true", help="show the full traceback of a user error (also VEMBED_DEBUG=1)")
    args, _ = p.parse_known_args(argv)
    if args.data is None:  # the demo's rows are tiny: bigger batches, explicit flags win
        p.set_defaults(batch_size=32)
    args = p.parse_args(argv)
    if args.data is not None and args.model is None:
        p.error("--model is required with --data (an HF id or a local folder)")
    return args


def prepare_demo(args: argparse.Namespace, rank: int, world: int) -> None:
    """Without --data: rank 0 renders the demo edit rows (and, without --model, saves a tiny random Qwen3-VL) under
    <output>/demo; --data and --model then point there."""
    if args.data is not None:
        return
    demo = os.path.join(args.output, "demo")
    if rank == 0:
        render_edit_demo(demo, per_combo=1 if args.demo_quick else 3, seed=args.seed)
        if args.model is None:
            build_demo_extractor(os.path.join(demo, "model"))
    if world > 1:
        torch.distributed.barrier()
    args.data, args.model = os.path.join(demo, "edits.jsonl"), args.model or os.path.join(demo, "model")


# ----------------------------------------------------------------------------- model


def load_encoder(args: argparse.Namespace, device: torch.device):
    """(kind, encode(records) -> {side: list of per-record tensors}, extra meta).

    A diffusers folder (``model_index.json``) is a Qwen-Image(-Edit) pipeline: see
    `load_prompt_encoder`. A model whose config has an ``image_token_id`` reads images through
    placeholder tokens in its text: a VLM. Anything else goes through the dual-encoder towers.
    """
    kind = check_model_arg("--model", args.model, {"diffusers", "vlm", "clip", "towers"}, hub=True)
    if kind == "diffusers" or (kind is None and is_diffusers_folder(args.model)):
        return load_prompt_encoder(args, device)
    kind, embed, collator = load_pair_encoder(args, device, kind)

    def encode(recs) -> dict[str, list[torch.Tensor]]:
        sources = [rec.source for rec in recs]
        return {
            "query": embed_side([r.query for r in recs], sources, True, embed, collator, args, device),
            "positive": embed_side([r.positive for r in recs], sources, False, embed, collator, args, device),
        }

    return kind, encode, {}


def load_prompt_encoder(args: argparse.Namespace, device: torch.device):
    """A Qwen-Image(-Edit) folder: one side, ``prompt_embeds`` (``[L_i, D]`` per record), what the
    pipeline's own ``encode_prompt`` gives for the record's instruction and source image(s).
    The target image is not embedded: its path goes into the index line (``target_images``)."""
    if args.doc_instruction is not None or args.query_instruction != QUERY_INSTRUCTION:
        raise SystemExit("--query-instruction/--doc-instruction: a diffusers folder uses its pipeline's own template")
    dtype = torch.bfloat16 if args.bf16 else torch.float32  # as from_pretrained(torch_dtype=...) loads it
    pipe = load_prompt_pipeline(args.model, t2i=args.t2i_mode, dtype=dtype, device=device)
    max_side = args.image_sample_size or None

    def encode(recs) -> dict[str, list[torch.Tensor]]:
        for r in recs:
            try:
                check_source_count(pipe, len(r.query.images))
            except ValueError as e:
                raise SystemExit(f"{r.source}: {e}") from None
            if not r.positive.images:
                raise SystemExit(f"{r.source}: a {r.format} record has no target image to generate")
        images = [load_images(r.query.images, max_side=max_side, source=r.source) for r in recs]
        embeds = prompt_embeds(pipe, [r.query.text or "" for r in recs], images, device)
        return {"prompt_embeds": [e.float().to(DTYPES[args.dtype]).cpu() for e in embeds]}

    meta = {
        "pipeline": type(pipe).__name__,
        "prompt_template_encode_start_idx": pipe.prompt_template_encode_start_idx,
        "text_encoder_dtype": str(dtype).removeprefix("torch."),
    }
    return "qwen_image", encode, meta


def load_pair_encoder(args: argparse.Namespace, device: torch.device, kind: str | None):
    """(kind, embed(inputs) -> list of per-record tensors, collator) for a VLM or a dual encoder; ``kind``:
    the folder's (`model_folders.check_model_arg`), None for a hub id not in the cache."""
    from transformers import AutoConfig, AutoModel

    if kind is None:  # a hub id: its config says (an image_token_id: images as placeholder tokens, a VLM)
        with hub_errors("--model", args.model):
            kind = "vlm" if getattr(AutoConfig.from_pretrained(args.model), "image_token_id", None) else "clip"
    if kind == "vlm":
        processor = load_vlm_processor(args.model)
        with hub_errors("--model", args.model):
            model = AutoModel.from_pretrained(args.model).to(device).eval()
        collator = VLMCollator(
            processor,
            query_instruction=args.query_instruction,
            doc_instruction=args.doc_instruction,
            max_image_side=args.image_sample_size,
        )

        def embed(inputs):
            if not args.per_token:
                return list(vlm_embed(model, inputs))
            tokens, mask = vlm_token_embeddings(model, inputs)
            return [t[m] for t, m in zip(tokens, mask)]  # drop padding: stored ragged

        return "vlm", embed, collator
    if args.per_token:
        raise SystemExit("--per-token needs a VLM; a dual encoder gives one projected vector per side")
    model, processor = load_dual_encoder(args.model)
    model = model.to(device).eval()
    collator = DualEncoderCollator(
        processor,
        **text_padding(model),  # SigLIP: max_length=64 padding
        max_image_side=args.image_sample_size,
    )
    return "dual_encoder", lambda inputs: list(dual_encoder_features(model, inputs)), collator


@torch.no_grad()
def embed_side(items, sources, is_query, embed, collator, args, device) -> list[torch.Tensor]:
    """Embed one side of a batch. Items are grouped by shape (text or not, number of images)
    so a dual encoder's towers, and a batch of edit rows with 0/1/2 source images, mix freely."""
    groups: dict[tuple[bool, int], list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault((it.text is not None, len(it.images)), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(items)
    for idx in groups.values():
        inputs = collator.encode([items[i] for i in idx], is_query, [sources[i] for i in idx])
        inputs = {k: v.to(device) for k, v in inputs.items()}
        with torch.autocast(device.type, torch.bfloat16, enabled=args.bf16):
            vectors = embed(inputs)
        for i, v in zip(idx, vectors):
            out[i] = v.float().to(DTYPES[args.dtype]).cpu()
    return out  # type: ignore[return-value]


# ----------------------------------------------------------------------------- main


def my_shards(args: argparse.Namespace, rank: int, world: int, with_paths: bool = False):
    """Yield (shard number, [(index row, record), ...]) for this rank: records r::W, in shards.
    ``with_paths``: index rows also carry the prompt and the image paths (what edit training reads)."""
    bad = [f for f in args.field if "=" not in f]
    if bad:
        raise SystemExit(f"--field takes NAME=COLUMN (e.g. source_image=src), got {bad}")
    columns = dict(f.split("=", 1) for f in args.field)
    options = dict(columns=columns, t2i_mode=args.t2i_mode, inverse=not args.disable_inverse, language=args.language)
    if args.format:
        options["format"] = args.format
    shard, prev_line, sub = [], None, 0
    for n, rec in enumerate(read_records(args.data, skip_bad=args.skip_bad, **options)):
        line = int(rec.source.rsplit(":", 1)[1])
        sub = sub + 1 if line == prev_line else 0  # the inverse record of an edit row is "<line>.1"
        prev_line = line
        if n % world != rank:
            continue
        row = {
            "id": f"{line}.{sub}",
            "n": n,
            "source": rec.source,
            "format": rec.format,
            "num_source_images": rec.extra.get("num_source_images", -1),
            "inverse": rec.extra.get("inverse", False),
        }
        if rec.label is not None:
            row["label"] = rec.label
        if with_paths:
            row.update(
                prompt=rec.query.text or "",
                source_images=list(rec.query.images),
                target_images=list(rec.positive.images),
            )
        shard.append((row, rec))
        if len(shard) == args.shard_size:
            yield (n // world) // args.shard_size, shard
            shard = []
    if shard:
        yield (shard[-1][0]["n"] // world) // args.shard_size, shard


def prepare(args: argparse.Namespace, rank: int, world: int, kind: str, extra_meta: dict) -> EmbedWriter:
    """Check/write meta.json (rank 0; a rerun must use the same settings), then open this rank's writer."""
    meta = {
        "data": os.path.abspath(args.data),
        "model": args.model,
        "kind": kind,
        "per_token": args.per_token,
        "dtype": args.dtype,
        "world_size": world,
        "shard_size": args.shard_size,
        "t2i_mode": args.t2i_mode,
        "inverse": not args.disable_inverse,
        "language": args.language,
        "fields": sorted(args.field),
        "format": args.format,
        "image_sample_size": args.image_sample_size,
        "query_instruction": args.query_instruction,
        "doc_instruction": args.doc_instruction,
        **extra_meta,
    }
    if rank == 0:
        ensure_meta(args.output, meta)
    if world > 1:
        torch.distributed.barrier()
    return EmbedWriter(args.output, rank)


def main(argv: list[str] | None = None) -> dict:
    """Extract; returns ``{"shards_written": n}`` (+ ``"records"`` and ``"summary"`` on rank 0). A caller that
    set up the process group itself (the multitask and edit_sft demos) keeps it: it is only shut down if made here."""
    args = parse_args(argv)
    own_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    rank, world, device = init_distributed()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(asctime)s %(message)s")
    torch.manual_seed(args.seed)
    prepare_demo(args, rank, world)
    kind, encode, extra_meta = load_encoder(args, device)
    writer = prepare(args, rank, world, kind, extra_meta)
    if writer.done:
        log.info("resuming: rank 0 already has %d shard(s) (%d records)", len(writer.done), writer.records_done)
    written = extract_loop(args, writer, encode, rank, world, kind == "qwen_image")
    return finish(args, written, rank, world, own_group)


def extract_loop(args, writer, encode, rank, world, with_paths: bool) -> int:
    """The explicit loop: for each of this rank's unfinished shards, embed its records and write it."""
    t0, written, records = time.perf_counter(), 0, 0
    for k, shard in my_shards(args, rank, world, with_paths):
        if writer.is_done(k):
            continue
        if args.stop_after_shards is not None and written >= args.stop_after_shards:
            log.info("stopping after %d new shard(s); rerun the same command to continue", written)
            break
        rows, embeddings = [r for r, _ in shard], {}
        for i in range(0, len(shard), args.batch_size):
            for side, values in encode([rec for _, rec in shard[i : i + args.batch_size]]).items():
                embeddings.setdefault(side, []).extend(values)
        writer.write(k, rows, embeddings)
        written, records = written + 1, records + len(rows)
        if written % args.log_every == 0:
            log.info(
                "shard %d written: %d records this run, %.1f records/s (rank 0)",
                k,
                records,
                records / (time.perf_counter() - t0),
            )
    return written


def finish(args: argparse.Namespace, written: int, rank: int, world: int, own_group: bool = True) -> dict:
    """Wait for every rank, then check the whole store opens (rank 0) and print its summary."""
    if world > 1:
        torch.distributed.barrier()  # every rank's shards are on disk before rank 0 opens the store
    if own_group:
        shutdown_distributed()
    result = {"shards_written": written}
    if rank == 0:
        store = EmbedStore(args.output)  # every check of a reader, once, while the run is fresh
        result.update(records=len(store), summary=store_summary(store))
        print(result["summary"], flush=True)
    return result


def store_summary(store: EmbedStore) -> str:
    """What a store holds: rows, each side's shape and dtype (of row 0; ``L`` = per-token, ragged), the rows
    per number of source images (edit rows; ``-1``: a format without source images) and the inverse rows."""
    shards = sum(name.startswith("shard-") for name in os.listdir(store.root))
    lines = [f"{store.root}: {len(store)} rows in {shards} shard(s)"]
    if not len(store):
        return lines[0]
    first, per_token = store[0], bool(store.meta.get("per_token"))
    for side, value in first.items():
        shape = ["L", *value.shape[1:]] if per_token or value.dim() > 1 else list(value.shape)
        lines.append(f"  side {side}: [{', '.join(map(str, shape))}] {str(value.dtype).removeprefix('torch.')}")
    groups, counts = np.unique(store.groups, return_counts=True)
    lines.append("  rows by source images: " + ", ".join(f"{g}: {c}" for g, c in zip(groups.tolist(), counts.tolist())))
    inverse = sum(record_id.endswith(".1") for record_id in store.ids)  # "<line>.1": a row's second record
    lines.append(f"  inverse rows (target -> source): {inverse}")
    return "\n".join(lines)


if __name__ == "__main__":
    with report_user_errors():  # a mistake in flags, files or rows: one line (--debug: the traceback)
        main()
