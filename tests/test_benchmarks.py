"""benchmarks/gpu.py runs every section on tiny models on the CPU (what CI runs), so the GPU run is one
command that is known to get through: each table is printed with a row per configuration and no
out-of-memory or missing figure."""

from __future__ import annotations

import os
import sys

from _watchdog import run_watched

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_benchmark_runs_tiny_on_cpu() -> None:
    env = dict(os.environ, OMP_NUM_THREADS="2")
    # No wall-clock limit (a loaded machine took 8 min): killed only on no progress for 120 s (a hang)
    # or past 1200 CPU-seconds, 5x the ~240 it uses (a spin). See tests/_watchdog.py.
    out = run_watched(
        [sys.executable, os.path.join(ROOT, "benchmarks", "gpu.py"), "--device", "cpu", "--tiny", "--reps", "1"],
        cwd=ROOT,
        env=env,
        cpu_budget=1200,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    text = out.stdout
    for heading in (
        "## CLIP ViT-B/16-sized dual encoder (tiny)",
        "## GradCache memory budget curve",
        "## InfoNCE, 32-d bf16 embeddings",
        "## Qwen3-VL-2B-sized model (tiny), FSDP2 on 1 rank",
    ):
        assert heading in text, text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    # CLIP: header + plain + (floor, GradCache) x 3 batches; budget: header + 6 budgets; tiled: header +
    # 2 sizes x 2 paths; Qwen: header + without/with checkpointing.
    assert len(rows) == (1 + 1 + 6) + (1 + 6) + (1 + 4) + (1 + 2), text
    assert "out of memory" not in text and "does not fit" not in text
    budget = text.split("## GradCache memory budget curve")[1].split("##")[0]
    assert "| 0 (classic) | 0 + 0 |" in budget and "| inf (all) | 16 + 16 |" in budget, budget
