"""The flags every training recipe shares, defined once: same names, help and meaning everywhere.

``add_common_args(parser, lr=..., batch_size=..., ...)`` adds them; a recipe passes only the
defaults that suit its models (a CLIP fine-tune wants another learning rate than a head
trained from scratch) and adds its own flags after. ``check_common_args(args)`` rejects bad
values with one clear message before anything is loaded. Conventions: 0 means off
(``--chunk-size``, ``--max-grad-norm``, ``--eval-every``, ``--save-every``, ``--lora``).
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn

from .run_log import TRACKERS
from .schedule import SCHEDULES

__all__ = [
    "HelpFormatter",
    "common_parser",
    "add_common_args",
    "check_common_args",
    "autocast",
    "apply_model_flags",
    "forward_batch",
    "make_loader",
    "training_batches",
    "apply_loss_flags",
]


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` keeps the recipe's docstring as written and shows every flag's default."""


class _Refused(argparse.Action):
    """A flag a recipe cannot honour: giving it is an error that says why (its help)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=False, help=kwargs.get("help"))

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parser.error(f"{option_string}: {self.help}")


class _CheckedParser(argparse.ArgumentParser):
    """``parse_args`` also runs `check_common_args`: a bad shared value fails before anything is loaded."""

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed = super().parse_args(args, namespace)
        check_common_args(parsed)
        return parsed


def common_parser(description: str | None, **defaults) -> argparse.ArgumentParser:
    """A recipe's parser: its docstring as the description (`HelpFormatter`) and the shared flags, ``defaults`` as
    in `add_common_args`; its ``parse_args`` checks them (`check_common_args`). The recipe adds its own flags."""
    return add_common_args(_CheckedParser(description=description, formatter_class=HelpFormatter), **defaults)


def add_common_args(
    p: argparse.ArgumentParser,
    *,
    output: str,
    lr: float,
    batch_size: int,
    weight_decay: float = 0.01,
    eval_batch_size: int = 128,
    lora_alpha: float = 16.0,
    data_help: str = "training file (JSONL/CSV/Parquet)",
    require_data: bool = True,
    fsdp: bool = False,
) -> argparse.ArgumentParser:
    """Add the shared data, optimisation, loop, checkpoint and logging flags to ``p``.

    ``require_data=False`` for a recipe whose bare run is a demo (no ``--data``). ``fsdp=True`` for a
    recipe that shards with FSDP2: ``--fp16`` is then refused with the reason (each rank would see the
    inf/NaN of its own gradient shard only, and the ranks' GradScalers would skip different steps)."""
    a = p.add_argument
    a("--data", required=require_data, help=data_help)
    a("--val-data", help="validation file: retrieval metrics before/after (and every --eval-every steps)")
    a("--output", default=output, help="run folder: args.json, logs, checkpoints/, final/")
    a("--seed", type=int, default=0, help="seeds the model init, the sampler and the data order")
    a("--batch-size", type=int, default=batch_size, help="rows per rank per micro-batch")
    a("--grad-accum-steps", type=int, default=1, help="micro-batches per optimizer step (one gradient sync)")
    a("--chunk-size", type=int, default=0, help="GradCache rows per chunk (0 = off)")
    a("--epochs", type=float, default=1.0, help="passes over --data (ignored with --max-steps)")
    a("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    a("--lr", type=float, default=lr, help="peak learning rate (AdamW)")
    a("--weight-decay", type=float, default=weight_decay, help="AdamW weight decay")
    a("--lr-schedule", choices=SCHEDULES, default="cosine", help="decay after the warmup")
    a("--warmup-steps", type=int, default=0, help="linear warmup steps")
    a("--warmup-ratio", type=float, default=0.0, help="warmup as a fraction of the steps (instead of --warmup-steps)")
    a("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm (0 = off)")
    a("--bf16", action="store_true", help="bf16 autocast (FSDP2 recipes: bf16 parameters, fp32 reduce)")
    if fsdp:
        a("--fp16", action=_Refused, help="not supported: fp16 loss scaling over FSDP2-sharded gradients; use --bf16")
    else:
        a("--fp16", action="store_true", help="fp16 autocast with loss scaling (GradScaler)")
    a("--grad-checkpointing", action="store_true", help="activation checkpointing of every block")
    a("--compile", action="store_true", help="torch.compile every block in place")
    a("--lora", type=int, default=0, help="LoRA rank (0 = full fine-tuning)")
    a("--lora-alpha", type=float, default=lora_alpha, help="LoRA alpha")
    a("--mrl-dims", help="Matryoshka dims, e.g. '512,256,128'")
    a("--num-workers", type=int, default=2, help="DataLoader workers (decode + processor)")
    a("--log-every", type=int, default=10, help="console log line every N steps (train_log.jsonl gets every step)")
    a("--eval-every", type=int, default=0, help="retrieval metrics on --val-data every N steps (0 = off)")
    relevance = "validation relevance: each record's positive, or every item of the query's label (itself excluded)"
    a("--relevance", choices=["positives", "labels"], default="positives", help=relevance)
    a("--eval-batch-size", type=int, default=eval_batch_size, help="rows per forward when embedding for evaluation")
    a("--save-every", type=int, default=0, help="checkpoint every N steps (0 = at the end only)")
    a("--resume", action="store_true", help="continue from <output>/checkpoints")
    a("--stop-at", type=int, help="save and exit at this step (split a run across jobs; then --resume)")
    a("--report-to", nargs="*", choices=[*TRACKERS, "none"], default=[], help="also log to these trackers")
    return p


def check_common_args(args: argparse.Namespace) -> None:
    """``SystemExit`` naming the first shared flag with a value that cannot work (or a file that is not there)."""
    from .data import is_stream_spec

    for path in (args.data, args.val_data):  # shard patterns are checked shard by shard when the stream opens
        if path and not os.path.exists(path) and not is_stream_spec(path):
            raise SystemExit(f"no such file: {path}")
    positive = ("batch_size", "grad_accum_steps", "eval_batch_size", "log_every")
    non_negative = ("chunk_size", "lora", "num_workers", "eval_every", "save_every", "warmup_steps", "max_grad_norm")
    for name in positive:
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in non_negative:
        if getattr(args, name) < 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 0 (0 = off), got {getattr(args, name)}")
    if args.bf16 and args.fp16:
        raise SystemExit("give --bf16 or --fp16, not both")
    if not 0 <= args.warmup_ratio <= 1 or (args.warmup_ratio and args.warmup_steps):
        raise SystemExit("give --warmup-steps or --warmup-ratio (in [0, 1]), not both")
    if args.max_steps is not None and args.max_steps < 1:
        raise SystemExit(f"--max-steps must be >= 1, got {args.max_steps}")
    if args.lr <= 0 or args.epochs <= 0:
        raise SystemExit(f"--lr and --epochs must be > 0, got {args.lr} and {args.epochs}")


def autocast(args: argparse.Namespace, device: torch.device) -> torch.autocast:
    """The autocast context the flags ask for: bf16 (``--bf16``), fp16 (``--fp16``) or off."""
    dtype = torch.float16 if args.fp16 else torch.bfloat16
    return torch.autocast(device.type, dtype, enabled=args.bf16 or args.fp16)


def apply_model_flags(model: nn.Module, args: argparse.Namespace, **compile_kwargs) -> nn.Module:
    """``model`` as the shared flags ask, in train mode: activation checkpointing (``--grad-checkpointing``), then
    LoRA (``--lora``, ``--lora-alpha``), then ``torch.compile`` per block (``--compile``; ``compile_kwargs`` go to
    `compile_layers`). That order because LoRA wraps the layers checkpointing must still see as blocks, and compiling
    last captures both. Returns the model to train (LoRA returns a new wrapper)."""
    from .parallel import apply_lora, checkpoint_layers, compile_layers

    if args.grad_checkpointing:
        checkpoint_layers(model)
    if args.lora:
        model = apply_lora(model, r=args.lora, alpha=args.lora_alpha)
    if args.compile:
        compile_layers(model, **compile_kwargs)
    return model.train()


def apply_loss_flags(criterion: nn.Module, args: argparse.Namespace) -> nn.Module:
    """``criterion`` wrapped in `Matryoshka` over ``--mrl-dims`` (e.g. ``"512,256,128"``) when given, else as is."""
    if not args.mrl_dims:
        return criterion
    from .losses import Matryoshka

    try:
        dims = [int(d) for d in args.mrl_dims.split(",")]
    except ValueError:
        raise SystemExit(f"--mrl-dims must be comma-separated integers, got {args.mrl_dims!r}") from None
    return Matryoshka(criterion, dims)


def forward_batch(
    args: argparse.Namespace, fn: Callable[..., torch.Tensor], inputs: Mapping[str, torch.Tensor], gc: Any, device
) -> torch.Tensor:
    """``fn(**inputs)`` with ``inputs`` moved to ``device``, under the flags' autocast, through GradCache ``gc`` when
    given (``--chunk-size``; ``None``: one plain forward); the output in float32 (``[B, ...]`` as ``fn`` returns)."""
    inputs = {k: v.to(device) for k, v in inputs.items()}
    with autocast(args, device):
        out = fn(**inputs) if gc is None else gc.encode(fn, **inputs)
    return out.float()


def make_loader(
    args: argparse.Namespace,
    tasks: Mapping[str, Sequence[Any]],
    collate: Callable[[list], Any],
    rank: int,
    world: int,
    **sampler_options: Any,
) -> tuple[Any, int]:
    """``(TaskLoader, rows per epoch)`` over ``tasks`` with the shared flags: ``--batch-size`` rows per rank,
    ``--seed``, ``--num-workers``, ``--grad-accum-steps``. ``sampler_options`` go to `WeightedTaskSampler`
    (``weights``, ``group_of``, ``group_weights``); rows per epoch counts the tasks it can draw."""
    from .data import TaskLoader, WeightedTaskSampler

    sizes = {name: len(rows) for name, rows in tasks.items()}
    sampler = WeightedTaskSampler(
        sizes, args.batch_size, seed=args.seed, rank=rank, world_size=world, **sampler_options
    )
    loader = TaskLoader(tasks, sampler, collate, args.num_workers, args.seed, args.grad_accum_steps)
    return loader, sum(sizes[name] for name in sampler.tasks)


def training_batches(
    args: argparse.Namespace, path: str, collate: Callable[[list], Any], rank: int, world: int
) -> tuple[Any, int]:
    """``(loader, rows per epoch)`` for ``--data``: sharded sets stream, a file is one task.

    Shards (a brace pattern such as ``data/{00000..00099}.tar``, a glob, a folder of shards, see
    `data.is_stream_spec`) become a `StreamLoader` (nothing read before step 1; its length is
    unknown, so ``--max-steps`` is required and rows is 0); anything else is read with
    ``load_records(path, format=args.format)`` into `make_loader`. Both give the same
    ``steps`` / ``state_dict`` interface, so the loop and checkpoints do not change.
    """
    from .data import is_stream_spec, load_records, open_stream

    if not is_stream_spec(path):
        return make_loader(
            args, {"train": load_records(path, format=getattr(args, "format", None))}, collate, rank, world
        )
    if not args.max_steps:
        raise SystemExit(f"--data {path} names shards, whose length is not known up front: give --max-steps")
    options = dict(seed=args.seed, rank=rank, world_size=world, num_workers=args.num_workers)
    loader = open_stream(path, args.batch_size, collate, grad_accum_steps=args.grad_accum_steps, **options)
    return loader, 0
