"""A new user's first hour, through a real recipe (clip_t2i on the demo's tiny CLIP and rendered images):
each mistake ends in one clear line naming the flag, file or line and the fix, and nothing trains
silently on nothing.

- data the tokenizer does not cover (every word ``[UNK]``) stops the run after the first batches, with
  the side and the share named; ``--ignore-input-check`` trains anyway, with the warning;
- a missing ``--model`` path, a vision backbone given as ``--model`` or a run folder instead of its
  ``final/`` is named before anything loads; from the command line that is two lines on stderr and exit
  status 2, no traceback;
- ``--resume`` without a checkpoint says so; a folder as ``--data`` lists what it reads and refuses a
  validation file in it; report.md claims no validation that did not run;
- a semicolon CSV with capitalised headers gets the exact ``--columns`` hint, and trains with it.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _recipes import ROOT, load_script

from vembed_blocks.demo import build_tiny_clip, render_demo
from vembed_blocks.user_errors import UserError

FOREIGN = ["zebra", "giraffe", "kettle", "violin", "harbour", "quartz", "lantern", "meadow"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("first_hour")
    train, _ = render_demo(str(root / "demo"), per_combo=1, seed=0)
    rows = [json.loads(line) for line in Path(train).read_text().splitlines()][:48]
    # The same images, captions in words the demo tokenizer has never seen: every query token is [UNK].
    foreign = [{**r, "query": f"{FOREIGN[i % 8]} {FOREIGN[(i + 3) % 8]}"} for i, r in enumerate(rows)]
    (root / "demo" / "foreign.jsonl").write_text("".join(json.dumps(r) + "\n" for r in foreign))
    (root / "demo" / "small.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with open(root / "demo" / "excel.csv", "w", newline="", encoding="utf-8-sig") as f:  # Excel: BOM, ';'
        w = csv.writer(f, delimiter=";")
        w.writerow(["Query", "Positive"])
        w.writerows([r["query"], r["positive"]] for r in rows)
    return {"root": root, "model": Path(build_tiny_clip(str(root / "model"), quick=True)), "demo": root / "demo"}


def argv(demo: dict[str, Path], data: str, out: Path, *extra: str) -> list[str]:
    base = ["--model", str(demo["model"]), "--data", str(demo["demo"] / data), "--output", str(out)]
    return [*base, "--batch-size", "8", "--num-workers", "0", "--max-steps", "2", "--lr", "1e-3", *extra]


def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "recipes" / "clip_t2i.py"), *args]
    env = {k: v for k, v in os.environ.items() if k != "VEMBED_DEBUG"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)


def error_lines(done: subprocess.CompletedProcess) -> list[str]:
    """stderr's lines from ``error:`` on (the recipe's log lines come before it)."""
    lines = done.stderr.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert starts, done.stderr[-3000:]
    return lines[starts[-1] :]


def test_data_the_tokenizer_does_not_cover_stops_with_the_share_named(demo, tmp_path):
    done = run_cli(argv(demo, "foreign.jsonl", tmp_path / "cli"))
    assert done.returncode == 2, done.stderr[-3000:]
    lines = error_lines(done)
    # 2 steps x 8 rows x 2 words a query, each [UNK]: 32 of the query side's 32 content tokens.
    assert lines[0] == "error: the input check stopped the run:"
    unknown = "  - query: 100% of tokens (32 of 32) are the tokenizer's unknown token ([UNK]) in the first 2 steps"
    assert lines[1].startswith(unknown) and lines[1].endswith("pass --ignore-input-check to train anyway"), lines
    assert lines[-1] == "(the traceback: rerun with --debug or VEMBED_DEBUG=1)" and "Traceback" not in done.stderr
    assert not (tmp_path / "cli" / "final").exists()  # stopped before anything was exported


def test_ignore_input_check_trains_anyway_with_the_warning(demo, tmp_path, caplog):
    recipe = load_script("clip_t2i")
    with caplog.at_level(logging.WARNING):
        result = recipe.main(argv(demo, "foreign.jsonl", tmp_path / "anyway", "--ignore-input-check"))
    assert len(result["losses"]) == 2
    assert any("100% of tokens (32 of 32) are the tokenizer's unknown token" in r.getMessage() for r in caplog.records)


def test_covered_data_passes_the_check_silently(demo, tmp_path, caplog):
    recipe = load_script("clip_t2i")
    with caplog.at_level(logging.WARNING):
        recipe.main(argv(demo, "small.jsonl", tmp_path / "ok"))
    assert not [r for r in caplog.records if r.name == "vembed_blocks.input_check"]


def test_a_missing_model_path_is_two_lines_and_exit_2(demo, tmp_path):
    done = run_cli(argv(demo, "small.jsonl", tmp_path / "x", "--model", "runs/clip_t2i/demo/nodel"))
    assert done.returncode == 2, done.stderr[-3000:]
    assert error_lines(done) == [
        "error: --model runs/clip_t2i/demo/nodel: no such folder (and not a Hugging Face id). "
        "Check the path; a recipe's export is <output>/final.",
        "(the traceback: rerun with --debug or VEMBED_DEBUG=1)",
    ]
    debug = run_cli(argv(demo, "small.jsonl", tmp_path / "x", "--model", "runs/nodel/x", "--debug"))
    assert "Traceback (most recent call last)" in debug.stderr and debug.returncode == 1


def test_wrong_folder_kinds_are_named_before_loading(demo, tmp_path):
    from transformers import CLIPVisionModel

    recipe = load_script("clip_t2i")
    clip = str(demo["model"])
    vision = demo["root"] / "vision"  # the CLIP's vision tower alone: a vision backbone folder
    CLIPVisionModel.from_pretrained(clip).save_pretrained(vision)
    with pytest.raises(UserError, match=r"is a vision backbone \(clip_vision_model\), not a CLIP/SigLIP folder; pass "):
        recipe.main(argv(demo, "small.jsonl", tmp_path / "v", "--model", str(vision)))
    run = demo["root"] / "a_run"
    (run / "final").mkdir(parents=True, exist_ok=True)
    for f in os.listdir(clip):
        shutil.copy(os.path.join(clip, f), run / "final" / f)
    with pytest.raises(UserError, match=r"its export is .*a_run/final"):
        recipe.main(argv(demo, "small.jsonl", tmp_path / "r", "--model", str(run)))


def test_resume_without_a_checkpoint_says_so_and_report_claims_no_validation(demo, tmp_path, caplog):
    recipe = load_script("clip_t2i")
    with caplog.at_level(logging.INFO):
        recipe.main(argv(demo, "small.jsonl", tmp_path / "fresh", "--resume"))
    said = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("--resume: no checkpoint in") and "starts at step 0" in m for m in said), said
    report = (tmp_path / "fresh" / "report.md").read_text()
    assert "demo set" not in report and "validation" in report.lower()


def test_a_folder_as_data_lists_its_files_and_refuses_a_validation_file(demo, tmp_path, caplog):
    folder = tmp_path / "data"
    folder.mkdir()
    shutil.copy(demo["demo"] / "small.jsonl", folder / "train.jsonl")
    shutil.copy(demo["demo"] / "small.jsonl", folder / "val.jsonl")
    (folder / "img").symlink_to(demo["demo"] / "img", target_is_directory=True)  # paths are relative to the file
    recipe = load_script("clip_t2i")
    base = ["--model", str(demo["model"]), "--data", str(folder), "--output", str(tmp_path / "o")]
    small = ["--batch-size", "8", "--num-workers", "0", "--max-steps", "2"]
    with pytest.raises(UserError, match=r"val\.jsonl.*--allow-mixed-data"):
        recipe.main([*base, *small])
    (folder / "val.jsonl").unlink()
    with caplog.at_level(logging.INFO):
        recipe.main([*base, *small, "--overwrite"])
    assert any("train.jsonl" in r.getMessage() and "t2i" in r.getMessage() for r in caplog.records)


def test_a_semicolon_csv_with_capitalised_headers_gets_the_columns_hint_then_trains(demo, tmp_path):
    recipe = load_script("clip_t2i")
    with pytest.raises(UserError, match=r"pass --columns query=Query,positive=Positive"):
        recipe.main(argv(demo, "excel.csv", tmp_path / "c1"))
    result = recipe.main(argv(demo, "excel.csv", tmp_path / "c2", "--columns", "query=Query,positive=Positive"))
    assert len(result["losses"]) == 2


def test_evaluation_warns_when_every_query_embeds_alike(demo, tmp_path, caplog):
    """evaluate.py on captions the tokenizer does not cover: each query is [UNK] [UNK], so its 8 unique queries (8 word
    pairs, repeated over 48 rows) embed to one vector; the metrics are still written, with the warning.
    """
    evaluate = load_script("evaluate")
    data = str(demo["demo"] / "foreign.jsonl")
    with caplog.at_level(logging.WARNING):
        metrics = evaluate.main(["--model", str(demo["model"]), "--data", data, "--output", str(tmp_path / "e")])
    said = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("query embeddings: all 8 rows are the same vector") for m in said), said
    assert not any(m.startswith("corpus embeddings") for m in said) and "recall@1" in metrics
