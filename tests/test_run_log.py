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


def test_claim_run_folder_refuses_a_fresh_run_over_another_and_inputs_it_would_overwrite(tmp_path):
    from vembed_blocks.run_log import claim_run_folder

    out = tmp_path / "run"
    claim_run_folder(str(out), resume=False)  # nothing there: fine
    (out / "checkpoints" / "step-000006").mkdir(parents=True)
    (out / "train_log.jsonl").write_text('{"step": 1}\n')
    (out / "demo").mkdir()
    with pytest.raises(FileExistsError, match=r"holds another run \(checkpoints, train_log.jsonl\): pass --resume"):
        claim_run_folder(str(out), resume=False)
    claim_run_folder(str(out), resume=True)  # continuing it is fine, and removes nothing
    assert (out / "checkpoints" / "step-000006").is_dir()
    claim_run_folder(str(out), resume=False, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["demo"]  # the old run's files gone, nothing else
    (out / "final").mkdir()
    for model in (out, out / "final", out / "checkpoints"):
        model.mkdir(exist_ok=True)
        with pytest.raises(ValueError, match="is an input of this run but .* would overwrite it"):
            claim_run_folder(str(out), resume=True, inputs=[str(model), None, 3])
    claim_run_folder(str(out), resume=True, inputs=[str(out / "demo"), "not/a/path"])  # inputs elsewhere: fine


def test_metrics_files_are_written_atomically_with_health(tmp_path, monkeypatch):
    import os

    from vembed_blocks.run_log import save_metrics_before, write_metrics

    save_metrics_before(str(tmp_path), {"recall@1": 0.5})
    real_replace = os.replace

    def killed(src, dst):  # a kill between writing the new file and putting it in place
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        save_metrics_before(str(tmp_path), {"recall@1": 0.9})
    monkeypatch.setattr(os, "replace", real_replace)
    assert json.loads((tmp_path / "metrics_before.json").read_text()) == {"recall@1": 0.5}  # the old one, whole
    health = {"skipped_steps": 2, "bad_rows": 5}
    result = write_metrics(str(tmp_path), {"recall@1": 0.5}, {"recall@1": 0.7}, health=health)
    assert json.loads((tmp_path / "metrics.json").read_text()) == result
    assert result["health"] == health
