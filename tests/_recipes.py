"""Run recipe scripts from tests: import one as a module, or launch it with torchrun (2 gloo ranks)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from _watchdog import STALL, WatchdogTimeout, budget_for, wait_for

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """``recipes/<name>.py`` as a module (to call its ``main(argv)`` or helpers in-process)."""
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def torchrun(
    script: str, *args: str, nproc: int = 2, timeout: float = 300, stderr: bool = False, stall: float = STALL
) -> str:
    """``torchrun --standalone --nproc_per_node=nproc recipes/<script>.py args``; returns stdout (then stderr,
    where the recipes log, if ``stderr``), fails with the logs.

    There is no wall-clock limit. The launcher and its workers are killed and the test fails when
    they make no progress for ``stall`` seconds (they neither ran nor waited for a CPU for 75 % of
    that time: a rank blocked on a collective the others never join) or when together they used
    more than ``budget_for(timeout)`` = 4 x ``timeout`` CPU-seconds (a spin): ``timeout`` is the old
    wall-clock estimate for the run on an idle machine and only sizes that budget.
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(ROOT / "recipes" / f"{script}.py"),
        *args,
    ]
    # Own session, and the watchdog kills the whole process tree: torchrun starts each worker in a
    # session of its own, so killing the launcher's session alone would leave hung workers behind.
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = wait_for(proc, stall=stall, cpu_budget=budget_for(timeout), what=f"torchrun {script}")
    except WatchdogTimeout as e:
        out, err = e.output or "", e.stderr or ""
        raise AssertionError(f"{e.reason}: {' '.join(cmd)}\n{out[-4000:]}\n{err[-6000:]}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{out[-4000:]}\n{err[-6000:]}"
    return out + err if stderr else out


def train_log(out: Path) -> dict[int, float]:
    """``{step: loss}`` from a recipe's ``<output>/train_log.jsonl`` (rank 0 writes one line per step)."""
    return {r["step"]: r["loss"] for r in map(json.loads, (Path(out) / "train_log.jsonl").read_text().splitlines())}


def rank_rows(n_rows: int, batch_size: int, step: int = 0, world_size: int = 2, seed: int = 0) -> list[list[int]]:
    """The row indices each rank trains on at ``step`` (0-based), drawn as the single-task recipes draw them
    (``WeightedTaskSampler({"train": n_rows}, batch_size, seed=seed, rank=r, world_size=world_size)``)."""
    from vembed_blocks.data import WeightedTaskSampler

    out = []
    for rank in range(world_size):
        sampler = WeightedTaskSampler({"train": n_rows}, batch_size, seed=seed, rank=rank, world_size=world_size)
        for _ in range(step):
            next(sampler)
        out.append(list(next(sampler)[1]))
    return out


def ragged_rows(
    rows: list[dict], batch_size: int, negatives, label, seed: int = 0
) -> tuple[list[dict], list[list[int]]]:
    """``rows`` where only rank 0's step-0 rows (of 2 ranks) carry hard negatives and a string label.

    ``negatives(i, j)`` is the ``j``-th of the hard negatives of row ``i``, which gets ``j % 3`` of
    them (its first row gets none: ragged inside rank 0 too); ``label(i)`` its label. Every other
    row has neither, so at step 0 rank 1 has no negatives and no labels at all. Returns
    ``(rows, step0)`` with ``step0[r]`` the rows of rank ``r`` at step 0, asserted to be disjoint.
    """
    step0 = rank_rows(len(rows), batch_size, 0, 2, seed)
    assert not set(step0[0]) & set(step0[1]), step0  # enough rows: no row on both ranks
    out = [{k: v for k, v in r.items() if k not in ("negatives", "label")} for r in rows]
    for j, i in enumerate(step0[0]):
        out[i]["negatives"] = [negatives(i, m) for m in range(j % 3)]
        out[i]["label"] = label(i)
    return out, step0


def assert_ragged_step0(records, step0: list[list[int]]) -> None:
    """At step 0, rank 0's rows all have a label and some (not all) have hard negatives; rank 1's have neither."""
    mine, other = [records[i] for i in step0[0]], [records[i] for i in step0[1]]
    assert all(isinstance(r.label, str) for r in mine), [r.label for r in mine]
    assert 0 < sum(bool(r.negatives) for r in mine) < len(mine), [len(r.negatives) for r in mine]
    assert all(not r.negatives and r.label is None for r in other), [(len(r.negatives), r.label) for r in other]
