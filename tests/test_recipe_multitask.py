"""recipes/multitask.py end to end on synthetic task directories (written with EmbedWriter).

Three tasks whose target embeddings are a fixed non-linear map of the query embeddings (a
learnable toy task), two of them with source-image counts 0..3. On 2 gloo ranks:
- the drawn tasks (train_log.jsonl's "task/group") are exactly the sampler's weighted draws (an
  unweighted task never appears, nor the zero-weight group 3);
- the loss goes down; a run split by --stop-at / --resume reproduces the straight run's
  losses (abs 1e-5); the exported head loads and reproduces the recipe's metrics.
And step 1 -> step 2: stores written by extract_embeds.py (pooled and per-token) train.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _recipes import load_script, torchrun, train_log

from vembed_blocks.data import WeightedTaskSampler
from vembed_blocks.data.embed_store import EmbedStore, EmbedWriter
from vembed_blocks.fusion_head import FusionHead

multitask = load_script("multitask")


def write_task(root: Path, name: str, n: int, seed: int, grouped: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, 16, generator=g)
    w = torch.randn(16, 16, generator=torch.Generator().manual_seed(0)) / 4  # one relation for all tasks
    d = torch.tanh(q @ w) + 0.05 * torch.randn(n, 16, generator=g)
    writer = EmbedWriter(root / name, 0)
    for k in range(0, n, 16):
        rows = [
            {"id": f"{i}.0", "n": i, "num_source_images": i % 4 if grouped else -1} for i in range(k, min(n, k + 16))
        ]
        writer.write(k // 16, rows, {"query": list(q[k : k + 16]), "positive": list(d[k : k + 16])})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tasks")
    write_task(root, "edit_a", 64, 1, True)
    write_task(root, "edit_b", 48, 2, True)
    write_task(root, "plain_c", 40, 3, False)
    return root


WEIGHTS, GROUPS = "edit_a=3,edit_b=1", "0=1,1=1,2=1,3=0"


def common(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--data",
        str(data_dir),
        "--train-data-weights",
        WEIGHTS,
        "--train-src-img-num-weights",
        GROUPS,
        "--output",
        str(out),
        "--batch-size",
        "4",
        "--hidden",
        "64",
        "--dim",
        "16",
        "--lr",
        "3e-3",
        "--temperature",
        "0.1",
        "--max-steps",
        "24",
        "--num-workers",
        "0",
        "--log-every",
        "4",
        "--eval-rows",
        "32",
        "--eval-every",
        "12",
        *extra,
    ]


def test_two_ranks_weighted_homogeneous_learns_resumes_exports(data_dir, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    torchrun("multitask", *common(data_dir, straight, "--save-every", "12"))
    torchrun("multitask", *common(data_dir, split, "--stop-at", "12"))
    assert not (split / "final").exists()
    torchrun("multitask", *common(data_dir, split, "--resume"))

    rows = [json.loads(x) for x in (straight / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 25))
    # exactly the sampler's weighted draws (the same on every rank: TaskLoader checks the ranks' samplers agree)
    sizes = {"edit_a": 64, "edit_b": 48}
    groups = {name: [i % 4 for i in range(n)] for name, n in sizes.items()}
    ref = WeightedTaskSampler(
        sizes,
        4,
        {"edit_a": 3, "edit_b": 1},
        seed=0,
        rank=0,
        world_size=2,
        group_of=groups,
        group_weights={0: 1, 1: 1, 2: 1, 3: 0},
    )
    assert [r["task"] for r in rows] == [ref.draw(t)[1] for t in range(24)]
    for r in rows:
        r["task"], r["group"] = r["task"].split("/")
    mix = collections.Counter(r["task"] for r in rows)
    assert "plain_c" not in mix and mix["edit_a"] > mix["edit_b"] > 0, mix
    assert {r["group"] for r in rows} <= {"0", "1", "2"}

    losses = train_log(straight)
    assert sum(losses[s] for s in range(19, 25)) < 0.5 * sum(losses[s] for s in range(1, 7)), losses
    resumed = train_log(split)
    assert sorted(resumed) == list(range(1, 25))
    for step in range(13, 25):
        assert resumed[step] == pytest.approx(losses[step], abs=1e-5), (step, losses, resumed)

    head = FusionHead.from_pretrained(str(split / "final"))
    saved = json.loads((split / "metrics.json").read_text())
    for name in ("edit_a", "edit_b", "plain_c"):  # the export reproduces the recipe's metrics, recomputed plainly
        store = EmbedStore(data_dir / name)
        rows = [store[i] for i in range(32)]
        with torch.no_grad():
            q, d = head(torch.stack([r["query"] for r in rows]), torch.stack([r["positive"] for r in rows]))
        scores = (F.normalize(q, dim=-1) @ F.normalize(d, dim=-1).T).numpy()  # float32, as the recipe ranks
        rank_of_own = [(scores[i] > scores[i, i]).sum() for i in range(32)]  # 0 = first
        for k in (1, 5):
            want = sum(r < k for r in rank_of_own) / 32
            assert saved["after"][f"{name}/recall@{k}"] == pytest.approx(want, abs=1e-6), (name, k)
    assert saved["after"]["edit_a/recall@5"] > 5 / 32  # better than chance after 24 steps
    assert saved["after"]["edit_a/recall@5"] > saved["before"]["edit_a/recall@5"]
    evals = [json.loads(x) for x in (split / "eval_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [12]  # the last step's figures are metrics.json's "after"
    assert 0 < evals[0]["loss"] < losses[1]  # validation loss (here the training tasks), below the first step's


@pytest.mark.filterwarnings("ignore:streams smaller than the global batch")  # 9-12 records per task, on purpose
def test_trains_on_extract_embeds_output(tmp_path):
    """Step 1 -> step 2 in one process: a pooled and a per-token store from a tiny Qwen3-VL train together."""
    from _tiny_models import tiny_qwen3vl
    from test_recipe_extract import edit_rows

    extract = load_script("extract_embeds")
    data, vlm, meta = edit_rows(tmp_path / "raw"), tiny_qwen3vl(str(tmp_path / "qwen")), tmp_path / "meta"
    base = [
        "--data",
        str(data),
        "--model",
        vlm,
        "--field",
        "source_image=src",
        "--field",
        "target_image=tgt",
        "--shard-size",
        "4",
    ]
    extract.main([*base, "--output", str(meta / "edits")])
    extract.main([*base, "--output", str(meta / "t2i_tokens"), "--t2i-mode", "--per-token"])
    out = tmp_path / "run"
    result = multitask.main(
        [
            "--data",
            str(meta),
            "--train-src-img-num-weights",
            "0=1,1=1,2=1",
            "--output",
            str(out),
            "--batch-size",
            "4",
            "--hidden",
            "32",
            "--dim",
            "8",
            "--max-steps",
            "4",
            "--num-workers",
            "0",
        ]
    )
    rows = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {r["task"].split("/")[0] for r in rows} <= {"edits", "t2i_tokens"}
    assert {k.split("/")[0] for k in result["after"]} == {"edits", "t2i_tokens"}
    assert FusionHead.from_pretrained(str(out / "final")).config["query_dim"] == 32


def test_gradcache_chunks_give_the_plain_steps(data_dir, tmp_path):
    """--chunk-size: each side of the head runs through GradCache in chunks of rows; the same steps as without."""
    short = ["--max-steps", "6", "--eval-every", "0"]
    plain = multitask.main(common(data_dir, tmp_path / "plain", *short))
    chunked = multitask.main(common(data_dir, tmp_path / "chunked", *short, "--chunk-size", "2"))
    assert len(plain["losses"]) == 6
    assert chunked["losses"] == pytest.approx(plain["losses"], abs=1e-5)
    assert chunked["after"] == pytest.approx(plain["after"], abs=1e-6)
