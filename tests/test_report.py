"""report: report.md and its PNG plots from a hand-written run folder, resumed logs, no matplotlib, the CLI;
metrics.recall_curve against a hand-computed case; the clip_t2i demo's own run folder end to end."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _recipes import ROOT, load_script
from _watchdog import run_watched
from PIL import Image

from vembed_blocks.metrics import recall_curve, retrieval_metrics
from vembed_blocks.report import INSTALL_HINT, read_step_log, write_report

BLUE, ORANGE = (31, 119, 180), (255, 127, 14)  # matplotlib's first two line colours (tab:blue, tab:orange)
PLOTS = ("loss_lr.png", "eval.png", "recall_curve.png")


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _write_run(run: Path, resumed_to: int = 40) -> Path:
    """A run of 40 steps on 2 ranks that was resumed from its step-20 checkpoint after step 30.

    Launch 1 logged steps 1..30 (loss 5 - 0.1 s) and evaluated at 10, 20, 30; launch 2 logged
    21..``resumed_to`` (loss 4 - 0.05 s), a string column and wall-clock times, and evaluated at 30.
    """
    run.mkdir(parents=True)
    args = {"model": "tiny-clip", "data": "train.jsonl", "val_data": "val.jsonl", "batch_size": 8, "lr": 0.01}
    (run / "args.json").write_text(json.dumps({**args, "max_steps": 40, "loss": "infonce", "bf16": False}))
    lr = lambda s: 0.01 * (1 - s / 40)
    first = [{"step": s, "loss": 5 - 0.1 * s, "lr": lr(s), "time": 1000.0 + s} for s in range(1, 31)]
    second = [{"step": s, "loss": 4 - 0.05 * s, "lr": lr(s), "phase": "b", "time": 2000.0 + s} for s in range(21, 41)]
    _jsonl(run / "train_log.jsonl", first + second[: resumed_to - 20])
    evals = [{"step": s, "recall@1": 0.1 * s / 10, "recall@5": 0.2 + s / 100, "loss": 3 - s / 20} for s in (10, 20, 30)]
    _jsonl(run / "eval_log.jsonl", evals + [{"step": 30, "recall@1": 0.55, "recall@5": 0.75, "loss": 1.25}])
    before, after = {"recall@1": 0.125, "recall@5": 0.25}, {"recall@1": 0.625, "recall@5": 0.875}
    curve = {
        "before": [min(1.0, 0.1 + 0.01 * k) for k in range(1, 101)],
        "after": [min(1.0, 0.6 + 0.01 * k) for k in range(1, 101)],
    }
    (run / "metrics.json").write_text(json.dumps({"before": before, "after": after, "recall_curve": curve}))
    ckpt = run / "checkpoints" / "step-000040"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text(json.dumps({"step": 40, "world_size": 2}))
    (run / "checkpoints" / "latest").write_text("step-000040")
    (run / "final").mkdir()
    return run


def _pixels(path: Path, size: tuple[int, int]) -> np.ndarray:
    """The PNG decoded to ``[H, W, 3]`` uint8; asserts its size and that it is not one flat colour."""
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG" and im.size == size, (path.name, im.format, im.size)
        rgb = np.asarray(im.convert("RGB"))
    assert rgb.reshape(-1, 3).std(0).max() > 10 and len(np.unique(rgb.reshape(-1, 3), axis=0)) > 20, path.name
    return rgb


def _rows_of(rgb: np.ndarray, colour: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) coordinates of the pixels drawn in ``colour`` (antialiasing tolerance)."""
    near = (np.abs(rgb.astype(int) - np.array(colour)).sum(-1) < 30).nonzero()
    assert len(near[0]) > 100, f"no line drawn in {colour}"
    return near


def test_report_of_a_resumed_run_folder(tmp_path):
    run = _write_run(tmp_path / "run")
    text = Path(write_report(str(run))).read_text()
    assert Path(write_report(str(run))) == run / "report.md"
    for line in (
        "- model: `tiny-clip`",
        "- data: `train.jsonl`, validation: `val.jsonl`",
        "- steps done: 40 of 40",
        "- batch: 8 per rank x 2 rank(s) = 16 rows/step",  # ranks from the checkpoint's meta.json
        "- lr: 0.01",
        "- loss: 4.9000 -> 2.0000",  # first row of launch 1, last of launch 2
        "- wall time: 1039.0 s from the first to the last logged step",
        "| recall@1 | 0.1250 | 0.6250 | +0.5000 |",
        "| recall@5 | 0.2500 | 0.8750 | +0.6250 |",
        "- `eval_log.jsonl`: 3 evaluations",
        "- `train_log.jsonl`: 40 training steps",
        "- `checkpoints`: resumable checkpoints (step-000040; `--resume`)",
        "`loss=infonce`",
    ):
        assert line in text, line
    for image in PLOTS:
        assert f"]({image})" in text
    loss_lr = _pixels(run / "loss_lr.png", (700, 500))
    rows, cols = _rows_of(loss_lr, ORANGE)  # lr falls: its right end is drawn lower than its left end
    assert rows[cols == cols.max()].mean() > rows[cols == cols.min()].mean() + 50
    assert _rows_of(loss_lr, BLUE)[0].max() < rows.min()  # loss in the top panel, lr below it
    _pixels(run / "eval.png", (700, 600))  # two panels: metrics, and the eval "loss" column
    curve = _pixels(run / "recall_curve.png", (600, 400))
    assert _rows_of(curve, ORANGE)[0].mean() < _rows_of(curve, BLUE)[0].mean() - 50  # after drawn above before


def test_resumed_logs_keep_the_later_launch(tmp_path):
    run = _write_run(tmp_path / "run", resumed_to=25)  # launch 2 stopped at 25: launch 1's 26..30 are stale
    rows = read_step_log(str(run / "train_log.jsonl"))
    assert [r["step"] for r in rows] == list(range(1, 26))
    assert [r["loss"] for r in rows[18:]] == pytest.approx([3.1, 3.0, 2.95, 2.9, 2.85, 2.8, 2.75])  # 19, 20 | 21..25
    evals = read_step_log(str(run / "eval_log.jsonl"))
    assert [(r["step"], r["recall@1"]) for r in evals] == [(10, 0.1), (20, 0.2), (30, 0.55)]  # last row of 30 wins
    text = Path(write_report(str(run))).read_text()
    assert "- steps done: 25 of 40" in text and "- loss: 4.9000 -> 2.7500" in text
    assert "- `eval_log.jsonl`: 2 evaluations" in text  # the evaluation at 30 is past the last step


def test_missing_inputs_are_named_and_bad_lines_raise(tmp_path):
    (tmp_path / "empty").mkdir()
    text = Path(write_report(str(tmp_path / "empty"))).read_text()
    assert "No args.json or train_log.jsonl" in text and "No metrics.json" in text
    assert "No eval_log.jsonl (train with `--eval-every N` to get one)." in text
    assert "- `final`: missing" in text and not list((tmp_path / "empty").glob("*.png"))
    run = _write_run(tmp_path / "run")
    with open(run / "train_log.jsonl", "a") as f:
        f.write('{"step": 41, "loss": \n')
    with pytest.raises(ValueError, match=r"train_log.jsonl:51: not a JSON line"):
        write_report(str(run))
    _jsonl(run / "train_log.jsonl", [{"step": 1, "loss": 1.0}, {"loss": 2.0}])
    with pytest.raises(ValueError, match=r"train_log.jsonl:2: expected an object with an integer 'step'"):
        write_report(str(run))
    with pytest.raises(FileNotFoundError, match="no such directory"):
        write_report(str(tmp_path / "nowhere"))


def test_cli_help_regenerates_and_runs_without_matplotlib(tmp_path):
    run = _write_run(tmp_path / "run")
    cli = [sys.executable, "-m", "vembed_blocks.report"]
    shown = run_watched([*cli, "--help"], capture_output=True, text=True, cwd=ROOT)
    assert shown.returncode == 0 and "run_dir" in shown.stdout, shown.stderr
    done = run_watched([*cli, str(run)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.strip() == str(run / "report.md"), done.stderr
    assert "| recall@1 | 0.1250 | 0.6250 | +0.5000 |" in (run / "report.md").read_text()
    assert all((run / p).stat().st_size > 1000 for p in PLOTS)
    # None in sys.modules makes `import matplotlib` raise ImportError, as on an install without the extra.
    bare = shutil.copytree(run, tmp_path / "bare", ignore=shutil.ignore_patterns("*.png", "report.md"))
    code = "import runpy, sys; sys.modules['matplotlib'] = None; "
    code += "runpy.run_module('vembed_blocks.report', run_name='__main__')"
    done = run_watched([sys.executable, "-c", code, str(bare)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    text = (bare / "report.md").read_text()
    assert INSTALL_HINT == 'pip install "vembed-blocks[report]"'
    assert text.count(f"matplotlib is not installed (`{INSTALL_HINT}`)") == 3  # one per plot
    assert "| recall@1 | 0.1250 | 0.6250 | +0.5000 |" in text and "](loss_lr.png)" not in text
    assert not list(bare.glob("*.png"))


def test_recall_curve_hand_computed():
    scores = torch.tensor(
        [
            [0.9, 0.1, 0.8, 0.3, 0.2],  # ranking 0,2,3,4,1; relevant {1,2} at ranks 5 and 2
            [0.5, 0.5, 0.1, 0.7, 0.0],  # ranking 3,0,1,2,4 (tie 0/1: lower index first); relevant {1} at rank 3
            [0.1, 0.2, 0.3, 0.4, 0.5],  # no relevant document: left out of the average
        ]
    )
    relevant = [{1, 2}, {1}, set()]
    expect = [(0 + 0) / 2, (0.5 + 0) / 2, (0.5 + 1) / 2, (0.5 + 1) / 2, (1 + 1) / 2]
    assert recall_curve(scores, relevant) == pytest.approx(expect, abs=1e-12)  # K = min(100, N) = 5
    assert recall_curve(scores, relevant, max_k=3, chunk_size=1) == pytest.approx(expect[:3], abs=1e-12)
    same = retrieval_metrics(scores, relevant, ks=range(1, 6))
    assert [same[f"recall@{k}"] for k in range(1, 6)] == pytest.approx(expect, abs=1e-12)
    # Labels with the query in the corpus: q0 finds {1} at its 2nd place once itself is removed, q1 finds {0} first.
    own = torch.tensor([[1.0, 0.2, 0.5], [0.9, 1.0, 0.1], [0.0, 0.0, 1.0]])
    labels = (["a", "a", "b"], ["a", "a", "b"])
    assert recall_curve(own, labels, exclude_self=True) == pytest.approx([0.5, 1.0, 1.0], abs=1e-12)
    with pytest.raises(ValueError, match="no query has a relevant document"):
        recall_curve(scores, [set(), set(), set()])


def test_clip_demo_run_folder_report(tmp_path):
    out = tmp_path / "run"
    args = ["--demo-quick", "--output", str(out), "--eval-every", "20", "--num-workers", "0"]
    load_script("clip_t2i").main(args)
    text = Path(write_report(str(out))).read_text()
    assert "- steps done: 40 of 40" in text and "| recall@10 |" in text and "- `eval_log.jsonl`: 1 evaluations" in text
    _pixels(out / "loss_lr.png", (700, 500))
    with_loss = "loss" in (out / "eval_log.jsonl").read_text()  # a validation loss gets a second panel
    _pixels(out / "eval.png", (700, 600 if with_loss else 400))
    if '"recall_curve"' in (out / "metrics.json").read_text():  # once the recipe writes it
        _pixels(out / "recall_curve.png", (600, 400))
    else:
        assert 'metrics.json has no "recall_curve"' in text


def test_report_names_what_the_run_skipped_beside_its_metrics(tmp_path):
    import json

    from vembed_blocks.report import write_report

    row = {"step": 1, "loss": 1.0, "lr": 0.1, "skipped_steps": 1, "bad_rows": 2, "time": 1.0}
    (tmp_path / "train_log.jsonl").write_text(json.dumps(row) + "\n")
    text = open(write_report(str(tmp_path))).read()  # no metrics.json: the log's running counts
    assert "Skipped in training: skipped steps 1, bad rows 2" in text
    health = {"skipped_steps": 3, "bad_rows": 0, "read_skipped": 4, "bad_shards": 1}
    (tmp_path / "metrics.json").write_text(json.dumps({"after": {"recall@1": 0.5}, "health": health}))
    text = open(write_report(str(tmp_path))).read()
    assert "Skipped in training: skipped steps 3, bad rows 0, read skipped 4, bad shards 1" in text
    row.update(skipped_steps=0, bad_rows=0)
    (tmp_path / "train_log.jsonl").write_text(json.dumps(row) + "\n")
    (tmp_path / "metrics.json").unlink()
    assert "Skipped in training" not in open(write_report(str(tmp_path))).read()  # a clean run says nothing


def test_report_names_the_validation_set_only_as_the_run_folder_shows_it(tmp_path):
    """validation: --val-data's file; "none" when no evaluation was written; the demo set only when the demo ran
    (data null) and evaluated; a set args.json does not name when --data was given and evaluation results exist."""

    def validation(name: str, args: dict, files: dict[str, object]) -> str:
        run = tmp_path / name
        run.mkdir()
        (run / "args.json").write_text(json.dumps(args))
        _jsonl(run / "train_log.jsonl", [{"step": 1, "loss": 1.0, "lr": 0.1}])
        for file, content in files.items():
            (run / file).write_text(content if isinstance(content, str) else json.dumps(content))
        line = next(x for x in Path(write_report(str(run))).read_text().splitlines() if x.startswith("- data:"))
        return line.split(", validation: ")[1]

    after = {"metrics.json": {"after": {"recall@1": 0.5}}}
    assert validation("file", {"data": "t.jsonl", "val_data": "v.jsonl"}, after) == "`v.jsonl`"
    assert validation("no_val", {"data": "t.jsonl", "val_data": None}, {}) == "none"  # it said "the demo set"
    assert validation("health_only", {"data": "t.jsonl", "val_data": None}, {"metrics.json": {"health": {}}}) == "none"
    assert validation("demo", {"data": None, "val_data": None}, after) == "the demo set"
    assert validation("demo_stopped", {"data": None, "val_data": None}, {"metrics_before.json": {"r": 0.1}}) == (
        "the demo set"
    )
    assert validation("demo_no_eval", {"data": None, "val_data": None}, {}) == "none"
    evals = {"eval_log.jsonl": '{"step": 1, "recall@1": 0.5}\n'}
    assert validation("own_rows", {"data": "t.jsonl", "val_data": None}, evals).startswith("not named in args.json")
    assert validation("old", {"data": "t.jsonl"}, after) == "not recorded"
