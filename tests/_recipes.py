"""Run recipe scripts from tests: import one as a module, or launch it with torchrun (2 gloo ranks)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """``recipes/<name>.py`` as a module (to call its ``main(argv)`` or helpers in-process)."""
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def torchrun(script: str, *args: str, nproc: int = 2, timeout: float = 300) -> str:
    """``torchrun --standalone --nproc_per_node=nproc recipes/<script>.py args``; returns stdout, fails with the logs."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "recipes" / f"{script}.py"), *args]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout


def train_log(out: Path) -> dict[int, float]:
    """``{step: loss}`` from a recipe's ``<output>/train_log.jsonl`` (rank 0 writes one line per step)."""
    return {r["step"]: r["loss"] for r in map(json.loads, (Path(out) / "train_log.jsonl").read_text().splitlines())}
