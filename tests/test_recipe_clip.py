"""recipes/clip_t2i.py and recipes/evaluate.py end to end on tiny random CLIP / SigLIP models.

- the embedded demo (reduced size) trains in-process and retrieval clearly improves;
- torchrun with 2 gloo ranks: a run split by --stop-at/--resume reproduces the losses of an
  uninterrupted run, the exported folder loads with from_pretrained, and evaluate.py
  reproduces the recipe's final metrics; the same save/resume/export for SigLIP.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _recipes import load_script, torchrun, train_log
from _tiny_models import tiny_siglip
from safetensors.torch import load_file

from vembed_blocks import demo as demo_data

clip_t2i = load_script("clip_t2i")
evaluate = load_script("evaluate")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("demo")
    train, val = demo_data.render_demo(str(root), per_combo=1, seed=0)
    return {
        "train": train,
        "val": val,
        "clip": demo_data.build_tiny_clip(str(root / "clip"), quick=True),
        "root": str(root),
    }


def test_demo_quick_run_improves_retrieval(tmp_path):
    result = clip_t2i.main(
        ["--demo-quick", "--output", str(tmp_path), "--batch-size", "32", "--num-workers", "0", "--log-every", "20"]
    )
    before, after = result["before"], result["after"]
    assert after["recall@10"] >= before["recall@10"] + 0.1, (before, after)
    assert after["mrr@10"] >= 2 * before["mrr@10"], (before, after)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    curves, health = result["recall_curve"], result["health"]
    assert saved == {"before": before, "after": after, "recall_curve": curves, "health": health}
    curve = saved["recall_curve"]  # recall@1..100 (the report's plot) agrees with the table's recall@k
    assert len(curve["after"]) == 100 and [curve["after"][k - 1] for k in (1, 5, 10)] == [
        after[f"recall@{k}"] for k in (1, 5, 10)
    ]
    assert (tmp_path / "final" / "model.safetensors").exists() and (tmp_path / "report.md").exists()


def common(demo: dict[str, str], out: Path, model: str, *extra: str) -> list[str]:
    return [
        "--data",
        demo["train"],
        "--val-data",
        demo["val"],
        "--model",
        model,
        "--output",
        str(out),
        "--batch-size",
        "8",
        "--chunk-size",
        "3",
        "--num-workers",
        "0",
        "--log-every",
        "1",
        *extra,
    ]


def test_torchrun_clip_resume_matches_straight_run_and_evaluate_reproduces(demo, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    torchrun("clip_t2i", *common(demo, straight, demo["clip"], "--max-steps", "4", "--save-every", "2"))
    torchrun("clip_t2i", *common(demo, split, demo["clip"], "--max-steps", "4", "--stop-at", "2"))
    assert not (split / "final").exists()
    torchrun("clip_t2i", *common(demo, split, demo["clip"], "--max-steps", "4", "--resume"))

    a, b = train_log(straight), train_log(split)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):
        assert b[step] == pytest.approx(a[step], abs=1e-6), (step, a, b)

    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(split / "final")
    assert isinstance(model, CLIPModel) and model.logit_scale.dim() == 0
    recipe_after = json.loads((split / "metrics.json").read_text())["after"]
    assert recipe_after == pytest.approx(json.loads((straight / "metrics.json").read_text())["after"], abs=1e-6)
    got = evaluate.main(["--model", str(split / "final"), "--data", demo["val"], "--output", str(tmp_path / "eval")])
    for name, value in recipe_after.items():
        assert got[name] == pytest.approx(value, abs=1e-6), name
    emb = load_file(str(tmp_path / "eval" / "queries.safetensors"))
    assert torch.allclose(emb["embeddings"].norm(dim=-1), torch.ones(len(emb["embeddings"])), atol=1e-5)


def test_torchrun_siglip_saves_resumes_and_exports(demo, tmp_path):
    words = sorted(
        {w for t in demo_data.TEMPLATES for w in t.replace(",", " ").split() if "{" not in w}
        | set(demo_data.SHAPES)
        | set(demo_data.COLOURS)
        | set(demo_data.POSITIONS)
    )
    siglip = tiny_siglip(str(tmp_path / "siglip"), words)
    out = tmp_path / "run"
    torchrun("clip_t2i", *common(demo, out, siglip, "--loss", "siglip", "--max-steps", "3", "--stop-at", "2"))
    torchrun("clip_t2i", *common(demo, out, siglip, "--loss", "siglip", "--max-steps", "3", "--resume"))
    assert sorted(train_log(out)) == [1, 2, 3]

    from transformers import SiglipModel

    model = SiglipModel.from_pretrained(out / "final")
    assert model.logit_bias.abs().item() > 0  # the learned bias was folded back into the export
    recipe_after = json.loads((out / "metrics.json").read_text())["after"]
    got = evaluate.main(["--model", str(out / "final"), "--data", demo["val"], "--output", str(tmp_path / "eval")])
    for name, value in recipe_after.items():
        assert got[name] == pytest.approx(value, abs=1e-6), name


def test_fp16_loss_scaling_trains_and_fsdp_recipes_refuse_it(demo, tmp_path, capsys):
    """--fp16: fp16 autocast + GradScaler through GradCache; finite losses, weights move. The FSDP2
    recipes refuse it with a message (each rank would see the inf/NaN of its own shard only)."""
    run = common(demo, tmp_path / "fp16", demo["clip"], "--fp16", "--max-steps", "4", "--lr", "1e-3")
    run = [a for a in run if a not in ("--val-data", demo["val"])]
    result = clip_t2i.main(run)
    assert len(result["losses"]) == 4 and all(torch.isfinite(torch.tensor(result["losses"])))
    split = [a if a != str(tmp_path / "fp16") else str(tmp_path / "split") for a in run]
    clip_t2i.main([*split, "--stop-at", "2"])
    saved = torch.load(tmp_path / "split" / "checkpoints" / "step-000002" / "rank-00000.pt", weights_only=False)
    assert saved["scaler"]["scale"] == 65536.0  # the loss scale is checkpointed (resume goes on with it)
    clip_t2i.main([*split, "--resume"])
    a, b = train_log(tmp_path / "fp16"), train_log(tmp_path / "split")
    assert [b[s] for s in (3, 4)] == pytest.approx([a[s] for s in (3, 4)], abs=1e-6)
    before = load_file(str(Path(demo["clip"]) / "model.safetensors"))
    after = load_file(str(tmp_path / "fp16" / "final" / "model.safetensors"))
    assert max((after[k] - v).abs().max().item() for k, v in before.items() if k in after) > 1e-4
    for name in ("qwen3_fsdp", "colbert"):  # refused at parse time, before any model is loaded
        with pytest.raises(SystemExit):
            load_script(name).main(["--model", "unused", "--data", demo["train"], "--fp16", "--output", str(tmp_path)])
        assert (
            "--fp16: not supported: fp16 loss scaling over FSDP2-sharded gradients; use --bf16"
            in capsys.readouterr().err
        )


def test_torchrun_false_negative_counts_are_global(demo, tmp_path):
    """Every --fn-* rule on (the guide: the same tiny CLIP, frozen), GradCache chunks, 2 ranks x 4 rows: every
    step is all 8 rows, and rows 0 and 1 share a positive image, so each step masks at least those 2 duplicates.
    The logged counts are summed over ranks: step 1 (same weights) counts what one process on the 8 rows does."""
    rows = [json.loads(line) for line in Path(demo["train"]).read_text().splitlines()[:8]]
    for i, r in enumerate(rows):
        r["negatives"] = [rows[(i + 3) % 8]["positive"]]
    rows[1]["positive"] = rows[0]["positive"]
    data = Path(demo["root"]) / "dup.jsonl"  # beside the images it names
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fn = ["--fn-duplicates", "--fn-margin", "0.1", "--fn-weight", "0.5", "--fn-guide", demo["clip"]]
    fn += ["--data", str(data), "--max-steps", "2", "--fn-guide-margin", "0.05"]
    torchrun("clip_t2i", *common(demo, tmp_path / "two", demo["clip"], *fn, "--batch-size", "4"))
    result = clip_t2i.main(common(demo, tmp_path / "one", demo["clip"], *fn, "--batch-size", "8"))
    assert all(torch.isfinite(torch.tensor(result["losses"])))
    one, two = (
        [json.loads(x) for x in (tmp_path / n / "train_log.jsonl").read_text().splitlines()] for n in ("one", "two")
    )
    assert len(two) == 2 and all(r["masked_duplicates"] >= 2 for r in two), two
    assert two[0]["masked_duplicates"] == one[0]["masked_duplicates"], (one, two)
    for rule in ("margin", "guide"):  # scores at a threshold may round apart (other chunk shapes): a pair or two
        assert abs(two[0][f"masked_{rule}"] - one[0][f"masked_{rule}"]) <= 2, (one, two)
