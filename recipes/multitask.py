r"""Train a composed-retrieval head on precomputed embeddings, mixing tasks by weight (seed 004, step 2).

Each subdirectory of --data-dir is one task written by `recipes/extract_embeds.py` (query =
source image(s) + instruction, document = target image). A small MLP per side maps the
frozen embeddings into a shared retrieval space; it is trained with InfoNCE whose negatives
are gathered from every rank. Every global batch comes from one task (and one number of
source images): `WeightedTaskSampler` draws the task of step t from (seed, t) alone.

    python recipes/multitask.py --data-dir meta/ --train-data-weights "dataset_a=0.5,dataset_b=1.2" \
        --train-src-img-num-weights "0=1,1=1,2=1,3=0" --batch-size 256 --max-steps 2000 --output runs/head
    torchrun --nproc_per_node=8 recipes/multitask.py --data-dir meta/ ... (same flags)

Tasks missing from --train-data-weights are excluded. Writes <output>/train_log.jsonl (rank 0:
step, loss, lr, task, group, the task every rank drew), eval_log.jsonl (--eval-every), checkpoints under
<output>/checkpoints
(--resume), <output>/metrics.json and the head to <output>/final (config.json +
model.safetensors; load it with FusionHead.from_pretrained, see docs/recipes/multitask.md).
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from vembed_blocks import InfoNCE, get_rank, get_world_size, init_distributed, retrieval_metrics
from vembed_blocks.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from vembed_blocks.data import TaskBatches, WeightedTaskSampler, parse_group_weights, parse_weights
from vembed_blocks.data.embed_store import EmbedStore, collate_embeddings
from vembed_blocks.distributed import mean_over_ranks, shutdown_distributed
from vembed_blocks.grad_sync import accumulate_gradients, clip_gradients

log = logging.getLogger("multitask")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data-dir", required=True, help="directory whose subdirectories are tasks (extract_embeds outputs)"
    )
    p.add_argument("--train-data-weights", help='task weights, e.g. "dataset_a=0.5,dataset_b=1.2" (default: by size)')
    p.add_argument("--train-src-img-num-weights", help='weights per number of source images, e.g. "0=1,1=1,2=1,3=0"')
    p.add_argument("--hidden", type=int, default=1024, help="hidden width of each side's MLP")
    p.add_argument("--dim", type=int, default=512, help="output embedding width")
    p.add_argument("--temperature", type=float, default=0.05)
    p.add_argument("--symmetric", action="store_true", help="InfoNCE: also doc->query")
    p.add_argument("--batch-size", type=int, default=256, help="rows per rank per step")
    p.add_argument("--max-steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.03)
    p.add_argument("--warmup-steps", type=int, default=0, help="linear warmup, then constant (the seed's schedule)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm (0 = off)")
    p.add_argument("--compile", action="store_true", help="torch.compile the head")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers (shard reads)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument(
        "--eval-every", type=int, default=0, help="per-task retrieval into eval_log.jsonl every N steps (0 = end only)"
    )
    p.add_argument("--eval-rows", type=int, default=512, help="rows per task for the retrieval check")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0 = at the end only)")
    p.add_argument("--resume", action="store_true", help="continue from <output>/checkpoints")
    p.add_argument("--stop-at", type=int, help="save and exit at this step (split a run across jobs; then --resume)")
    p.add_argument("--output", default="runs/multitask")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- the head


class FusionHead(nn.Module):
    """Two MLPs into one space: ``query[B, Dq] -> [B, dim]`` and ``doc[B, Dd] -> [B, dim]``.

    The query embedding already fuses the source image(s) and the instruction (the VLM saw
    them in one chat); the head learns where edited targets lie relative to it.
    """

    def __init__(self, query_dim: int, doc_dim: int, hidden: int, dim: int) -> None:
        super().__init__()
        self.config = {"query_dim": query_dim, "doc_dim": doc_dim, "hidden": hidden, "dim": dim}
        self.query = nn.Sequential(nn.Linear(query_dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.doc = nn.Sequential(nn.Linear(doc_dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, query: torch.Tensor, doc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.query(query), self.doc(doc)

    def save_pretrained(self, out: str) -> None:
        os.makedirs(out, exist_ok=True)
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
            os.path.join(out, "model.safetensors"),
        )
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump({"architecture": "FusionHead", **self.config}, f, indent=1)

    @classmethod
    def from_pretrained(cls, path: str) -> "FusionHead":
        with open(os.path.join(path, "config.json")) as f:
            config = {k: v for k, v in json.load(f).items() if k != "architecture"}
        head = cls(**config)
        head.load_state_dict(load_file(os.path.join(path, "model.safetensors")))
        return head


def pooled(batch: dict, side: str) -> torch.Tensor:
    """``[B, D]`` of one side; per-token stores (``[B, L, D]`` + mask) are mean-pooled over real tokens."""
    x = batch[side].float()
    if side + "_mask" not in batch:
        return x
    mask = batch[side + "_mask"].unsqueeze(-1).float()
    return (x * mask).sum(1) / mask.sum(1).clamp(min=1)


# ----------------------------------------------------------------------------- data and eval


def load_tasks(root: str) -> dict[str, EmbedStore]:
    """Every subdirectory of ``root`` with an index is one task's store."""
    dirs = [os.path.join(root, name) for name in sorted(os.listdir(root)) if os.path.isdir(os.path.join(root, name))]
    tasks = {os.path.basename(d): EmbedStore(d) for d in dirs if any(f.startswith("index-") for f in os.listdir(d))}
    if not tasks:
        raise SystemExit(f"{root} has no task subdirectories written by extract_embeds.py")
    dims = {name: (s[0]["query"].shape[-1], s[0]["positive"].shape[-1]) for name, s in tasks.items()}
    if len(set(dims.values())) > 1:
        raise SystemExit(f"tasks have different embedding widths (query, doc): {dims}; extract them with one model")
    return tasks


def make_sampler(args: argparse.Namespace, tasks: dict[str, EmbedStore], rank: int, world: int) -> WeightedTaskSampler:
    """Task draw by --train-data-weights, then (edit-format tasks) a draw of the number of source images."""
    weights = parse_weights(args.train_data_weights, "train data weights") if args.train_data_weights else None
    group_of, group_weights = {}, None
    if args.train_src_img_num_weights:
        group_weights = parse_group_weights(args.train_src_img_num_weights)
        group_of = {name: s.groups.tolist() for name, s in tasks.items() if len(s.groups) and s.groups.min() >= 0}
        if not group_of:
            raise SystemExit("--train-src-img-num-weights: no task records a number of source images (edit format)")
    return WeightedTaskSampler(
        {k: len(v) for k, v in tasks.items()},
        args.batch_size,
        weights,
        seed=args.seed,
        rank=rank,
        world_size=world,
        group_of=group_of,
        group_weights=group_weights,
    )


@torch.no_grad()
def evaluate(head: FusionHead, tasks: dict[str, EmbedStore], rows: int) -> dict[str, dict[str, float]]:
    """Per task: each of the first ``rows`` queries retrieves its own target among those rows' targets."""
    was_training, out = head.training, {}
    head.eval()
    for name, store in tasks.items():
        batch = collate_embeddings([store[i] for i in range(min(rows, len(store)))])
        device = next(head.parameters()).device
        q, d = head(pooled(batch, "query").to(device), pooled(batch, "positive").to(device))
        scores = F.normalize(q, dim=-1) @ F.normalize(d, dim=-1).T
        out[name] = retrieval_metrics(scores, [{i} for i in range(len(q))], ks=(1, 5))
    head.train(was_training)
    return out


# ----------------------------------------------------------------------------- main


def prepare(args: argparse.Namespace, rank: int, world: int) -> tuple[dict[str, EmbedStore], WeightedTaskSampler]:
    """Open every task's store and build the weighted sampler over them."""
    tasks = load_tasks(args.data_dir)
    log.info("tasks: %s", ", ".join(f"{n} ({len(s)} rows)" for n, s in tasks.items()))
    return tasks, make_sampler(args, tasks, rank, world)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    rank, world, device = init_distributed()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(asctime)s %(message)s")
    torch.manual_seed(args.seed)
    os.makedirs(args.output, exist_ok=True)
    tasks, sampler = prepare(args, rank, world)

    first = next(iter(tasks.values()))[0]
    head = FusionHead(first["query"].shape[-1], first["positive"].shape[-1], args.hidden, args.dim).to(device)
    criterion = InfoNCE(temperature=args.temperature, symmetric=args.symmetric, gather=True)
    optimizer = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, args.warmup_steps)))
    ckpt_dir = os.path.join(args.output, "checkpoints")
    start = 0
    if args.resume and latest_checkpoint(ckpt_dir) is not None:
        start = load_checkpoint(ckpt_dir, model=head, optimizer=optimizer, sampler=sampler, scheduler=scheduler)
        log.info("resumed from %s at step %d", latest_checkpoint(ckpt_dir), start)

    end = min(args.max_steps, args.stop_at or args.max_steps)
    batches = TaskBatches(tasks, sampler, collate_embeddings, steps=end - start)
    loader = DataLoader(
        batches, batch_size=None, num_workers=args.num_workers, generator=torch.Generator().manual_seed(args.seed)
    )  # own RNG: exact resume
    log.info(
        "training steps %d -> %d of %d, %d rows/step over %d rank(s)",
        start,
        end,
        args.max_steps,
        args.batch_size * world,
        world,
    )
    losses = train_loop(args, loader, head, criterion, optimizer, scheduler, sampler, tasks, start, end, device)

    result = {"losses": losses}
    if end < args.max_steps:
        log.info("stopped at step %d of %d; continue with --resume", end, args.max_steps)
    else:
        result.update(finish(args, head, tasks))
    shutdown_distributed()
    return result


def train_loop(args, loader, head, criterion, optimizer, scheduler, sampler, tasks, start, end, device) -> list[float]:
    """The explicit loop: head on both sides, gathered InfoNCE, step, log the mix, save."""
    rank, world = get_rank(), get_world_size()
    names = sorted(tasks)
    fwd = torch.compile(head) if args.compile else head
    # The mix so far is a pure function of the steps already taken: recount it instead of storing it.
    counts = collections.Counter(sampler.draw(t)[0] for t in range(start))
    t0, seen, losses = time.perf_counter(), 0, []
    train_log = open(os.path.join(args.output, "train_log.jsonl"), "a") if rank == 0 else None
    for item in loader:
        step, task, batch = item["step"] + 1, item["task"], item["batch"]
        rank_tasks = [task]
        if world > 1:  # a batch mixing tasks across ranks would silently weaken the negatives: check it
            got = [torch.zeros(1, dtype=torch.long) for _ in range(world)]
            dist.all_gather(got, torch.tensor([names.index(task)]))
            rank_tasks = [names[int(g)] for g in got]
            if len(set(rank_tasks)) > 1:
                raise RuntimeError(f"step {step}: ranks drew different tasks {rank_tasks}")
        for batch in accumulate_gradients(head, [batch]):  # no DDP wrapper: the head's gradients averaged once
            q, d = fwd(pooled(batch, "query").to(device), pooled(batch, "positive").to(device))
            loss = criterion(q, d)
            loss.backward()
        clip_gradients(head.parameters(), args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(mean_over_ranks(loss))  # the global batch's loss, not rank 0's
        counts[task] += 1
        seen += q.shape[0] * world
        key = sampler.draw(item["step"])[1]  # "task" or "task/<number of source images>"
        if train_log:
            row = {
                "step": step,
                "loss": losses[-1],
                "lr": scheduler.get_last_lr()[0],
                "task": task,
                "group": key.split("/", 1)[1] if "/" in key else None,
                "rank_tasks": rank_tasks,
            }
            train_log.write(json.dumps(row) + "\n")
            train_log.flush()
        if step % args.log_every == 0 or step == end:
            mix = " ".join(f"{n}={counts[n]}" for n in names)
            log.info(
                "step %d/%d  loss %.4f  lr %.2e  %.1f samples/s  steps per task: %s",
                step,
                args.max_steps,
                losses[-1],
                scheduler.get_last_lr()[0],
                seen / (time.perf_counter() - t0),
                mix,
            )
        if args.eval_every and step % args.eval_every == 0 and rank == 0:
            with open(os.path.join(args.output, "eval_log.jsonl"), "a") as f:
                f.write(json.dumps({"step": step, **evaluate(head, tasks, args.eval_rows)}) + "\n")
        if (args.save_every and step % args.save_every == 0) or step == end:
            sampler.load_state_dict(item["sampler_state"])  # the state after the batch just trained on
            save_checkpoint(
                os.path.join(args.output, "checkpoints"),
                model=head,
                optimizer=optimizer,
                step=step,
                sampler=sampler,
                scheduler=scheduler,
            )
    if train_log:
        train_log.close()
    return losses


def finish(args: argparse.Namespace, head: FusionHead, tasks: dict[str, EmbedStore]) -> dict:
    """Rank 0: per-task retrieval check, metrics.json, and the head exported to <output>/final."""
    if get_rank() != 0:
        return {}
    metrics = evaluate(head, tasks, args.eval_rows)
    with open(os.path.join(args.output, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    for name, m in metrics.items():
        log.info("%-20s recall@1 %.4f  recall@5 %.4f", name, m["recall@1"], m["recall@5"])
    final = os.path.join(args.output, "final")
    head.save_pretrained(final)
    log.info("exported the head to %s (FusionHead.from_pretrained)", final)
    return {"metrics": metrics}


if __name__ == "__main__":
    main()
