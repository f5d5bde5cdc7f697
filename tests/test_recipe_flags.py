"""recipe_flags: the shared flags' checks name the flag (or the missing file) before anything is loaded."""

from __future__ import annotations

import argparse

import pytest

from vembed_blocks.recipe_flags import add_common_args, check_common_args


def parse(*argv: str, require_data: bool = True) -> argparse.Namespace:
    p = add_common_args(argparse.ArgumentParser(), output="runs/x", lr=1e-3, batch_size=8, require_data=require_data)
    return p.parse_args(list(argv))


def test_checks_name_what_is_wrong(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("{}\n")
    check_common_args(parse("--data", str(data)))  # defaults are valid
    check_common_args(parse(require_data=False))  # a demo recipe runs without --data
    with pytest.raises(SystemExit):  # argparse: --data is required
        parse()
    cases = [
        (["--data", str(tmp_path / "nope.jsonl")], f"no such file: {tmp_path / 'nope.jsonl'}"),
        (["--data", str(data), "--val-data", "val.jsonl"], "no such file: val.jsonl"),
        (["--data", str(data), "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--data", str(data), "--max-grad-norm", "-1"], "--max-grad-norm must be >= 0 (0 = off), got -1.0"),
        (["--data", str(data), "--bf16", "--fp16"], "give --bf16 or --fp16, not both"),
        (["--data", str(data), "--warmup-steps", "5", "--warmup-ratio", "0.1"], "not both"),
        (["--data", str(data), "--max-steps", "0"], "--max-steps must be >= 1, got 0"),
        (["--data", str(data), "--max-bad-steps", "0"], "--max-bad-steps must be >= 1, got 0"),
        (["--data", str(data), "--max-bad-fraction", "2"], "--max-bad-fraction must be in \\[0, 1\\], got 2.0"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit, match=message.replace("(", r"\(").replace(")", r"\)")):
            check_common_args(parse(*argv))
    for value in ("0", "-0.05"):  # a recipe's --temperature: 0 once fell back to the model's own, silently
        args = argparse.Namespace(**vars(parse("--data", str(data))), temperature=float(value))
        with pytest.raises(SystemExit, match=r"--temperature must be > 0 \(logits = similarity / temperature\)"):
            check_common_args(args)
