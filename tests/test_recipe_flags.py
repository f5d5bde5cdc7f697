"""recipe_flags: the shared flags' checks name the flag (or the missing file) before anything is loaded."""

from __future__ import annotations

import argparse

import pytest

from vembed_blocks.false_negatives import FalseNegatives
from vembed_blocks.recipe_flags import (
    add_common_args,
    add_false_negative_args,
    check_common_args,
    false_negative_counts,
    false_negative_rules,
)


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


def test_false_negative_flags_build_the_rules_or_say_what_is_missing():
    p = add_false_negative_args(argparse.ArgumentParser(), "a model folder")
    args = p.parse_args([])
    assert not args.fn_duplicates and args.fn_weight == 0.0  # off by default: the demos' figures stay the same
    assert false_negative_rules() is None and false_negative_counts(False, None) == {}
    assert false_negative_counts(True, None) == {"duplicates": 0}
    a = p.parse_args(["--fn-margin", "0.1", "--fn-weight", "0.5", "--fn-guide", "g", "--fn-guide-ratio", "0.9"])
    rules = false_negative_rules(a.fn_margin, a.fn_ratio, a.fn_weight, a.fn_guide, a.fn_guide_margin, a.fn_guide_ratio)
    assert rules == FalseNegatives(margin=0.1, weight=0.5, guide_ratio=0.9)
    assert false_negative_counts(True, rules) == {"duplicates": 0, "margin": 0, "guide": 0}
    assert false_negative_counts(False, FalseNegatives(ratio=0.9)) == {"margin": 0}
    cases = [
        (dict(weight=0.5), "--fn-weight needs --fn-margin or --fn-ratio"),
        (dict(margin=0.1, weight=1.0), r"--fn-weight must be in \[0, 1\) \(0 = drop\), got 1.0"),
        (dict(ratio=0.0), "--fn-ratio must be > 0, got 0.0"),
        (dict(guide_margin=0.05), "--fn-guide-margin / --fn-guide-ratio need --fn-guide"),
        (dict(guide_ratio=0.9), "--fn-guide-margin / --fn-guide-ratio need --fn-guide"),
        (dict(guide="g"), "--fn-guide needs --fn-guide-margin or --fn-guide-ratio"),
        (dict(guide="g", guide_ratio=-1.0), "--fn-guide-ratio must be > 0, got -1.0"),
    ]
    for values, message in cases:
        with pytest.raises(SystemExit, match=message):
            false_negative_rules(**values)


def test_a_recipe_refuses_bad_false_negative_flags_before_loading(tmp_path):
    """check_common_args runs the same checks at parse time (no model is loaded)."""
    data = tmp_path / "train.jsonl"
    data.write_text("{}\n")
    p = add_common_args(argparse.ArgumentParser(), output="runs/x", lr=1e-3, batch_size=8)
    add_false_negative_args(p, "a model folder")
    check_common_args(p.parse_args(["--data", str(data), "--fn-duplicates"]))
    with pytest.raises(SystemExit, match="--fn-guide needs --fn-guide-margin or --fn-guide-ratio"):
        check_common_args(p.parse_args(["--data", str(data), "--fn-guide", "g"]))
