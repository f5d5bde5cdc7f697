"""What a training run writes about itself: its arguments, a line per step, optional trackers.

- `write_args(config, output, resume)`: ``<output>/args.json`` (``config``: a dict, e.g.
  ``vars(args)``); on a resume a changed argument that changes what the checkpoint means (model,
  data, batch size, loss, ...) is named in a warning, since the run then continues something
  other than what was saved.
- `claim_run_folder(output, resume=, overwrite=, inputs=)`: before anything is written, refuse a fresh run
  into a folder that holds another run (checkpoints, ``final/``, a log) unless ``overwrite`` (which then
  removes them), and an input (a model or data path) that the run would overwrite.
- `save_metrics_before` / `read_metrics_before`: the "before" metrics of the first launch, kept
  for the runs that resume it.
- `RunLog(output, report_to=())`: one call per optimizer step writes a JSON line to
  ``<output>/train_log.jsonl`` (always), a console line every ``log_every`` steps, and the
  same scalars to TensorBoard (``report_to=("tensorboard",)``: event files under
  ``<output>/tensorboard``) and/or Weights & Biases (``"wandb"``; offline unless
  ``WANDB_MODE`` says otherwise). Only rank 0 writes; the trackers are optional extras
  (``pip install "vembed-blocks[logging]"``) and a missing one is an ImportError naming it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import warnings
from typing import Any, Iterable, Mapping

__all__ = [
    "claim_run_folder",
    "write_args",
    "RunLog",
    "TRACKERS",
    "save_metrics_before",
    "read_metrics_before",
    "write_metrics",
]

TRACKERS = ("tensorboard", "wandb")
# Arguments that only change how a run reports or splits itself, not what it trains.
_HARMLESS = {
    "resume",
    "stop_at",
    "log_every",
    "eval_every",
    "save_every",
    "num_workers",
    "eval_batch_size",
    "report_to",
    "relevance",
}
log = logging.getLogger(__name__)


# What a run leaves in its folder: a fresh run must not mix with them, an --overwrite removes them.
_RUN_FILES = ("checkpoints", "final", "train_log.jsonl", "eval_log.jsonl", "metrics.json", "metrics_before.json")


def claim_run_folder(
    output: str, *, resume: bool, overwrite: bool = False, inputs: Iterable[Any] = (), rank: int = 0
) -> None:
    """Check that a run may write into ``output``, before it writes anything; with ``overwrite``, clear it.

    Raises ``ValueError`` when one of ``inputs`` (paths the run reads: a model folder, a data file;
    other values are ignored) is ``output`` itself or lies in ``output/final`` or ``output/checkpoints``,
    which the run replaces. Raises ``FileExistsError`` when a fresh run (``resume=False``) finds another
    run's files (``checkpoints/``, ``final/``, logs, metrics) there: its checkpoints would mix with the
    new ones in pruning and a later resume, and its export would be overwritten; ``overwrite=True``
    removes those files instead (rank 0; call it on every rank, then the ranks wait for each other).
    """
    root = os.path.realpath(output)
    for value in inputs:
        if not isinstance(value, str) or not value or not os.path.exists(value):
            continue
        path = os.path.realpath(value)
        if path == root or any(path == d or path.startswith(d + os.sep) for d in _replaced(root)):
            raise ValueError(f"{value} is an input of this run but {output} would overwrite it; choose another output")
    found = [name for name in _RUN_FILES if os.path.exists(os.path.join(output, name))]
    if found and not resume and not overwrite:
        raise FileExistsError(
            f"{output} holds another run ({', '.join(found)}): pass --resume to continue it, --overwrite to "
            "replace it, or another --output"
        )
    if found and not resume and rank == 0:
        log.warning("--overwrite: removing %s from %s", ", ".join(found), output)
        for name in found:
            path = os.path.join(output, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # nobody writes into the folder before rank 0 has cleared it


def _replaced(root: str) -> list[str]:
    return [os.path.join(root, "final"), os.path.join(root, "checkpoints")]


def write_args(config: Mapping[str, Any], output: str, resume: bool = False, rank: int = 0) -> dict[str, Any]:
    """Write ``config`` (e.g. ``vars(args)``) to ``<output>/args.json`` (rank 0); return the differences from the
    saved ones on resume.

    Returns ``{name: (saved, now)}`` for every argument outside the reporting ones that changed
    since the file was written (empty on a fresh run), after warning about them.
    """
    path = os.path.join(output, "args.json")
    now = {k: v for k, v in sorted(config.items()) if _jsonable(v)}
    changed: dict[str, Any] = {}
    if resume and os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        changed = {k: (saved.get(k), now.get(k)) for k in sorted((set(saved) | set(now)) - _HARMLESS)}
        changed = {k: v for k, v in changed.items() if v[0] != v[1]}
        if changed:
            text = ", ".join(f"--{k.replace('_', '-')} {a!r} -> {b!r}" for k, (a, b) in changed.items())
            warnings.warn(f"resuming {output} with other arguments than it was started with: {text}")
    if rank == 0:
        _write_json_atomically(path, now, indent=1)
    return changed


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except TypeError:
        return False


class RunLog:
    """Per-step scalars to ``train_log.jsonl``, the console, and the trackers in ``report_to``.

    ``log(step, total, samples=n, loss=..., lr=..., **more)``: ``samples`` (rows of this step,
    all ranks) feeds the samples/s figure; everything else is written as given (text values, such as
    the step's task, to the file and the console only), plus ``time`` (Unix seconds) in the file. Call
    ``close()`` at the end (also a context manager). Ranks other than 0 write nothing.
    """

    def __init__(
        self,
        output: str,
        report_to: Iterable[str] = (),
        rank: int = 0,
        log_every: int = 10,
        config: dict[str, Any] | None = None,
    ) -> None:
        report_to = [r for r in report_to if r and r != "none"]
        unknown = sorted(set(report_to) - set(TRACKERS))
        if unknown:
            raise ValueError(f"--report-to: unknown tracker(s) {unknown}; choose from {TRACKERS}")
        self.rank, self.log_every = rank, max(1, log_every)
        self.t0, self.samples = time.perf_counter(), 0
        self._file = self._tb = self._wandb = None
        if rank != 0:
            return
        os.makedirs(output, exist_ok=True)
        self._file = open(os.path.join(output, "train_log.jsonl"), "a")
        if "tensorboard" in report_to:
            self._tb = _tensorboard_writer(os.path.join(output, "tensorboard"))
        if "wandb" in report_to:
            self._wandb = _wandb_run(output, config or {})

    def log(self, step: int, total: int, samples: int = 0, **scalars: float) -> None:
        self.samples += samples
        if self._file is None:
            return
        self._file.write(json.dumps({"step": step, **scalars, "time": round(time.time(), 3)}) + "\n")
        self._file.flush()
        numbers = {k: v for k, v in scalars.items() if _is_number(v)}  # trackers plot numbers; text stays in the file
        if self._tb is not None:
            for name, value in numbers.items():
                self._tb.add_scalar(f"train/{name}", value, step)
        if self._wandb is not None:
            self._wandb.log({f"train/{k}": v for k, v in numbers.items()}, step=step)
        if step % self.log_every == 0 or step == total:
            rate = self.samples / max(time.perf_counter() - self.t0, 1e-9)
            shown = "  ".join(f"{k} {v:.4g}" if _is_number(v) else f"{k} {v}" for k, v in scalars.items())
            log.info("step %d/%d  %s  %.1f samples/s", step, total, shown, rate)

    def eval(self, step: int, metrics: dict[str, float]) -> None:
        """Validation metrics at ``step``: a line in ``eval_log.jsonl``, the console and the trackers."""
        if self._file is None:
            return
        with open(os.path.join(os.path.dirname(self._file.name), "eval_log.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, **{k: v for k, v in metrics.items() if not isinstance(v, list)}}) + "\n")
        metrics = {k: v for k, v in metrics.items() if _is_number(v)}
        for name, value in metrics.items():
            if self._tb is not None:
                self._tb.add_scalar(f"eval/{name}", value, step)
        if self._wandb is not None:
            self._wandb.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
        log.info("eval step %d  %s", step, "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    def close(self) -> None:
        for handle in (self._file, self._tb):
            if handle is not None:
                handle.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._file = self._tb = self._wandb = None

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _tensorboard_writer(logdir: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # torch's writer needs the tensorboard package
        raise ImportError('--report-to tensorboard needs tensorboard: pip install "vembed-blocks[logging]"') from e
    return SummaryWriter(logdir)


def _wandb_run(output: str, config: dict[str, Any]):
    try:
        import wandb
    except ImportError as e:
        raise ImportError('--report-to wandb needs wandb: pip install "vembed-blocks[logging]"') from e
    mode = os.environ.get("WANDB_MODE", "offline")  # offline: no account or network; `wandb sync` uploads later
    return wandb.init(dir=output, config=config, mode=mode, project=os.environ.get("WANDB_PROJECT", "vembed-blocks"))


def save_metrics_before(output: str, metrics: dict[str, float], rank: int = 0) -> dict[str, float]:
    """Save the metrics measured before training to ``<output>/metrics_before.json`` (rank 0) and return them,
    so a resumed run (`read_metrics_before`) reports the same "before" column as the first launch."""
    if rank == 0:
        _write_json_atomically(os.path.join(output, "metrics_before.json"), metrics)
    return metrics


def _write_json_atomically(path: str, data: Any, indent: int | None = None) -> None:
    """``path`` holds the old content or the new, never half of one (a kill mid-write keeps the old)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=indent)
    os.replace(path + ".tmp", path)


def read_metrics_before(output: str) -> dict | None:
    """The first launch's ``<output>/metrics_before.json`` (``None`` if it saved none)."""
    path = os.path.join(output, "metrics_before.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_metrics(output: str, before: dict | None, after: dict, rank: int = 0, health: Mapping | None = None) -> dict:
    """``<output>/metrics.json`` = ``{"before": ..., "after": ...}`` and a table on stdout (rank 0); a
    ``"recall_curve"`` list in either moves to ``{"recall_curve": {"before": [...], "after": [...]}}``.
    ``health`` (e.g. ``{"skipped_steps": 0, "bad_rows": 3}``: what went wrong in training) is kept under
    ``"health"``, so a metric is never read without knowing what the run skipped."""
    from .metrics import format_table

    curves = {k: m["recall_curve"] for k, m in (("before", before), ("after", after)) if m and "recall_curve" in m}
    before = None if before is None else {k: v for k, v in before.items() if k != "recall_curve"}
    after = {k: v for k, v in after.items() if k != "recall_curve"}
    result: dict = {"before": before, "after": after} if before is not None else {"after": after}
    if curves:  # recall@1..K lists (evaluate_retrieval_by(curve_k=)): the report's before/after curve
        result["recall_curve"] = curves
    if health is not None:
        result["health"] = dict(health)
    if rank == 0:
        _write_json_atomically(os.path.join(output, "metrics.json"), result, indent=1)
        print(format_table(before, after) if before is not None else format_table(after, label="after"), flush=True)
    return result
