"""Runs that cannot be ruined, through a real recipe (text_t2t on a tiny BERT):

- a NaN loss on ONE of 2 gloo ranks at step 3 skips that step on both (counted in train_log.jsonl and
  metrics.json), and the run ends with finite weights in every checkpoint and in final/; NaN on three steps
  in a row with --max-bad-steps 3 stops both ranks with the steps named, keeps the finite checkpoints and
  exports nothing;
- a resume on an edited data file or with another --grad-accum-steps is refused naming old and new, and
  leaves args.json and metrics_before.json as they were; a fresh run into a folder with a run is refused
  unless --overwrite; an input inside what the run replaces is refused.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from _multiproc import run_ranks
from _recipes import load_script
from _tiny_models import tiny_bert

WORDS = ["red", "blue", "green", "cube", "ball", "cone", "desk", "shelf"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("guards")
    rows = [{"query": f"{a} {b}", "positive": f"a {a} {b} here"} for a in WORDS for b in WORDS if a != b]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:48]))
    (root / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[48:]))
    bert = tiny_bert(str(root / "bert"), words=[*WORDS, "a", "here"])  # covers the rows: the input check passes
    return {"train": str(root / "train.jsonl"), "val": str(root / "val.jsonl"), "model": bert}


def argv(toy: dict[str, str], out: Path, *extra: str) -> list[str]:
    base = ["--model", toy["model"], "--data", toy["train"], "--val-data", toy["val"], "--output", str(out)]
    return [*base, "--batch-size", "4", "--lr", "1e-3", "--num-workers", "0", "--max-steps", "6", *extra]


def _nan_run(rank: int, world: int, args: list[str], nan_steps: list[int]):
    """text_t2t's main with this rank's loss made NaN at the given training steps (rank 1 only)."""
    from vembed_blocks.step_guard import NonFiniteTrainingError

    recipe = load_script("text_t2t")
    recipe.shutdown_distributed = lambda: None  # the test harness owns the process group
    real, calls = recipe.step_loss, [0]

    def step_loss(args, parts, batch, gc, device):
        loss = real(args, parts, batch, gc, device)
        if torch.is_grad_enabled():  # training, not the validation loss
            calls[0] += 1
            if rank == 1 and calls[0] in nan_steps:
                loss = loss * math.nan
        return loss

    recipe.step_loss = step_loss
    try:
        return {"losses": recipe.main(args)["losses"]}
    except NonFiniteTrainingError as e:
        return {"error": str(e)}


def _body(rank: int, world: int, once: list[str], three: list[str]) -> list[dict]:
    return [_nan_run(rank, world, once, [3]), _nan_run(rank, world, three, [3, 4, 5])]


def _finite_checkpoint(step_dir: Path, tmp: Path) -> bool:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(step_dir), str(tmp / f"{step_dir.name}.pt"))
    state = torch.load(tmp / f"{step_dir.name}.pt", weights_only=True)
    tensors = [v for v in state["model"].values() if torch.is_tensor(v) and v.is_floating_point()]
    return bool(tensors) and all(torch.isfinite(t).all() for t in tensors)


def test_nan_on_one_rank_is_skipped_on_both_and_never_saved(toy, tmp_path):
    from safetensors.torch import load_file

    once, three = tmp_path / "once", tmp_path / "three"
    run_once = argv(toy, once, "--save-every", "2")
    run_three = argv(toy, three, "--save-every", "1", "--max-bad-steps", "3")
    (r0, t0), (r1, t1) = run_ranks(_body, 2, run_once, run_three, timeout=240)
    # one NaN step: both ranks logged the same global losses, NaN only at step 3, and trained on
    assert len(r0["losses"]) == 6 and math.isnan(r0["losses"][2]) and math.isnan(r1["losses"][2])
    assert all(math.isfinite(x) for i, x in enumerate(r0["losses"]) if i != 2)
    log = [json.loads(line) for line in (once / "train_log.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in log] == [0, 0, 1, 1, 1, 1]
    assert json.loads((once / "metrics.json").read_text())["health"]["skipped_steps"] == 1
    weights = load_file(str(once / "final" / "model.safetensors"))
    assert weights and all(torch.isfinite(t).all() for t in weights.values())
    for step in (2, 4, 6):
        assert _finite_checkpoint(once / "checkpoints" / f"step-{step:06d}", tmp_path)
    # three in a row: both ranks stop at step 5 naming the steps and the rank; nothing exported
    for result in (t0, t1):
        assert "steps 3..5: 3 steps in a row" in result["error"] and "loss on ranks [1]" in result["error"]
    assert not (three / "final").exists()
    latest = three / "checkpoints" / (three / "checkpoints" / "latest").read_text().strip()
    assert latest.name == "step-000004" and _finite_checkpoint(latest, tmp_path)  # step 5 raised before its save


def test_resume_on_other_data_or_steps_is_refused_and_changes_nothing(toy, tmp_path):
    recipe = load_script("text_t2t")
    out = tmp_path / "run"
    data = Path(tmp_path / "train.jsonl")
    data.write_text(Path(toy["train"]).read_text())
    run = argv({**toy, "train": str(data)}, out)
    recipe.main([*run, "--stop-at", "2"])
    args_json, before_json = (out / "args.json").read_bytes(), (out / "metrics_before.json").read_bytes()

    text = data.read_text()
    data.write_text(text.replace("red blue", "red bluE", 1))  # one row edited, same size
    with pytest.raises(ValueError, match=r"(?s)blake2b.*resume"):
        recipe.main([*run, "--resume"])
    data.write_text(text + '{"query": "one more", "positive": "row"}\n')  # a row appended
    with pytest.raises(ValueError, match=r"rows"):
        recipe.main([*run, "--resume"])
    data.write_text(text)
    with pytest.raises(ValueError, match=r"grad_accum_steps=1 .* grad_accum_steps=2"):
        recipe.main([*run, "--resume", "--grad-accum-steps", "2"])
    assert (out / "args.json").read_bytes() == args_json  # a refused resume wrote nothing
    assert (out / "metrics_before.json").read_bytes() == before_json

    with pytest.raises(FileExistsError, match=r"holds another run .*--resume.*--overwrite"):
        recipe.main(run)  # a fresh run would mix its checkpoints with the old ones
    bad_model = argv({**toy, "train": str(data), "model": str(out / "checkpoints")}, out)
    with pytest.raises(ValueError, match=r"is an input of this run but .* would overwrite it"):
        recipe.main([*bad_model, "--overwrite"])
    assert (out / "checkpoints" / "step-000002").is_dir()  # refused before anything was removed
    result = recipe.main([*run, "--overwrite", "--max-steps", "2"])  # explicitly afresh: the old run is gone
    assert len(result["losses"]) == 2 and not (out / "checkpoints" / "step-000006").exists()
    assert [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()] == [1, 2]
