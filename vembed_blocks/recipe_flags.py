"""Recipe support, not a block: the flags every training recipe shares, defined once (same names, help and
meaning everywhere). Blocks never import it; what the recipes do with the flags is written in each recipe.

``add_common_args(parser, lr=..., batch_size=..., ...)`` adds them; a recipe passes only the
defaults that suit its models (a CLIP fine-tune wants another learning rate than a head
trained from scratch) and adds its own flags after. ``check_common_args(args)`` rejects bad
values with one clear message before anything is loaded. Conventions: 0 means off
(``--chunk-size``, ``--max-grad-norm``, ``--eval-every``, ``--save-every``, ``--lora``).
"""

from __future__ import annotations

import argparse
import os

from .run_log import TRACKERS
from .schedule import SCHEDULES

__all__ = [
    "HelpFormatter",
    "common_parser",
    "add_common_args",
    "add_padding_args",
    "add_false_negative_args",
    "check_common_args",
    "false_negative_counts",
    "add_masked",
    "masked_counts",
    "false_negative_rules",
    "mrl_dims",
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
    records: bool = True,
) -> argparse.ArgumentParser:
    """Add the shared data, optimisation, loop, checkpoint and logging flags to ``p``.

    ``require_data=False`` for a recipe whose bare run is a demo (no ``--data``). ``fsdp=True`` for a
    recipe that shards with FSDP2: ``--fp16`` is then refused with the reason (each rank would see the
    inf/NaN of its own gradient shard only, and the ranks' GradScalers would skip different steps).
    ``records=False`` for a recipe whose --data is not a records file (stored embeddings): no
    ``--columns`` / ``--csv-delimiter`` / ``--allow-mixed-data``, which would mean nothing there."""
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
    bf16_help = "bf16 autocast (FSDP2 recipes: bf16 parameters, fp32 reduce); --no-bf16: off"
    a("--bf16", action=argparse.BooleanOptionalAction, default=False, help=bf16_help)
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
    a("--resume", action="store_true", help="continue from <output>/checkpoints (refused if the data or steps differ)")
    a("--overwrite", action="store_true", help="start afresh in an --output that holds another run (removes it)")
    a("--max-bad-steps", type=int, default=25, help="stop after this many non-finite steps in a row (each skipped)")
    a("--skip-bad", action="store_true", help="skip malformed rows and undecodable images (counted), not stop")
    a("--max-bad-fraction", type=float, default=0.01, help="stop when more of the rows than this are bad")
    a("--skip-bad-shards", action="store_true", help="streams: skip a shard that cannot be read (counted), not stop")
    if records:  # the records readers' options (a store of embeddings has no columns)
        a("--columns", help="the file's column names for the fields, e.g. 'query=Query,positive=Positive'")
        a("--csv-delimiter", help="CSV field separator (default: ',', or sniffed from the header, e.g. Excel's ';')")
        mixed = "a folder as --data: allow files of several row formats or named like a validation split"
        a("--allow-mixed-data", action="store_true", help=mixed)
    check = "train even when the first batches look wrong (mostly unknown tokens, empty texts, one-colour images)"
    a("--ignore-input-check", action="store_true", help=check)
    a("--debug", action="store_true", help="show the full traceback of a user error (also VEMBED_DEBUG=1)")
    a("--stop-at", type=int, help="save and exit at this step (split a run across jobs; then --resume)")
    a("--report-to", nargs="*", choices=[*TRACKERS, "none"], default=[], help="also log to these trackers")
    return p


def add_padding_args(p: argparse.ArgumentParser, token_budget: bool = True) -> argparse.ArgumentParser:
    """The padding flags of the recipes whose text encoders trim exactly (`vembed_blocks.length_chunks`):
    ``--trim-padding`` (on; ``--no-trim-padding``), ``--trim-chunk-size`` and (``token_budget``) ``--token-budget``."""
    a = p.add_argument
    a(
        "--trim-padding",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="encode text in length-sorted chunks cut to their longest row (exact; GradCache chunks too)",
    )
    a("--trim-chunk-size", type=int, default=8, help="rows per trimmed chunk without --chunk-size (graphs kept)")
    if not token_budget:
        return p
    a(
        "--token-budget",
        type=int,
        help="length-bucketed batches: rows of similar length up to this many padded tokens per rank and "
        "micro-batch, instead of --batch-size rows (docs/data.md: fewer in-batch negatives per step)",
    )
    return p


def add_false_negative_args(p: argparse.ArgumentParser, guide_help: str) -> argparse.ArgumentParser:
    """The false-negative flags of the contrastive recipes (`vembed_blocks.false_negatives`): ``--fn-duplicates``,
    the score rule (``--fn-margin`` / ``--fn-ratio``, ``--fn-weight``) and the guide rule (``--fn-guide`` with
    ``--fn-guide-margin`` / ``--fn-guide-ratio``). ``guide_help``: what ``--fn-guide`` loads in this recipe."""
    a = p.add_argument
    dup = "drop candidates whose content (text, image bytes) equals the row's positive"
    a("--fn-duplicates", action=argparse.BooleanOptionalAction, default=False, help=dup)
    a("--fn-margin", type=float, help="drop candidates scoring above (positive - margin), before the temperature")
    a("--fn-ratio", type=float, help="drop candidates scoring above ratio * positive")
    a("--fn-weight", type=float, default=0.0, help="--fn-margin/--fn-ratio hits: 0 = drop, (0, 1) = down-weight")
    a("--fn-guide", metavar="MODEL_DIR", help=f"frozen guide model for --fn-guide-margin/-ratio: {guide_help}")
    a("--fn-guide-margin", type=float, help="drop candidates the guide scores above (its positive - margin)")
    a("--fn-guide-ratio", type=float, help="drop candidates the guide scores above ratio * its positive")
    return p


def false_negative_rules(
    margin: float | None = None,
    ratio: float | None = None,
    weight: float = 0.0,
    guide: str | None = None,
    guide_margin: float | None = None,
    guide_ratio: float | None = None,
):
    """The `FalseNegatives` of the ``--fn-*`` flags' values (None: no score or guide rule; ``--fn-duplicates``
    needs none, only content ids), or ``SystemExit`` naming the flags that do not go together."""
    from .false_negatives import FalseNegatives

    scores, guided = margin is not None or ratio is not None, guide_margin is not None or guide_ratio is not None
    if weight and not scores:
        raise SystemExit("--fn-weight needs --fn-margin or --fn-ratio (it weights what they hit)")
    if not 0 <= weight < 1:
        raise SystemExit(f"--fn-weight must be in [0, 1) (0 = drop), got {weight}")
    for flag, value in (("--fn-ratio", ratio), ("--fn-guide-ratio", guide_ratio)):
        if value is not None and not value > 0:
            raise SystemExit(f"{flag} must be > 0, got {value}")
    if guided and not guide:
        raise SystemExit("--fn-guide-margin / --fn-guide-ratio need --fn-guide (the guide model)")
    if guide and not guided:
        raise SystemExit("--fn-guide needs --fn-guide-margin or --fn-guide-ratio (its threshold)")
    if not scores and not guided:
        return None
    return FalseNegatives(margin, ratio, weight, guide_margin, guide_ratio)


def false_negative_counts(duplicates: bool, rules) -> dict[str, int]:
    """``{rule: 0}`` for each false-negative rule on (``--fn-duplicates``, then the `FalseNegatives` ``rules``):
    the counters of what each rule masked in a step, the same keys on every rank."""
    from .false_negatives import RULES

    on = (duplicates, rules is not None and rules.scores, rules is not None and rules.guided)
    return {rule: 0 for rule, yes in zip(RULES, on) if yes}


def add_masked(counts: dict, criterion, device) -> None:
    """Add the hits of ``criterion``'s last call (its ``masked``; a `Matryoshka`'s inner loss's) to ``counts``
    (`false_negative_counts`), key by key, as tensors on ``device`` (what the all-reduce of `masked_counts`
    needs): a step's micro-batches accumulate."""
    import torch

    hits = getattr(criterion, "loss", criterion).masked
    counts.update({k: n + torch.as_tensor(hits.get(k, 0), device=device) for k, n in counts.items()})


def masked_counts(parts, world: int) -> dict[str, int]:
    """``{masked_<rule>: n}``: what each rule masked in this step (``parts.masked``, which `add_masked` filled; a
    recipe without rules has none: ``{}``), summed over micro-batches and ranks (one all-reduce per rule; every
    rank has the same keys), then zeroed for the next step."""
    from .distributed import mean_over_ranks

    counts = getattr(parts, "masked", {})
    out = {f"masked_{rule}": round(mean_over_ranks(n) * world) for rule, n in counts.items()}
    counts.update(dict.fromkeys(counts, 0))
    return out


def check_common_args(args: argparse.Namespace) -> None:
    """``SystemExit`` naming the first shared flag with a value that cannot work (or a file that is not there)."""
    from .data.shards import is_stream_spec

    for path in (args.data, args.val_data):  # shard patterns are checked shard by shard when the stream opens
        if path and not os.path.exists(path) and not is_stream_spec(path):
            raise SystemExit(f"no such file: {path}")
    positive = ("batch_size", "grad_accum_steps", "eval_batch_size", "log_every", "max_bad_steps")
    non_negative = ("chunk_size", "lora", "num_workers", "eval_every", "save_every", "warmup_steps", "max_grad_norm")
    for name in positive:
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in non_negative:
        if getattr(args, name) < 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 0 (0 = off), got {getattr(args, name)}")
    for name in ("trim_chunk_size", "token_budget"):  # add_padding_args' flags, where a recipe has them
        if getattr(args, name, None) is not None and getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.bf16 and args.fp16:
        raise SystemExit("give --bf16 or --fp16, not both")
    if not 0 <= args.warmup_ratio <= 1 or (args.warmup_ratio and args.warmup_steps):
        raise SystemExit("give --warmup-steps or --warmup-ratio (in [0, 1]), not both")
    if not 0 <= args.max_bad_fraction <= 1:
        raise SystemExit(f"--max-bad-fraction must be in [0, 1], got {args.max_bad_fraction}")
    if args.max_steps is not None and args.max_steps < 1:
        raise SystemExit(f"--max-steps must be >= 1, got {args.max_steps}")
    if args.lr <= 0 or args.epochs <= 0:
        raise SystemExit(f"--lr and --epochs must be > 0, got {args.lr} and {args.epochs}")
    if getattr(args, "temperature", None) is not None and not args.temperature > 0:  # a recipe's own flag
        raise SystemExit(f"--temperature must be > 0 (logits = similarity / temperature), got {args.temperature}")
    mrl_dims(args.mrl_dims)
    if hasattr(args, "fn_guide"):  # add_false_negative_args' flags, where a recipe has them
        a = args
        false_negative_rules(a.fn_margin, a.fn_ratio, a.fn_weight, a.fn_guide, a.fn_guide_margin, a.fn_guide_ratio)
    _parse_data_flags(args)


def _parse_data_flags(args: argparse.Namespace) -> None:
    """``--columns`` as ``{field: column}`` and ``--csv-delimiter`` as its one character, in place."""
    from .data.columns import parse_columns, parse_csv_delimiter
    from .user_errors import UserError

    try:
        if isinstance(getattr(args, "columns", None), str):
            args.columns = parse_columns(args.columns)
        if getattr(args, "csv_delimiter", None) is not None:
            args.csv_delimiter = parse_csv_delimiter(args.csv_delimiter)
    except UserError as e:
        raise SystemExit(str(e)) from None


def mrl_dims(flag: str | None) -> list[int]:
    """``--mrl-dims "512,256,128"`` as ``[512, 256, 128]`` (``[]`` when not given); ``SystemExit`` if malformed."""
    if not flag:
        return []
    try:
        return [int(d) for d in flag.split(",")]
    except ValueError:
        raise SystemExit(f"--mrl-dims must be comma-separated integers, got {flag!r}") from None
