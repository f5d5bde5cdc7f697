"""A run folder's ``report.md``: what was trained, how it went, what came out, where it lies.

``write_report(run_dir)`` reads only what a run leaves behind, each file optional (a missing one is
named in the report): ``args.json``, ``train_log.jsonl`` (``{"step", "loss", "lr", "time"?, ...}``),
``eval_log.jsonl`` (``{"step", <metric>: value, ...}``), ``metrics.json`` (``{"before"?, "after",
"recall_curve"?: {"before": [r@1, r@2, ...], "after": [...]}}``; metrics at a Matryoshka width,
``[<task>/]dim<w>/<metric>``, get a table per task), ``checkpoints/``, ``final/``.
Logs appended by resumed launches repeat steps: a step not above the previous row starts the rows
over from there (the later launch wins). Plots need matplotlib (the ``report`` extra).
Regenerate from a finished folder: ``python -m vembed_blocks.report RUN_DIR``. See docs/report.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections import Counter
from typing import Any

__all__ = ["write_report", "read_step_log", "plot_loss_lr", "plot_eval", "plot_recall_curve"]

INSTALL_HINT = 'pip install "vembed-blocks[report]"'
# Arguments worth a line in the summary when set (others are in the full list below it).
_KEY_FLAGS = (
    "format", "loss", "temperature", "symmetric", "mrl_dims", "lr_schedule", "warmup_steps", "warmup_ratio",
    "weight_decay", "max_grad_norm", "chunk_size", "lora", "bf16", "fp16", "grad_checkpointing", "compile", "seed",
)  # fmt: skip
_RANK_FAMILIES = re.compile(r"(hit|mrr|ndcg|map)@\d+")
# A metric at one Matryoshka width (`embed.evaluate_retrieval_by(widths=)`), maybe behind a task: "t/dim64/mrr@10".
_WIDTH_KEY = re.compile(r"(?:(?P<task>.+)/)?dim(?P<width>\d+)/(?P<metric>[^/]+)")
_WIDTH_METRICS = ("recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10")


def read_step_log(path: str) -> list[dict[str, Any]]:
    """The rows of a JSONL step log, one per step, ascending; ``[]`` when the file does not exist.

    A row whose step is not above the previous one marks a resumed launch: the earlier rows from
    that step on are discarded. A malformed line or one without an integer ``step`` raises
    ``ValueError`` naming ``path:line``.
    """
    if not os.path.exists(path):
        return []
    rows: dict[int, dict[str, Any]] = {}
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not a JSON line ({e.msg}): {line.strip()[:80]!r}") from None
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError(
                    f"{path}:{lineno}: expected an object with an integer 'step', got {line.strip()[:80]!r}"
                )
            rows = {s: r for s, r in rows.items() if s < row["step"]}
            rows[row["step"]] = row
    return list(rows.values())


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the rows whose ``key`` is a number (strings and absent values skipped)."""
    pairs = [(r["step"], float(r[key])) for r in rows if _number(r.get(key))]
    return [s for s, _ in pairs], [v for _, v in pairs]


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _figure(*size: float):
    """A matplotlib Figure drawn by the Agg canvas (no pyplot, no global backend switch), or None."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_loss_lr(rows: list[dict[str, Any]], path: str) -> bool:
    """``loss`` (top) and ``lr`` (bottom) over steps to ``path``; False without matplotlib."""
    fig = _figure(7, 5)
    if fig is None:
        return False
    ax_loss, ax_lr = fig.subplots(2, 1, sharex=True, height_ratios=(2, 1))
    steps, loss = _series(rows, "loss")
    ax_loss.plot(steps, loss, lw=1, alpha=0.5 if len(loss) > 50 else 1.0, label="loss per step")
    if len(loss) > 50:  # a noisy per-step curve: add a running mean over ~1/20 of the run
        w = len(loss) // 20
        mean = [sum(loss[i - w + 1 : i + 1]) / w for i in range(w - 1, len(loss))]
        ax_loss.plot(steps[w - 1 :], mean, color="tab:blue", label=f"running mean of {w}")
    ax_loss.legend(loc="upper right")
    ax_lr.plot(*_series(rows, "lr"), color="tab:orange")
    ax_loss.set(ylabel="training loss"), ax_lr.set(xlabel="step", ylabel="learning rate")
    ax_loss.grid(alpha=0.3), ax_lr.grid(alpha=0.3)
    fig.savefig(path, dpi=100)
    return True


def _eval_columns(rows: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """(retrieval columns to draw, loss columns): every recall@k, mrr/ndcg at the largest k, other scalars."""
    names = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in ("step", "time")]
    names = [k for k in names if any(_number(r.get(k)) for r in rows) and not _WIDTH_KEY.fullmatch(k)]
    losses = [n for n in names if "loss" in n]
    ks = [int(n.split("@")[1]) for n in names if _RANK_FAMILIES.fullmatch(n)]
    top = [f"{fam}@{max(ks)}" for fam in ("mrr", "ndcg")] if ks else []
    shown = [n for n in names if n not in losses and (not _RANK_FAMILIES.fullmatch(n) or n in top)]
    return shown, losses


def plot_eval(rows: list[dict[str, Any]], metrics: dict[str, Any] | None, last_step: int | None, path: str) -> bool:
    """Validation metrics over steps (and loss columns in a second panel); metrics.json's before/after at
    step 0 and ``last_step`` extend each line. False without matplotlib."""
    shown, losses = _eval_columns(rows)
    fig = _figure(7, 6 if losses else 4)
    if fig is None:
        return False
    axes = fig.subplots(2 if losses else 1, 1, sharex=True, squeeze=False)[:, 0]
    ends = [(0, (metrics or {}).get("before") or {}), (last_step, (metrics or {}).get("after") or {})]
    for names, ax in ((shown, axes[0]), (losses, axes[-1])):
        for name in names:
            points = dict(zip(*_series(rows, name)))
            for step, row in ends:
                if step is not None and step not in points and _number(row.get(name)):
                    points[step] = float(row[name])
            ax.plot(sorted(points), [points[s] for s in sorted(points)], marker="o", ms=3, label=name)
        if names:
            ax.legend(loc="best", fontsize="small"), ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation metric")
    axes[-1].set(xlabel="step", **({"ylabel": "validation loss"} if losses else {}))
    fig.savefig(path, dpi=100)
    return True


def plot_recall_curve(curve: dict[str, list[float]], path: str) -> bool:
    """recall@k for k = 1..K, one line per entry of ``curve`` (``before``, ``after``); False without matplotlib."""
    fig = _figure(6, 4)
    if fig is None:
        return False
    ax = fig.subplots()
    for label, values in curve.items():
        ax.plot(range(1, len(values) + 1), values, label=label)
    ax.set(xlabel="k (log scale)", ylabel="recall@k", ylim=(0, 1.02), xscale="log")
    ax.legend(loc="lower right"), ax.grid(alpha=0.3, which="both")
    fig.savefig(path, dpi=100)
    return True


def _ranks(run_dir: str, config: dict[str, Any]) -> int | None:
    """Ranks the run trained on: ``args.json``'s ``world_size``, else the latest checkpoint's meta.json."""
    if isinstance(config.get("world_size"), int):
        return config["world_size"]
    from .checkpoint import latest_checkpoint

    latest = latest_checkpoint(os.path.join(run_dir, "checkpoints"))
    meta = _read_json(os.path.join(latest, "meta.json")) if latest else None
    return (meta or {}).get("world_size")


def _summary(run_dir: str, config: dict[str, Any], train: list[dict[str, Any]]) -> list[str]:
    ranks, batch, accum = _ranks(run_dir, config), config.get("batch_size"), config.get("grad_accum_steps") or 1
    per_step = f" = {batch * ranks * accum} rows/step" if isinstance(batch, int) and ranks else ""
    _, loss = _series(train, "loss")
    _, times = _series(train, "time")
    flags = [f"`{k}={config[k]}`" for k in _KEY_FLAGS if config.get(k) not in (None, False, 0, "", [])]
    lines = [
        f"- model: `{config.get('model') or config.get('vision_model') or 'not recorded'}`"
        + (f" + `{config['text_model']}`" if config.get("text_model") else ""),
        f"- data: {_data_name(config, 'data')}, validation: {_validation_name(run_dir, config)}"
        if not config.get("tasks")
        else f"- data: the task table `{config['tasks']}` (each task's data and val_data)",
        f"- steps done: {train[-1]['step'] if train else 'none logged'}"
        + (f" of {config['max_steps']}" if train and config.get("max_steps") else ""),
        f"- batch: {batch or '?'} per rank x {ranks or '? (not recorded)'} rank(s)"
        + (f" x {accum} accumulation" if accum > 1 else "")
        + per_step
        if not config.get("tasks")
        else f"- batch: each task's batch_size per rank x {ranks or '? (not recorded)'} rank(s)",
        f"- lr: {config.get('lr', 'not recorded')}",
        f"- loss: {_fmt(loss[0])} -> {_fmt(loss[-1])}" if loss else "- loss: no training rows",
        f"- wall time: {times[-1] - times[0]:.1f} s from the first to the last logged step"
        if len(times) > 1
        else "- wall time: not recorded (train_log.jsonl rows carry no `time`)",
        "- flags: " + (", ".join(flags) or "none set"),
    ]
    drawn = Counter(r["task"] for r in train if r.get("task"))
    if len(drawn) > 1:  # a multi-task run: how the steps fell to each task
        lines.insert(3, "- steps per task: " + ", ".join(f"{t} {n}" for t, n in sorted(drawn.items())))
    if config:
        lines += ["", "<details><summary>all arguments (args.json)</summary>", "", "```json"]
        lines += [json.dumps(config, indent=1), "```", "</details>"]
    return lines


def _evaluation_summary(config: dict[str, Any], metrics: dict[str, Any] | None) -> list[str]:
    """The summary of an evaluation-only folder: no training, one model scored on one file."""
    counts = (metrics or {}).get("counts") or {}
    return [
        f"- evaluation of `{config.get('model', 'not recorded')}` ({config.get('family', 'family not recorded')})",
        f"- data: {_data_name(config, 'data')}, relevance: {config.get('relevance', 'positives')}",
        "- counts: " + (", ".join(f"{k} {v}" for k, v in counts.items()) if counts else "not recorded"),
    ]


def _data_name(config: dict[str, Any], key: str) -> str:
    """The file of ``--data``; a recipe without one (null) ran on its demo set."""
    return "not recorded" if key not in config else f"`{config[key]}`" if config[key] else "the demo set"


def _validation_name(run_dir: str, config: dict[str, Any]) -> str:
    """What the run validated on, as its files show: ``--val-data``'s file; "none" when no evaluation was written
    (no metrics.json results, metrics_before.json or eval_log.jsonl rows); the demo set when ``--data`` was null
    too (the demo ran); else a set args.json does not name (a recipe evaluating part of its training data)."""
    if "val_data" not in config:
        return "not recorded"
    if config["val_data"]:
        return f"`{config['val_data']}`"
    metrics = _read_json(os.path.join(run_dir, "metrics.json")) or {}
    evaluated = bool(metrics.get("after") or metrics.get("before")) or bool(
        read_step_log(os.path.join(run_dir, "eval_log.jsonl"))
    )
    if not (evaluated or os.path.exists(os.path.join(run_dir, "metrics_before.json"))):
        return "none"
    if "data" in config and not config["data"]:
        return "the demo set"
    return "not named in args.json (its results are under Metrics)"


def _metrics_table(metrics: dict[str, Any], trained: bool = True) -> list[str]:
    """Every metric of metrics.json, except the ``dim<w>/`` ones when `_width_tables` shows them."""
    before, after = metrics.get("before") or {}, metrics.get("after") or {}
    names = list(dict.fromkeys([*after, *before]))
    if _width_tables(metrics):
        names = [n for n in names if not _WIDTH_KEY.fullmatch(n)]
    lines = ["| metric | before | after | change |", "|---|---|---|---|"]
    for n in names:
        b, a = before.get(n), after.get(n)
        diff = f"{a - b:+.4f}" if _number(a) and _number(b) else "-"
        lines.append(f"| {n} | {_fmt(b) if b is not None else '-'} | {_fmt(a) if a is not None else '-'} | {diff} |")
    if not before and trained:
        lines += ["", "No metrics before training were recorded (a resumed run without metrics_before.json)."]
    return lines


def _width_tables(metrics: dict[str, Any]) -> list[str]:
    """The "By Matryoshka width" section: per task prefix, a row per metric of `_WIDTH_METRICS` and a column per width
    (the plain keys as "full", then ``dim<w>/`` largest first), each cell ``after`` or ``before -> after``;
    ``[]`` when metrics.json has no such key."""
    before, after = metrics.get("before") or {}, metrics.get("after") or {}
    tasks: dict[str, set[int]] = {}
    for key in (*after, *before):
        m = _WIDTH_KEY.fullmatch(key)
        if m and m["metric"] in _WIDTH_METRICS:
            tasks.setdefault(m["task"] or "", set()).add(int(m["width"]))
    if not tasks:
        return []
    fmt = lambda v: "-" if v is None else _fmt(v)
    cell = lambda b, a: fmt(a) if b is None else f"{fmt(b)} -> {fmt(a)}"
    out = ["## By Matryoshka width", "", "Retrieval on the first w dimensions of each embedding, re-normalised to"]
    out += ["unit length; a cell is `after` or `before -> after`. Other metrics per width are in `metrics.json`.", ""]
    for task in sorted(tasks):
        pre = f"{task}/" if task else ""
        cols = [("full", pre)] if any(pre + n in after or pre + n in before for n in _WIDTH_METRICS) else []
        cols += [(str(w), f"{pre}dim{w}/") for w in sorted(tasks[task], reverse=True)]
        names = [n for n in _WIDTH_METRICS if any(p + n in after or p + n in before for _, p in cols)]
        out += [f"### {task}", ""] if task else []
        out += ["| metric | " + " | ".join(c for c, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for n in names:
            cells = [cell(before.get(p + n), after.get(p + n)) for _, p in cols]
            out.append(f"| {n} | " + " | ".join(cells) + " |")
        out += [""]
    return out


def _files(run_dir: str, n_train: int, n_evals: int) -> list[str]:
    ckpt_root = os.path.join(run_dir, "checkpoints")
    ckpts = sorted(p for p in os.listdir(ckpt_root) if p.startswith("step-")) if os.path.isdir(ckpt_root) else []
    what = {
        "final": "the exported model (a `from_pretrained` folder)",
        "checkpoints": f"resumable checkpoints ({', '.join(ckpts) or 'none complete'}; `--resume`)",
        "args.json": "the arguments",
        "train_log.jsonl": f"{n_train} training steps",
        "eval_log.jsonl": f"{n_evals} evaluations",
        "metrics.json": "metrics before/after",
    }
    return [f"- `{n}`: {w if os.path.exists(os.path.join(run_dir, n)) else 'missing'}" for n, w in what.items()]


def _plot_section(title: str, drawn: bool | None, image: str, absent: str) -> list[str]:
    """A report section: the image link, the install hint (``drawn`` False) or why there is nothing (None)."""
    body = {None: absent, False: f"Plot not drawn: matplotlib is not installed (`{INSTALL_HINT}`)."}
    return [f"## {title}", "", f"![{title}]({image})" if drawn else body[drawn], ""]


_HEALTH = ("skipped_steps", "bad_rows")  # train_log.jsonl's running counts (`step_guard.StepGuard.counts`)


def write_report(run_dir: str) -> str:
    """Write ``<run_dir>/report.md`` (and its PNG plots next to it); return the report's path."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"write_report: {run_dir} is not a run folder (no such directory)")
    path = lambda name: os.path.join(run_dir, name)
    config = _read_json(path("args.json")) or {}
    train = read_step_log(path("train_log.jsonl"))
    last = train[-1]["step"] if train else None
    evals = [r for r in read_step_log(path("eval_log.jsonl")) if last is None or r["step"] <= last]
    metrics = _read_json(path("metrics.json"))
    if metrics is not None and not metrics.get("before"):
        metrics["before"] = _read_json(path("metrics_before.json"))
    curve = (metrics or {}).get("recall_curve")
    out = [f"# Run report: {os.path.basename(os.path.abspath(run_dir))}", "", "## Summary", ""]
    evaluation = not train and "family" in config  # an evaluation-only folder: nothing trained
    if evaluation:
        out += _evaluation_summary(config, metrics)
    else:
        out += (
            _summary(run_dir, config, train) if config or train else ["No args.json or train_log.jsonl in this folder."]
        )
    out += ["", "## Metrics", ""]
    no_metrics = ["No metrics.json: the run has not finished or had no validation set."]
    out += _metrics_table(metrics, not evaluation) if metrics else no_metrics
    health = (metrics or {}).get("health") or {k: v for k, v in (train[-1] if train else {}).items() if k in _HEALTH}
    if any(health.values()):  # what the run skipped is read beside its metrics, never instead of them
        out += ["", "Skipped in training: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in health.items())]
    out += ["", *(_width_tables(metrics) if metrics else [])]
    plots = [
        ("Training loss and learning rate", "loss_lr.png", train, lambda f: plot_loss_lr(train, f),
         "No train_log.jsonl rows."),
        ("Validation over training", "eval.png", evals, lambda f: plot_eval(evals, metrics, last, f),
         "No eval_log.jsonl (train with `--eval-every N` to get one)."),
        ("Recall@k before and after", "recall_curve.png", curve, lambda f: plot_recall_curve(curve, f),
         'metrics.json has no "recall_curve" (`{"before": [r@1, r@2, ...], "after": [...]}`).'),
    ]  # fmt: skip
    for title, image, data, draw, absent in plots:
        out += _plot_section(title, draw(path(image)) if data else None, image, absent)
    out += ["## Files", "", *_files(run_dir, len(train), len(evals)), ""]
    with open(path("report.md.tmp"), "w") as f:
        f.write("\n".join(out))
    os.replace(path("report.md.tmp"), path("report.md"))
    return path("report.md")


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(
        prog="python -m vembed_blocks.report", description="(Re)write RUN_DIR/report.md and its plots."
    )
    p.add_argument("run_dir", help="a run folder (a recipe's --output)")
    report = write_report(p.parse_args(argv).run_dir)
    print(report)
    return report


if __name__ == "__main__":
    main()
