"""run_log: args.json round trip and the resume warning; train_log.jsonl, TensorBoard and W&B (offline) records."""

from __future__ import annotations

import argparse
import json
import time

import pytest

from vembed_blocks.run_log import RunLog, write_args


def test_args_json_round_trips_and_resume_names_changes(tmp_path):
    args = argparse.Namespace(model="m", batch_size=8, lr=1e-3, resume=False, stop_at=None, log_every=5)
    assert write_args(vars(args), str(tmp_path)) == {}
    assert json.loads((tmp_path / "args.json").read_text()) == vars(args)
    same = argparse.Namespace(**{**vars(args), "resume": True, "stop_at": 4, "log_every": 1})  # reporting only
    assert write_args(vars(same), str(tmp_path), resume=True) == {}
    other = argparse.Namespace(**{**vars(args), "resume": True, "batch_size": 16})
    with pytest.warns(UserWarning, match=r"other arguments than it was started with: --batch-size 8 -> 16"):
        assert write_args(vars(other), str(tmp_path), resume=True) == {"batch_size": (8, 16)}


def test_train_log_and_tensorboard_event_files(tmp_path):
    pytest.importorskip("tensorboard", reason="the logging extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with RunLog(str(tmp_path), ["tensorboard"], log_every=2) as run:
        for step, loss in enumerate([3.0, 2.5, 2.25], start=1):
            run.log(step, 3, samples=8, loss=loss, lr=0.1 * step, task=f"edit/{step}")
    lines = [json.loads(x) for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    times = [line.pop("time") for line in lines]  # wall clock of each row (the report's wall time)
    want = [{"step": s, "loss": v, "lr": 0.1 * s, "task": f"edit/{s}"} for s, v in [(1, 3.0), (2, 2.5), (3, 2.25)]]
    assert lines == want
    assert times == sorted(times) and abs(times[-1] - time.time()) < 600
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 3.0), (2, 2.5), (3, 2.25)]
    assert [e.step for e in events.Scalars("train/lr")] == [1, 2, 3]
    assert sorted(events.Tags()["scalars"]) == ["train/loss", "train/lr"]  # text goes to the file only


def test_other_ranks_write_nothing_and_unknown_tracker(tmp_path):
    with RunLog(str(tmp_path / "r1"), ["tensorboard"], rank=1) as run:
        run.log(1, 1, samples=4, loss=1.0)
    assert not (tmp_path / "r1").exists()
    with pytest.raises(ValueError, match="unknown tracker"):
        RunLog(str(tmp_path), ["mlflow"])


def test_wandb_offline_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the logging extra is not installed")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    with RunLog(str(tmp_path), ["wandb"], config={"lr": 0.1}) as run:
        run.log(1, 1, samples=4, loss=1.5)
    assert list((tmp_path / "wandb").glob("offline-run-*")), "no offline run folder"
